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
// never overwrites them, counts a conflict, and the slot does not move past
// that segment.
func TestArchiveConflict(t *testing.T) {
	st := newStack(t)
	startWalship(t, st.env(), st.args("run", "--create-slot")...)
	waitFor(t, 30*time.Second, "streaming", func() bool { return st.walsenderPID() != "" })
	victim := pipeline.SegmentOf(1, st.currentLSN(), segSize).Next().Next()
	key := st.prefix + "/" + st.server + "/wals/" + victim.Name(segSize)[:16] + "/" + victim.Name(segSize) + ".zst"
	bogus := []byte("not this segment")
	_, err := st.s3.Client().PutObject(context.Background(), &s3.PutObjectInput{Bucket: aws.String(st.s3.Bucket), Key: aws.String(key),
		Body: bytes.NewReader(bogus), Metadata: map[string]string{"walship-sha256": "00"}})
	if err != nil {
		t.Fatal(err)
	}
	st.writeSegments(5)
	waitFor(t, 30*time.Second, "a conflict to be counted", func() bool {
		v, ok := st.metric("walship_archive_conflicts_total")
		return ok && v >= 1
	})
	time.Sleep(3 * time.Second)
	if got := st.replFlush(); got > victim.StartLSN(segSize) || st.slotRestart() > victim.StartLSN(segSize) {
		t.Errorf("flush %s / restart_lsn %s moved past %s, whose upload conflicts", got, st.slotRestart(), victim.Name(segSize))
	}
	if st.replFlush() < victim.StartLSN(segSize) {
		t.Errorf("flush %s did not reach the segments before the conflict (%s)", st.replFlush(), victim.StartLSN(segSize))
	}
	got, _ := st.s3.Client().GetObject(context.Background(), &s3.GetObjectInput{Bucket: aws.String(st.s3.Bucket), Key: aws.String(key)})
	var buf bytes.Buffer
	buf.ReadFrom(got.Body)
	if !bytes.Equal(buf.Bytes(), bogus) {
		t.Error("walship overwrote the object it conflicted with")
	}
}
