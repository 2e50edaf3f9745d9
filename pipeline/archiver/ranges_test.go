package archiver

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"io"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/walship/walship/compress"
	"github.com/walship/walship/internal/walgen"
	"github.com/walship/walship/pipeline"
	"github.com/walship/walship/sinks"
)

// rangeOf is the range event for bytes [from, to) of segment raw (the
// fixture's, or another of the same timeline), staged in the fixture's bus.
func (f *fixture) rangeOf(raw []byte, seg pipeline.Segment, from, to uint64) pipeline.SegmentEvent {
	data := raw[from:to]
	sum := sha256.Sum256(data)
	ev := f.ev
	ev.Kind, ev.File = pipeline.KindRange, seg.Name(mb)
	ev.StartLSN = seg.StartLSN(mb) + pipeline.LSN(from)
	ev.EndLSN = seg.StartLSN(mb) + pipeline.LSN(to)
	ev.Size, ev.SHA256 = int64(to-from), pipeline.SHA256Hex(sum[:])
	ev.Object = "db1/" + ev.RangeName()
	f.bus.objects[ev.Object] = append([]byte(nil), data...)
	return ev
}

// stored reads and decompresses the object at key.
func (f *fixture) stored(t *testing.T, key string) ([]byte, sinks.Metadata) {
	t.Helper()
	rc, meta, err := f.sink.Get(context.Background(), key)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(rc)
	rc.Close()
	raw, err := compress.Decode(compress.Zstd, body, 0)
	if err != nil {
		t.Fatalf("%s does not decompress: %v", key, err)
	}
	return raw, meta
}

func TestRangeArchived(t *testing.T) {
	f := newFixture(t)
	seg := pipeline.Segment{Timeline: 1, No: 5}
	ev := f.rangeOf(f.raw, seg, 100, 5*8192+10)
	if d, out := f.handle(t, ev, 1); out != Acked || d.answer != "ack" {
		t.Fatalf("range: %v", out)
	}
	const key = "p/db1/walship-partial/000000010000000000000005/00000064-0000A00A.zst"
	if len(f.bus.archived) != 1 || f.bus.archived[0].Key != key || f.bus.archived[0].Kind != pipeline.KindRange ||
		f.bus.archived[0].SHA256 != ev.SHA256 || f.bus.archived[0].Existed {
		t.Fatalf("confirmation %+v, want one for %s", f.bus.archived, key)
	}
	if _, ok := f.bus.objects[ev.Object]; ok {
		t.Error("staged range not deleted after the ack")
	}
	raw, meta := f.stored(t, key)
	if !bytes.Equal(raw, f.raw[100:5*8192+10]) {
		t.Fatalf("stored range holds %d other bytes", len(raw))
	}
	want := sinks.Metadata{SHA256: ev.SHA256, StartLSN: ev.StartLSN.String(), EndLSN: ev.EndLSN.String(), Timeline: 1,
		SystemID: "42", Codec: "zstd", RawSize: ev.Size}
	if meta != want {
		t.Errorf("metadata %+v, want %+v", meta, want)
	}
	m := f.a.cfg.Metrics
	if got := testutil.ToFloat64(m.PartialUploads.WithLabelValues("db1")); got != 1 {
		t.Errorf("walship_partial_uploads_total %v, want 1", got)
	}
	if got := testutil.ToFloat64(m.PartialBytes.WithLabelValues("db1")); got != float64(f.bus.archived[0].CompressedSize) || got == 0 {
		t.Errorf("walship_partial_bytes_total %v, want the stored size %d", got, f.bus.archived[0].CompressedSize)
	}
	if got := testutil.ToFloat64(m.Segments.WithLabelValues("db1")) + testutil.ToFloat64(m.RawBytes.WithLabelValues("db1")); got != 0 {
		t.Errorf("a range counted as a segment: %v", got)
	}

	// The segment's first range, read from the receiver's spool: the long
	// header and the system identifier are checked.
	spool := filepath.Join(t.TempDir(), seg.Name(mb)+".00000000-00002100.range")
	if err := os.WriteFile(spool, f.raw[:0x2100], 0o600); err != nil {
		t.Fatal(err)
	}
	a, err := New(Config{Codec: compress.Zstd, Layout: f.a.cfg.Layout, Dest: "file:///x", KeepAlive: -1, ReadSpool: true, Metrics: m}, f.bus, f.sink)
	if err != nil {
		t.Fatal(err)
	}
	f.a = a
	ev = f.rangeOf(f.raw, seg, 0, 0x2100)
	ev.Object, ev.Spool = "", spool
	if _, out := f.handle(t, ev, 1); out != Acked {
		t.Fatalf("range from the spool: %v", out)
	}
	if raw, _ := f.stored(t, f.bus.archived[1].Key); !bytes.Equal(raw, f.raw[:0x2100]) {
		t.Fatal("range from the spool stored other bytes")
	}
}

