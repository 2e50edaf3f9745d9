package archiver

import (
	"context"
	"crypto/sha256"
	"errors"
	"testing"

	"github.com/aws/aws-sdk-go-v2/aws"
	s3api "github.com/aws/aws-sdk-go-v2/service/s3"
	"github.com/aws/aws-sdk-go-v2/service/s3/types"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/walship/walship/compress"
	"github.com/walship/walship/internal/testenv"
	"github.com/walship/walship/pipeline"
	"github.com/walship/walship/sinks"
	s3sink "github.com/walship/walship/sinks/s3"
)

// Ranges against a real S3 server (versitygw): stored put-if-absent under
// the range key with walship's metadata and a CRC32C, a conflicting range
// refused, and the ranges deleted once their segment is archived.
func TestRangesOnS3(t *testing.T) {
	gw := testenv.StartS3(t)
	gw.SetEnv(t)
	ctx := context.Background()
	s, err := s3sink.New(ctx, s3sink.Options{Bucket: gw.Bucket, Endpoint: gw.Endpoint(), PathStyle: true})
	if err != nil {
		t.Fatal(err)
	}
	f := newFixture(t)
	f.sink = &failSink{Sink: s}
	if f.a, err = New(Config{Codec: compress.Zstd, Layout: f.a.cfg.Layout, Dest: "s3://wal", KeepAlive: -1, Metrics: f.a.cfg.Metrics}, f.bus, f.sink); err != nil {
		t.Fatal(err)
	}
	seg := pipeline.Segment{Timeline: 1, No: 5}
	ev := f.rangeOf(f.raw, seg, 0, 0x3000)
	if _, out := f.handle(t, ev, 1); out != Acked {
		t.Fatalf("range: %v", out)
	}
	key := "p/db1/walship-partial/000000010000000000000005/00000000-00003000.zst"
	out, err := gw.Client().HeadObject(ctx, &s3api.HeadObjectInput{Bucket: aws.String(gw.Bucket), Key: aws.String(key), ChecksumMode: types.ChecksumModeEnabled})
	if err != nil {
		t.Fatalf("head %s: %v", key, err)
	}
	if got := sinks.MetadataFromMap(out.Metadata); got.SHA256 != ev.SHA256 || got.StartLSN != ev.StartLSN.String() || got.EndLSN != ev.EndLSN.String() ||
		got.Timeline != 1 || got.SystemID != "42" || got.Codec != "zstd" || got.RawSize != 0x3000 {
		t.Errorf("metadata %+v", got)
	}
	if out.ChecksumCRC32C == nil {
		t.Error("no CRC32C stored with the range")
	}
	if raw, _ := f.stored(t, key); string(raw) != string(f.raw[:0x3000]) {
		t.Fatal("the stored range holds other bytes")
	}

	// Put-if-absent: other bytes at the key are refused, and a range event
	// carrying them is not confirmed.
	if err := s.Put(ctx, key, []byte("other"), sinks.Metadata{SHA256: "ff"}); !errors.Is(err, sinks.ErrExists) {
		t.Fatalf("second put at a range key: %v, want ErrExists", err)
	}
	other := append([]byte(nil), f.raw...)
	other[0x1000]++ // record data, not a page header: only the SHA-256 differs
	sum := sha256.Sum256(other[:0x3000])
	ev2 := f.rangeOf(other, seg, 0, 0x3000)
	if ev2.SHA256 != pipeline.SHA256Hex(sum[:]) || ev2.SHA256 == ev.SHA256 {
		t.Fatal("test setup: the conflicting range has the same SHA-256")
	}
	if d, res := f.handle(t, ev2, 1); res != Naked || d.answer != "nak" || len(f.bus.archived) != 1 {
		t.Fatalf("conflicting range: %v, confirmations %d", res, len(f.bus.archived))
	}
	if meta, err := s.Head(ctx, key); err != nil || meta.SHA256 != ev.SHA256 {
		t.Fatalf("range overwritten: %+v %v", meta, err)
	}

	// The whole segment archived: its ranges go.
	whole := f.ev
	whole.Ranges = true
	if _, res := f.handle(t, whole, 1); res != Acked {
		t.Fatalf("segment: %v", res)
	}
	list, err := gw.Client().ListObjectsV2(ctx, &s3api.ListObjectsV2Input{Bucket: aws.String(gw.Bucket), Prefix: aws.String("p/db1/walship-partial/")})
	if err != nil {
		t.Fatal(err)
	}
	if len(list.Contents) != 0 {
		t.Errorf("%d range objects left after their segment was archived", len(list.Contents))
	}
	if got := testutil.ToFloat64(f.a.cfg.Metrics.PartialDeleted.WithLabelValues("db1")); got != 1 {
		t.Errorf("walship_partial_deleted_total %v, want 1", got)
	}
	if _, err := s.Head(ctx, f.key); err != nil {
		t.Fatalf("the whole segment: %v", err)
	}
}
