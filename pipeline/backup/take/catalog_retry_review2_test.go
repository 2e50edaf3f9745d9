package take

import (
	"bytes"
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/walship/walship/pipeline"
	"github.com/walship/walship/pipeline/backup"
	"github.com/walship/walship/sinks"
	filesink "github.com/walship/walship/sinks/file"
)

// retriedPutSink is a real file sink whose Put of backup.json stores the
// object and then answers ErrExists, as an S3 PUT with If-None-Match: *
// does when the SDK retries a request whose first attempt was stored but
// whose answer was lost (a timeout, a reset connection). Just then a
// prune deletes the backup's start marker (review finding 5's race).
type retriedPutSink struct {
	*filesink.Sink
	prefix string
}

func (s *retriedPutSink) Put(ctx context.Context, key string, body []byte, meta sinks.Metadata) error {
	if err := s.Sink.Put(ctx, key, body, meta); err != nil || !strings.HasSuffix(key, "/"+backup.CatalogFile) {
		return err
	}
	id := strings.TrimSuffix(strings.TrimPrefix(key, s.prefix), "/"+backup.CatalogFile)
	if err := s.Sink.Delete(ctx, backup.StartedKey(s.prefix, id)); err != nil { // the prune
		return err
	}
	return sinks.ErrExists // the retry's 412
}

// REVIEW2 FINDING 5
//
// catalog() takes the catalogue back when a prune removed the start marker
// or a chunk (stillThere), but only when its Put returned nil: a Put that
// answers ErrExists with the same SHA-256 (a retried PUT whose first
// attempt landed) returns the catalogue at once, without stillThere. The
// backup is reported complete while the prune goes on to delete its
// chunks (it deleted the marker first, and its Head of the catalogue may
// have come before the catalogue landed).
func TestReview2CatalogRetriedPutSkipsStillThere(t *testing.T) {
	const (
		sys   = "7300000000000000042"
		chunk = 64 << 10
	)
	ctx := context.Background()
	fs, err := filesink.New(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	layout := sinks.BarmanCloud{Prefix: "p", Server: "db1"}
	sink := &retriedPutSink{Sink: fs, prefix: layout.BackupPrefix()}
	now := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	bus := &stepsBus{}
	tk, err := New(Config{Server: "db1", Options: Options{Checkpoint: "fast"}, ChunkSize: chunk, Window: 4, RepublishAfter: time.Minute,
		LayoutFor: func(string) sinks.Layout { return layout }, Now: func() time.Time { return now }}, bus, sink)
	if err != nil {
		t.Fatal(err)
	}
	st, err := tk.Steps(ctx, "db1", sys, 150004, mb)
	if err != nil {
		t.Fatal(err)
	}
	start, end := pipeline.LSN(3<<20+40), pipeline.LSN(3<<20+100)
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	must(st.Started(1, start))
	must(st.Archive("base.tar", ""))
	must(st.Data(bytes.Repeat([]byte("tar!"), 100)))
	must(st.Manifest())
	must(st.Data([]byte(`{"Manifest-Checksum": "abc"}`)))
	must(st.End(1, end))
	for {
		any, err := st.Publish(ctx)
		must(err)
		if !any {
			break
		}
	}
	for _, ev := range bus.events {
		key := layout.BackupPrefix() + ev.File
		if err := fs.Put(ctx, key, []byte("stored"), sinks.Metadata{SHA256: ev.SHA256, SystemID: sys}); err != nil && !errors.Is(err, sinks.ErrExists) {
			t.Fatal(err)
		}
		st.Confirm(pipeline.ArchivedEvent{SegmentEvent: ev, Key: key, Codec: "none"})
	}
	must(fs.Put(ctx, layout.Key(pipeline.Segment{Timeline: 1, No: 3}.Name(mb), ""), []byte("x"), sinks.Metadata{SHA256: hashHex([]byte("x")), SystemID: sys}))
	if m, err := st.MissingWAL(ctx); err != nil || m != "" {
		t.Fatalf("missing WAL %q %v", m, err)
	}
	_, err = st.Catalog(ctx)
	_, herr := fs.Head(ctx, backup.CatalogKey(layout.BackupPrefix(), st.ID()))
	if err == nil && herr == nil {
		t.Fatalf("the start marker was deleted by a prune, yet the backup is reported complete and its catalogue stays: the retried Put's ErrExists path skips stillThere")
	}
}