// A redelivered range found in the sink is confirmed without an upload,
// even when its bytes are gone.
func TestRangeRedeliveredFoundInSink(t *testing.T) {
	f := newFixture(t)
	ev := f.rangeOf(f.raw, pipeline.Segment{Timeline: 1, No: 5}, 8192, 3*8192)
	if _, out := f.handle(t, ev, 1); out != Acked {
		t.Fatalf("first delivery: %v", out)
	}
	f.sink.err = errors.New("must not upload again")
	for _, redeliver := range []func(*pipeline.SegmentEvent) uint64{
		func(*pipeline.SegmentEvent) uint64 { return 2 },                    // redelivered
		func(ev *pipeline.SegmentEvent) uint64 { ev.Attempt = 1; return 1 }, // published again
	} {
		ev := ev
		n := redeliver(&ev)
		if d, out := f.handle(t, ev, n); out != Acked || d.answer != "ack" {
			t.Fatalf("redelivery: %v", out)
		}
	}
	if len(f.bus.archived) != 3 || !f.bus.archived[1].Existed || !f.bus.archived[2].Existed || f.bus.archived[2].Key != f.bus.archived[0].Key {
		t.Fatalf("confirmations %+v", f.bus.archived)
	}
	if got := testutil.ToFloat64(f.a.cfg.Metrics.PartialUploads.WithLabelValues("db1")); got != 1 {
		t.Errorf("walship_partial_uploads_total %v, want 1 (found ones are not uploads)", got)
	}
}

// Other bytes at a range's key: never overwritten, never confirmed.
func TestRangeConflict(t *testing.T) {
	f := newFixture(t)
	ev := f.rangeOf(f.raw, pipeline.Segment{Timeline: 1, No: 5}, 8192, 3*8192)
	key := sinks.BarmanCloud{Prefix: "p", Server: "db1"}.RangeKey(ev.File, 8192, 3*8192, ".zst")
	if err := f.sink.Sink.Put(context.Background(), key, []byte("other"), sinks.Metadata{SHA256: "ff"}); err != nil {
		t.Fatal(err)
	}
	for n := uint64(1); n <= 2; n++ {
		if d, out := f.handle(t, ev, n); out != Naked || d.delay != 5*time.Minute {
			t.Fatalf("delivery %d: %v after %s, want a nak after 5m", n, out, d.delay)
		}
	}
	if len(f.bus.archived) != 0 {
		t.Fatalf("a conflicting range was confirmed: %+v", f.bus.archived)
	}
	if meta, err := f.sink.Head(context.Background(), key); err != nil || meta.SHA256 != "ff" {
		t.Errorf("the conflicting object was overwritten: %+v, %v", meta, err)
	}
	if got := testutil.ToFloat64(f.a.cfg.Metrics.Conflicts.WithLabelValues("db1")); got != 2 {
		t.Errorf("conflicts counter %v, want 2", got)
	}
}

