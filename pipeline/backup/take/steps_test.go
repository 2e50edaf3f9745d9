package take

import (
	"bytes"
	"context"
	"errors"
	"io"
	"testing"
	"time"

	"github.com/walship/walship/pipeline"
	"github.com/walship/walship/pipeline/backup"
	"github.com/walship/walship/sinks"
	filesink "github.com/walship/walship/sinks/file"
)

// stepsBus records what a backup driven by Steps publishes.
type stepsBus struct {
	events []pipeline.SegmentEvent
	fail   bool
}

func (b *stepsBus) PutObject(_ context.Context, _ string, r io.Reader) error {
	_, err := io.ReadAll(r)
	return err
}

func (b *stepsBus) PublishSegment(_ context.Context, ev *pipeline.SegmentEvent) (uint64, error) {
	if b.fail {
		return 0, io.ErrUnexpectedEOF
	}
	b.events = append(b.events, *ev)
	return uint64(len(b.events)), nil
}

func (b *stepsBus) WatchArchived(context.Context, string, time.Time, func(pipeline.ArchivedEvent), func(error)) error {
	return nil
}

// Steps runs Run's decisions without a server: the window bounds what
// Data takes (Room, CanClose), a failed publish stays queued, an
// unconfirmed chunk is queued again after RepublishAfter, and the
// catalogue is written only once every chunk is confirmed and the WAL is
// in the bucket.
func TestStepsTakesABackup(t *testing.T) {
	const (
		sys   = "7300000000000000042"
		mb    = pipeline.SegmentSize(1 << 20)
		chunk = 64 << 10
	)
	ctx := context.Background()
	fs, err := filesink.New(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	layout := sinks.BarmanCloud{Prefix: "p", Server: "db1"}
	now := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	bus := &stepsBus{}
	tk, err := New(Config{Server: "db1", Options: Options{Checkpoint: "fast"}, ChunkSize: chunk, Window: 1, RepublishAfter: time.Minute,
		LayoutFor: func(string) sinks.Layout { return layout }, Now: func() time.Time { return now }}, bus, fs)
	if err != nil {
		t.Fatal(err)
	}
	st, err := tk.Steps(ctx, "db1", sys, 150004, mb)
	if err != nil {
		t.Fatal(err)
	}
	start, end := pipeline.LSN(3<<20+40), pipeline.LSN(4<<20+100)
	if err := st.Started(1, start); err != nil {
		t.Fatal(err)
	}
	if err := st.Archive("base.tar", ""); err != nil {
		t.Fatal(err)
	}
	data := bytes.Repeat([]byte("tar!"), chunk/4*3/2) // a chunk and a half
	if room := st.Room(); room != 2*chunk-1 {
		t.Fatalf("room %d with an empty window of one", room)
	}
	if err := st.Data(data[:chunk]); err != nil { // the first chunk goes out
		t.Fatal(err)
	}
	if room := st.Room(); room != chunk-1 || st.CanClose() {
		t.Fatalf("window full: room %d, can close %v", room, st.CanClose())
	}
	if err := st.Data(data[chunk:]); err != nil {
		t.Fatal(err)
	}
	if err := st.Data(make([]byte, st.Room()+1)); err == nil {
		t.Fatal("Data past Room was taken")
	}
	// A publish that fails stays queued; the next attempt sends it.
	bus.fail = true
	if any, err := st.Publish(ctx); !any || err == nil {
		t.Fatalf("failed publish: %v %v", any, err)
	}
	bus.fail = false
	if any, err := st.Publish(ctx); !any || err != nil || len(bus.events) != 1 {
		t.Fatalf("publish: %v %v, %d events", any, err, len(bus.events))
	}
	if n := st.Republish(now); n != 0 {
		t.Fatalf("%d chunks republished at once", n)
	}
	if n := st.Republish(now.Add(time.Minute)); n != 1 {
		t.Fatalf("%d chunks republished after RepublishAfter, want 1", n)
	}
	st.Publish(ctx)
	if len(bus.events) != 2 || bus.events[1].Attempt != 1 || bus.events[1].SHA256 != bus.events[0].SHA256 {
		t.Fatalf("republished: %+v", bus.events)
	}
	// The archivers store and confirm each chunk.
	confirm := func(ev pipeline.SegmentEvent) {
		t.Helper()
		key := layout.BackupPrefix() + ev.File
		if err := fs.Put(ctx, key, data[:ev.Size], sinks.Metadata{SHA256: ev.SHA256, SystemID: sys}); err != nil && !errors.Is(err, sinks.ErrExists) {
			t.Fatal(err)
		}
		other := pipeline.ArchivedEvent{SegmentEvent: ev, Key: key, Codec: "none"}
		other.SHA256 = hashHex([]byte("other bytes"))
		if st.Confirm(other) {
			t.Fatal("a confirmation of other bytes counted")
		}
		if !st.Confirm(pipeline.ArchivedEvent{SegmentEvent: ev, Key: key, Codec: "none"}) {
			t.Fatalf("confirmation of %s did not count", ev.File)
		}
	}
	confirm(bus.events[0])
	if err := st.Manifest(); err != nil { // closes base: its last chunk
		t.Fatal(err)
	}
	if err := st.Data([]byte(`{"Manifest-Checksum": "abc"}`)); err != nil {
		t.Fatal(err)
	}
	st.Publish(ctx)
	confirm(bus.events[len(bus.events)-1])
	if err := st.End(1, end); err != nil {
		t.Fatal(err)
	}
	st.Publish(ctx)
	confirm(bus.events[len(bus.events)-1])
	if st.InFlight() != 0 {
		t.Fatalf("%d in flight", st.InFlight())
	}
	if m, err := st.MissingWAL(ctx); err != nil || m != pipeline.SegmentOf(1, start, mb).Name(mb) {
		t.Fatalf("missing WAL %q %v", m, err)
	}
	for _, no := range []uint64{3, 4} {
		key := layout.Key(pipeline.Segment{Timeline: 1, No: no}.Name(mb), "")
		if err := fs.Put(ctx, key, []byte("x"), sinks.Metadata{SHA256: hashHex([]byte("x")), SystemID: sys}); err != nil {
			t.Fatal(err)
		}
	}
	if m, err := st.MissingWAL(ctx); err != nil || m != "" {
		t.Fatalf("missing WAL %q %v", m, err)
	}
	cat, err := st.Catalog(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if cat.StartLSN != start || cat.EndLSN != end || len(cat.Archives) != 1 || len(cat.Archives[0].Chunks) != 2 || cat.Archives[0].Size != int64(len(data)) || cat.ManifestChecksum != "abc" {
		t.Fatalf("catalogue %+v", cat)
	}
	if _, err := fs.Head(ctx, backup.CatalogKey(layout.BackupPrefix(), st.ID())); err != nil {
		t.Fatalf("catalogue not written: %v", err)
	}
}
