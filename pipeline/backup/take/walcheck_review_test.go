package take

import (
	"context"
	"testing"

	"github.com/walship/walship/pipeline"
	"github.com/walship/walship/sinks"
	filesink "github.com/walship/walship/sinks/file"
)

func reviewWALCheck(t *testing.T) (func(string), sinks.Layout, *filesink.Sink) {
	t.Helper()
	fs, err := filesink.New(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	layout := sinks.BarmanCloud{Prefix: "p", Server: "s"}
	put := func(key string) {
		t.Helper()
		if err := fs.Put(context.Background(), key, []byte("x"), sinks.Metadata{SHA256: hashHex([]byte("x"))}); err != nil {
			t.Fatal(err)
		}
	}
	return put, layout, fs
}

// REVIEW FINDING 1
// A backup of a standby whose upstream was promoted while the backup ran
// starts on timeline 1 and ends on timeline 2; the switch lies inside
// segment 6, and the backup ends in segment 6 after the switch. The bucket
// holds timeline 1's segments 3..5 and the ended timeline's
// 000000010000000000000006.partial (which stops at the switch point), but
// NOT timeline 2's segment 6, which alone holds the WAL from the switch to
// the end LSN. walCheck takes timeline 1's .partial for the end segment and
// reports nothing missing, so `walship backup` writes backup.json for a
// backup whose end-of-backup WAL is not in the bucket.
func TestReviewWALCheckOldTimelinePartialIsNotTheEndSegment(t *testing.T) {
	const mb = pipeline.SegmentSize(1 << 20)
	put, layout, fs := reviewWALCheck(t)
	seg := func(tli uint32, no uint64) string { return pipeline.Segment{Timeline: tli, No: no}.Name(mb) }
	start, end := pipeline.LSN(3<<20+100), pipeline.LSN(6<<20+5000) // switch 1->2 at 6<<20+1000
	put(layout.Key(seg(1, 3), ".zst"))
	put(layout.Key(seg(1, 4), ".zst"))
	put(layout.Key(seg(1, 5), ".zst"))
	put(layout.Key(seg(1, 6)+".partial", ".zst"))
	c := newWALCheck(fs, layout, mb, 1, 2, start, end)
	m, err := c.missing(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if m != seg(2, 6) {
		t.Fatalf("missing %q: timeline 1's .partial of segment 6 ends at the switch point, the WAL up to %s on timeline 2 is not in the bucket; want %s missing", m, end, seg(2, 6))
	}
}

// REVIEW FINDING 1 (same cause, a middle segment)
// The switch lies inside segment 5 and the backup ends in segment 7 on
// timeline 2. Timeline 2's segment 5 (the only copy of the WAL between the
// switch and the end of segment 5) is missing; timeline 1's .partial of
// segment 5 is taken in its place.
func TestReviewWALCheckSwitchSegmentMustComeFromNewTimeline(t *testing.T) {
	const mb = pipeline.SegmentSize(1 << 20)
	put, layout, fs := reviewWALCheck(t)
	seg := func(tli uint32, no uint64) string { return pipeline.Segment{Timeline: tli, No: no}.Name(mb) }
	start, end := pipeline.LSN(3<<20+100), pipeline.LSN(7<<20+5000) // switch 1->2 inside segment 5
	put(layout.Key(seg(1, 3), ".zst"))
	put(layout.Key(seg(1, 4), ".zst"))
	put(layout.Key(seg(1, 5)+".partial", ".zst"))
	put(layout.Key(seg(2, 6), ".zst"))
	put(layout.Key(seg(2, 7), ".zst"))
	c := newWALCheck(fs, layout, mb, 1, 2, start, end)
	m, err := c.missing(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if m != seg(2, 5) {
		t.Fatalf("missing %q, want %s: the WAL after the switch inside segment 5 is only in timeline 2's copy", m, seg(2, 5))
	}
}

// REVIEW FINDING 6
// A long standby backup that sees two upstream promotions ends on timeline
// 3; the WAL between the two switches exists only on timeline 2. walCheck
// looks at the end and start timelines only, so it never finds segment 5
// (on timeline 2) and the backup waits until --timeout (default 6 h) and
// fails, although the bucket holds everything recovery needs.
func TestReviewWALCheckIntermediateTimeline(t *testing.T) {
	const mb = pipeline.SegmentSize(1 << 20)
	put, layout, fs := reviewWALCheck(t)
	seg := func(tli uint32, no uint64) string { return pipeline.Segment{Timeline: tli, No: no}.Name(mb) }
	start, end := pipeline.LSN(3<<20+100), pipeline.LSN(6<<20+5000)
	// 1 -> 2 at the start of segment 5, 2 -> 3 at the start of segment 6.
	put(layout.Key(seg(1, 3), ".zst"))
	put(layout.Key(seg(1, 4), ".zst"))
	put(layout.Key(seg(2, 5), ".zst"))
	put(layout.Key(seg(3, 6), ".zst"))
	c := newWALCheck(fs, layout, mb, 1, 3, start, end)
	m, err := c.missing(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if m != "" {
		t.Fatalf("missing %q: timeline 2's segment 5 is in the bucket, but only timelines 3 and 1 are looked at", m)
	}
}