// A range whose bytes fail the SHA-256, a page header inside it, or the
// system identifier goes back to the receiver: terminated, not archived.
func TestRangeCorrupt(t *testing.T) {
	seg := pipeline.Segment{Timeline: 1, No: 5}
	for _, c := range []struct {
		name     string
		from, to uint64
		off      int  // the byte flipped
		bit      byte // the bits flipped in it
		after    bool // flipped after the event's SHA-256 was taken (else before)
	}{
		{"sha256", 100, 3 * 8192, 5000, 1, true},
		{"page magic", 100, 3 * 8192, 2 * 8192, 1, false},
		{"page address", 8192, 3 * 8192, 2*8192 + 9, 1, false},
		{"timeline", 8192, 3 * 8192, 2*8192 + 4, 1, false},
		{"header cut by the range's end", 8192, 2*8192 + 16, 2*8192 + 15, 1, false},
		{"no long header", 0, 8192, 2, 2, false},
		{"system id", 0, 8192, 24, 1, false},
		{"segment size", 0, 8192, 33, 1, false},
	} {
		t.Run(c.name, func(t *testing.T) {
			f := newFixture(t)
			raw := append([]byte(nil), f.raw...)
			if !c.after {
				raw[c.off] ^= c.bit
			}
			ev := f.rangeOf(raw, seg, c.from, c.to)
			if c.after {
				f.bus.objects[ev.Object][uint64(c.off)-c.from] ^= c.bit
			}
			if d, out := f.handle(t, ev, 1); out != Termed || d.answer != "term" {
				t.Fatalf("corrupt range: %v", out)
			}
			if len(f.bus.archived) != 0 {
				t.Fatal("a corrupt range was confirmed")
			}
			if keys := f.list(t, "p/db1/walship-partial/"); len(keys) != 0 {
				t.Fatalf("stored %v", keys)
			}
			if got := testutil.ToFloat64(f.a.cfg.Metrics.Corrupt.WithLabelValues("db1")); got != 1 {
				t.Errorf("corrupt counter %v", got)
			}
		})
	}
}

