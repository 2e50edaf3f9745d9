package receiver

import (
	"bytes"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/walship/walship/internal/walgen"
	"github.com/walship/walship/pipeline"
)

// fakeClock is a settable clock for the Core.
type fakeClock struct{ t time.Time }

func (c *fakeClock) now() time.Time { return c.t }

func newRangeCore(t *testing.T, dir string, clk *fakeClock) *Core {
	t.Helper()
	c, err := NewCore(CoreConfig{Server: "s", SystemID: "42", Size: mb, Dir: dir, Dest: "s3://b/p",
		PartialInterval: 5 * time.Second, Now: clk.now})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Release)
	return c
}

// syncAndCut fsyncs (as a status update does) and cuts a range.
func syncAndCut(t *testing.T, c *Core) {
	t.Helper()
	if _, _, err := c.Status(); err != nil {
		t.Fatal(err)
	}
	if err := c.CutRange(); err != nil {
		t.Fatal(err)
	}
}

func rangesOf(evs []pipeline.SegmentEvent) []pipeline.SegmentEvent {
	var out []pipeline.SegmentEvent
	for _, ev := range evs {
		if ev.Kind == pipeline.KindRange {
			out = append(out, ev)
		}
	}
	return out
}

// Ranges: a quiet segment is cut only once it is PartialInterval old; each
// range holds only the new bytes, exactly the WAL; flush moves inside the
// segment as they are confirmed, in order only; the whole segment's hold
// starts where the confirmed ranges end, so flush never moves back; its
// confirmation takes its pending ranges out of the spool.
func TestCoreRanges(t *testing.T) {
	dir := t.TempDir()
	clk := &fakeClock{t: time.Unix(1e9, 0)}
	c := newRangeCore(t, dir, clk)
	if err := c.Start(StartInput{Slot: SlotState{Exists: true, RestartLSN: 5 << 20, Timeline: 1}, ServerTLI: 1, ServerPos: 5 << 20}); err != nil {
		t.Fatal(err)
	}
	pub := &fakePub{}
	seg := pipeline.Segment{Timeline: 1, No: 5}
	start := seg.StartLSN(mb)
	stream(t, c, start+1000)
	syncAndCut(t, c)
	publishAll(t, c, pub)
	if n := len(rangesOf(pub.events)); n != 0 {
		t.Fatalf("%d ranges cut from a segment begun less than the interval ago", n)
	}
	clk.t = clk.t.Add(5 * time.Second)
	syncAndCut(t, c)
	stream(t, c, start+70000)
	syncAndCut(t, c)
	stream(t, c, start+90000)
	syncAndCut(t, c)
	syncAndCut(t, c) // nothing new: no range
	publishAll(t, c, pub)
	rs := rangesOf(pub.events)
	if len(rs) != 3 {
		t.Fatalf("%d ranges, want 3: %+v", len(rs), rs)
	}
	want := []pipeline.LSN{start, start + 1000, start + 70000, start + 90000}
	full := make([]byte, 90000)
	walgen.Fill(full, start, 1, start+90000, hist, 42, mb)
	for i, r := range rs {
		if r.StartLSN != want[i] || r.EndLSN != want[i+1] || r.File != seg.Name(mb) || r.Validate() != nil {
			t.Fatalf("range %d: %s-%s of %s (%v), want %s-%s", i, r.StartLSN, r.EndLSN, r.File, r.Validate(), want[i], want[i+1])
		}
		data, err := os.ReadFile(r.Spool)
		if err != nil || !bytes.Equal(data, full[r.StartLSN-start:r.EndLSN-start]) {
			t.Fatalf("range %d's spool file does not hold its WAL (%v)", i, err)
		}
	}
	arch := func(ev pipeline.SegmentEvent) {
		c.Archived(pipeline.ArchivedEvent{SegmentEvent: ev, Key: "k", Dest: "s3://b/p"})
	}
	arch(rs[1]) // out of order: the bucket has a hole below it
	if f := c.Flush(); f != start {
		t.Fatalf("flush %s after a range with a hole before it, want %s", f, start)
	}
	arch(rs[0])
	if f := c.Flush(); f != start+70000 {
		t.Fatalf("flush %s, want %s", f, start+70000)
	}
	if lag := c.LagSeconds(clk.t, start+90000); lag > 5.5 {
		t.Errorf("lag %.1f s with the ranges to 70000 archived", lag)
	}
	// The segment completes; its whole event asks for its ranges' deletion.
	stream(t, c, seg.EndLSN(mb)+10)
	publishAll(t, c, pub)
	whole := pub.events[len(pub.events)-1]
	if whole.Kind != pipeline.KindSegment || whole.File != seg.Name(mb) || !whole.Ranges {
		t.Fatalf("last event %+v, want segment %s with Ranges", whole, seg.Name(mb))
	}
	if f := c.Flush(); f != start+70000 {
		t.Fatalf("flush %s once the segment is complete, want it to stay at %s", f, start+70000)
	}
	arch(rs[2])
	if f := c.Flush(); f != start+90000 {
		t.Fatalf("flush %s, want %s: the whole segment's hold follows its ranges", f, start+90000)
	}
	arch(whole)
	if f := c.Flush(); f != seg.EndLSN(mb) {
		t.Fatalf("flush %s after the whole segment, want %s", f, seg.EndLSN(mb))
	}
	// A range still pending when its whole segment is confirmed leaves the
	// spool with it, and holds nothing.
	next := seg.Next()
	clk.t = clk.t.Add(6 * time.Second)
	stream(t, c, next.StartLSN(mb)+5000)
	syncAndCut(t, c)
	stream(t, c, next.EndLSN(mb))
	publishAll(t, c, pub)
	if last := pub.events[len(pub.events)-1]; last.Kind != pipeline.KindSegment || last.File != next.Name(mb) {
		t.Fatalf("last event %+v, want segment %s", last, next.Name(mb))
	} else {
		arch(last)
	}
	if f := c.Flush(); f != next.EndLSN(mb) {
		t.Fatalf("flush %s with only a range of a confirmed segment pending, want %s", f, next.EndLSN(mb))
	}
	left, _ := filepath.Glob(filepath.Join(dir, "*.range*"))
	if len(left) != 0 {
		t.Errorf("range files left in the spool: %v", left)
	}
}

