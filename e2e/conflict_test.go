package e2e

import (
	"bytes"
	"context"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/s3"

	"github.com/walship/walship/pipeline"
)

// The bucket already holds different bytes under a segment's key: walship
// never overwrites them, counts a conflict at every retry, and the slot
// does not move past that segment; once an operator removes the object,
// the segment is archived and the slot moves on.
func TestArchiveConflict(t *testing.T) {
	st := newStack(t)
	startWalship(t, st.env(), st.args("run", "--create-slot", "--conflict-retry", "1s")...)
	waitFor(t, 30*time.Second, "streaming", func() bool { return st.walsenderPID() != "" })
	firstSeg := uint64(segSize.Start(st.slotRestart())) / uint64(segSize)
	victim := pipeline.SegmentOf(1, st.currentLSN(), segSize).Next().Next()
	key := st.prefix + "/" + st.server + "/wals/" + victim.Name(segSize)[:16] + "/" + victim.Name(segSize) + ".zst"
	bogus := []byte("not this segment")
	ctx := context.Background()
	_, err := st.s3.Client().PutObject(ctx, &s3.PutObjectInput{Bucket: aws.String(st.s3.Bucket), Key: aws.String(key),
		Body: bytes.NewReader(bogus), Metadata: map[string]string{"walship-sha256": "00"}})
	if err != nil {
		t.Fatal(err)
	}
	end := st.writeSegments(5)
	// Several retries, each refused: the conflict lasts, the slot holds.
	waitFor(t, 60*time.Second, "the conflict to be counted at several retries", func() bool {
		v, ok := st.metric("walship_archive_conflicts_total")
		return ok && v >= 4
	})
	if got := st.replFlush(); got > victim.StartLSN(segSize) || st.slotRestart() > victim.StartLSN(segSize) {
		t.Errorf("flush %s / restart_lsn %s moved past %s, whose upload conflicts", got, st.slotRestart(), victim.Name(segSize))
	}
	if st.replFlush() < victim.StartLSN(segSize) {
		t.Errorf("flush %s did not reach the segments before the conflict (%s)", st.replFlush(), victim.StartLSN(segSize))
	}
	got, err := st.s3.Client().GetObject(ctx, &s3.GetObjectInput{Bucket: aws.String(st.s3.Bucket), Key: aws.String(key)})
	if err != nil {
		t.Fatalf("get the conflicting object: %v", err)
	}
	var buf bytes.Buffer
	buf.ReadFrom(got.Body)
	got.Body.Close()
	if !bytes.Equal(buf.Bytes(), bogus) {
		t.Fatal("walship overwrote the object it conflicted with")
	}
	// The operator removes it: the next retry archives the segment.
	if _, err := st.s3.Client().DeleteObject(ctx, &s3.DeleteObjectInput{Bucket: aws.String(st.s3.Bucket), Key: aws.String(key)}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 60*time.Second, "archiving past the resolved conflict", func() bool { return st.replFlush() >= end })
	st.checkArchive(firstSeg, uint64(end)/uint64(segSize))
}