// list lists the fixture's sink under prefix.
func (f *fixture) list(t *testing.T, prefix string) []string {
	t.Helper()
	var keys []string
	if err := f.sink.Sink.(sinks.Lister).List(context.Background(), prefix, func(o sinks.Object) error {
		keys = append(keys, o.Key)
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	return keys
}

// Once the whole segment (or an ended timeline's last segment) that may
// have ranges is archived, its ranges go, and only its own.
func TestRangesDeletedAfterSegment(t *testing.T) {
	f := newFixture(t)
	seg5, seg6 := pipeline.Segment{Timeline: 1, No: 5}, pipeline.Segment{Timeline: 1, No: 6}
	raw6 := walgen.Segment(seg6, 1<<40, walgen.History{{TLI: 1}}, 42, mb)
	for _, ev := range []pipeline.SegmentEvent{
		f.rangeOf(f.raw, seg5, 0, 0x2100), f.rangeOf(f.raw, seg5, 0x2100, 0x5000),
		f.rangeOf(f.raw, seg5, 0, 0x5000), // a restarted receiver's, overlapping
		f.rangeOf(raw6, seg6, 0, 0x2000),
	} {
		if _, out := f.handle(t, ev, 1); out != Acked {
			t.Fatalf("range %s: %v", ev.RangeName(), out)
		}
	}
	layout := sinks.BarmanCloud{Prefix: "p", Server: "db1"}
	prefix5, prefix6 := layout.RangePrefix(seg5.Name(mb)), layout.RangePrefix(seg6.Name(mb))
	m := f.a.cfg.Metrics

	// Without Ranges the receiver cut none: nothing is listed or deleted.
	if _, out := f.handle(t, f.ev, 1); out != Acked {
		t.Fatalf("segment: %v", out)
	}
	if keys := f.list(t, prefix5); len(keys) != 3 {
		t.Fatalf("ranges after a segment without Ranges: %v", keys)
	}
	ev := f.ev
	ev.Ranges = true
	if _, out := f.handle(t, ev, 2); out != Acked {
		t.Fatalf("segment with ranges: %v", out)
	}
	if keys := f.list(t, prefix5); len(keys) != 0 {
		t.Fatalf("ranges left after their segment was archived: %v", keys)
	}
	if keys := f.list(t, prefix6); len(keys) != 1 {
		t.Fatalf("another segment's ranges: %v", keys)
	}
	if raw, _ := f.stored(t, f.key); !bytes.Equal(raw, f.raw) {
		t.Fatal("the whole segment is not intact")
	}
	if got := testutil.ToFloat64(m.PartialDeleted.WithLabelValues("db1")); got != 3 {
		t.Errorf("walship_partial_deleted_total %v, want 3", got)
	}

	// The last segment of an ended timeline.
	end := seg6.StartLSN(mb) + 0x3000
	rawp := walgen.Segment(seg6, end, walgen.History{{TLI: 1}}, 42, mb)
	sum := sha256.Sum256(rawp)
	p := f.ev
	p.Kind, p.File, p.StartLSN, p.EndLSN, p.SHA256, p.Object, p.Ranges = pipeline.KindPartial, seg6.Name(mb), seg6.StartLSN(mb), end,
		pipeline.SHA256Hex(sum[:]), "db1/"+seg6.Name(mb)+".partial", true
	f.bus.objects[p.Object] = rawp
	if _, out := f.handle(t, p, 1); out != Acked {
		t.Fatalf("partial: %v", out)
	}
	if keys := f.list(t, prefix6); len(keys) != 0 {
		t.Fatalf("ranges left after the ended timeline's last segment was archived: %v", keys)
	}
	if raw, _ := f.stored(t, layout.Key(seg6.Name(mb)+".partial", ".zst")); !bytes.Equal(raw, rawp) {
		t.Fatal("the .partial is not intact")
	}
	if got := testutil.ToFloat64(m.PartialDeleted.WithLabelValues("db1")); got != 4 {
		t.Errorf("walship_partial_deleted_total %v, want 4", got)
	}
}

// The fixture's sink lists and deletes as the file sink under it does.
func (s *failSink) List(ctx context.Context, prefix string, fn func(sinks.Object) error) error {
	return s.Sink.(sinks.Lister).List(ctx, prefix, fn)
}

func (s *failSink) Delete(ctx context.Context, key string) error {
	return s.Sink.(sinks.Deleter).Delete(ctx, key)
}

// noDelete is a sink whose deletes fail.
type noDelete struct{ *failSink }

func (s noDelete) Delete(ctx context.Context, key string) error {
	return errors.New("403 access denied")
}

// Deleting ranges is best effort: a failure is counted, the segment is
// confirmed all the same.
func TestRangeDeletionFailureIsBestEffort(t *testing.T) {
	f := newFixture(t)
	a, err := New(Config{Codec: compress.Zstd, Layout: f.a.cfg.Layout, Dest: "file:///x", KeepAlive: -1, Metrics: f.a.cfg.Metrics},
		f.bus, noDelete{f.sink})
	if err != nil {
		t.Fatal(err)
	}
	f.a = a
	seg := pipeline.Segment{Timeline: 1, No: 5}
	if _, out := f.handle(t, f.rangeOf(f.raw, seg, 0, 0x2000), 1); out != Acked {
		t.Fatalf("range: %v", out)
	}
	ev := f.ev
	ev.Ranges = true
	if d, out := f.handle(t, ev, 1); out != Acked || d.answer != "ack" || len(f.bus.archived) != 2 {
		t.Fatalf("segment whose ranges cannot be deleted: %v", out)
	}
	if got := testutil.ToFloat64(f.a.cfg.Metrics.Errors.WithLabelValues("db1", "ranges")); got != 1 {
		t.Errorf("errors{stage=ranges} %v, want 1", got)
	}
	if got := testutil.ToFloat64(f.a.cfg.Metrics.PartialDeleted.WithLabelValues("db1")); got != 0 {
		t.Errorf("walship_partial_deleted_total %v, want 0", got)
	}
}