// A busy server: a segment filled within the interval is never cut.
func TestCoreNoRangesWhenBusy(t *testing.T) {
	clk := &fakeClock{t: time.Unix(1e9, 0)}
	c := newRangeCore(t, t.TempDir(), clk)
	if err := c.Start(StartInput{Slot: SlotState{Exists: true, RestartLSN: 5 << 20, Timeline: 1}, ServerTLI: 1, ServerPos: 5 << 20}); err != nil {
		t.Fatal(err)
	}
	pub := &fakePub{}
	for i := 0; i < 8; i++ {
		stream(t, c, pipeline.LSN(5<<20+(i+1)*(1<<19)))
		clk.t = clk.t.Add(2 * time.Second)
		syncAndCut(t, c)
	}
	publishAll(t, c, pub)
	if rs := rangesOf(pub.events); len(rs) != 0 {
		t.Fatalf("%d ranges cut on a server filling a segment every 4 s with a 5 s interval", len(rs))
	}
}

// A restart finds the ranges a crashed run left: valid ones are published
// again (the archivers look in the bucket first), damaged ones removed.
func TestCoreRangesAfterRestart(t *testing.T) {
	dir := t.TempDir()
	clk := &fakeClock{t: time.Unix(1e9, 0)}
	c := newRangeCore(t, dir, clk)
	in := StartInput{Slot: SlotState{Exists: true, RestartLSN: 5 << 20, Timeline: 1}, ServerTLI: 1, ServerPos: 5 << 20}
	if err := c.Start(in); err != nil {
		t.Fatal(err)
	}
	start := pipeline.LSN(5 << 20)
	stream(t, c, start+4000)
	clk.t = clk.t.Add(6 * time.Second)
	syncAndCut(t, c)
	stream(t, c, start+9000)
	syncAndCut(t, c)
	c.Release()
	names, _ := filepath.Glob(filepath.Join(dir, "*.range"))
	if len(names) != 2 {
		t.Fatalf("range files %v, want 2", names)
	}
	if err := os.WriteFile(names[1], []byte("damaged"), 0o600); err != nil {
		t.Fatal(err)
	}
	c2 := newRangeCore(t, dir, clk)
	if err := c2.Start(in); err != nil {
		t.Fatal(err)
	}
	pub := &fakePub{}
	publishAll(t, c2, pub)
	rs := rangesOf(pub.events)
	if len(rs) != 1 || rs[0].StartLSN != start || rs[0].EndLSN != start+4000 || rs[0].Attempt == 0 {
		t.Fatalf("after restart published ranges %+v, want the one whole range to %s, attempt > 0", rs, start+4000)
	}
	if _, err := os.Stat(names[1]); !os.IsNotExist(err) {
		t.Errorf("damaged range file still in the spool: %v", err)
	}
}
