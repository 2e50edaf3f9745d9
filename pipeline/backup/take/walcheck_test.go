package take

import (
	"context"
	"testing"

	"github.com/walship/walship/pipeline"
	"github.com/walship/walship/sinks"
	filesink "github.com/walship/walship/sinks/file"
)

// The WAL a backup needs, start to end, counts as archived only when every
// segment is there whole (any codec), as an ended timeline's .partial, or,
// for the last one, as ranges reaching the end.
func TestWALCheck(t *testing.T) {
	const mb = pipeline.SegmentSize(1 << 20)
	ctx := context.Background()
	fs, err := filesink.New(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	layout := sinks.BarmanCloud{Prefix: "p", Server: "s"}
	const sys = "7300000000000000042"
	putAs := func(key, sysID string) {
		t.Helper()
		if err := fs.Put(ctx, key, []byte("x"), sinks.Metadata{SHA256: hashHex([]byte("x")), SystemID: sysID}); err != nil {
			t.Fatal(err)
		}
	}
	put := func(key string) { t.Helper(); putAs(key, sys) }
	seg := func(tli uint32, no uint64) string { return pipeline.Segment{Timeline: tli, No: no}.Name(mb) }
	start, end := pipeline.LSN(3<<20+100), pipeline.LSN(6<<20+5000) // segments 3..6
	c := newWALCheck(fs, layout, sys, mb, 1, 1, start, end)
	missing := func() string {
		t.Helper()
		m, err := c.missing(ctx)
		if err != nil {
			t.Fatal(err)
		}
		return m
	}
	if m := missing(); m != seg(1, 3) {
		t.Fatalf("empty bucket: missing %q", m)
	}
	// Someone else's object at the segment's key (a conflict the archivers
	// refuse to overwrite) is not this server's WAL.
	putAs(layout.Key(seg(1, 3), ".zst"), "")
	putAs(layout.Key(seg(1, 3), ".gz"), "6900000000000000001")
	if m := missing(); m != seg(1, 3) {
		t.Fatalf("a foreign object at the key: missing %q", m)
	}
	put(layout.Key(seg(1, 3), ""))
	put(layout.Key(seg(1, 4), ".gz"))
	put(layout.Key(seg(1, 5)+".partial", ".zst"))
	if m := missing(); m != seg(1, 6) {
		t.Fatalf("missing %q, want the last segment", m)
	}
	// Ranges of the last segment that stop short of the end, then reach it.
	put(layout.RangeKey(seg(1, 6), 0, 0x1000, ".zst"))
	if m := missing(); m != seg(1, 6) {
		t.Fatalf("ranges short of the end: missing %q", m)
	}
	put(layout.RangeKey(seg(1, 6), 0x800, 0x2000, ".zst"))
	if m := missing(); m != "" {
		t.Fatalf("ranges reaching the end: missing %q", m)
	}

	// A backup that ended on timeline 2: its segments there, or the start
	// timeline's before the switch.
	c = newWALCheck(fs, layout, sys, mb, 1, 2, start, 8<<20)
	if m := missing(); m != seg(2, 6) {
		t.Fatalf("timeline 2: missing %q (ranges count for the last segment only)", m)
	}
	put(layout.Key(seg(1, 6), ".zst"))
	if m := missing(); m != seg(2, 7) {
		t.Fatalf("timeline 2: missing %q", m)
	}
	put(layout.Key(seg(2, 7), ".zst"))
	if m := missing(); m != "" {
		t.Fatalf("timeline 2: missing %q", m)
	}
}
