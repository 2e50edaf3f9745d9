package receiver

// Adversarial review of the range (sub-segment upload) change: each test
// here demonstrates one finding of /tmp/review-findings.txt and fails
// until it is fixed.

import (
	"testing"
	"time"

	"github.com/walship/walship/pipeline"
)

// confirmRange confirms every published event of kind k not confirmed yet.
func confirmKinds(c *Core, pub *fakePub, from int, kinds ...pipeline.Kind) {
	for _, ev := range pub.events[from:] {
		for _, k := range kinds {
			if ev.Kind == k {
				c.Archived(pipeline.ArchivedEvent{SegmentEvent: ev, Key: "k", Dest: "s3://b/p"})
			}
		}
	}
}

// Finding: flush moves back at a timeline switch. The old timeline's
// segment is archived in ranges up to the switch point and flush reports
// it; EndTimeline queues the new timeline's history file with its hold at
// the start of the switch segment, and the new timeline's first range
// (cut from offset 0 again) holds there too: flush falls back to the
// segment's start, below what it already reported, though inherit() was
// meant to prevent exactly that.
func TestReviewFlushMovesBackAtTimelineSwitch(t *testing.T) {
	clk := &fakeClock{t: time.Unix(1e9, 0)}
	c := newRangeCore(t, t.TempDir(), clk)
	if err := c.Start(StartInput{Slot: SlotState{Exists: true, RestartLSN: 5 << 20, Timeline: 1}, ServerTLI: 1, ServerPos: 5 << 20, History: serverHistory}); err != nil {
		t.Fatal(err)
	}
	pub := &fakePub{}
	stream(t, c, hist[1].Begin)
	if err := c.EndTimeline(2, hist[1].Begin, historyContent(2)); err != nil {
		t.Fatal(err)
	}
	seg9 := pipeline.LSN(9 << 20)
	stream(t, c, seg9+3000)
	clk.t = clk.t.Add(6 * time.Second)
	syncAndCut(t, c)
	stream(t, c, hist[2].Begin) // 9<<20 + 5000: timeline 2 ends here
	syncAndCut(t, c)
	publishAll(t, c, pub)
	confirmAll(c, pub)
	before := c.Flush()
	if before != hist[2].Begin {
		t.Fatalf("flush %s with timeline 2's ranges of segment 9 confirmed to the switch point, want %s", before, hist[2].Begin)
	}
	if err := c.EndTimeline(3, hist[2].Begin, historyContent(3)); err != nil {
		t.Fatal(err)
	}
	if f := c.Flush(); f < before {
		t.Errorf("flush moved back from %s to %s at the switch to timeline 3 (the history file's hold is the segment's start)", before, f)
	}
	n := len(pub.events)
	publishAll(t, c, pub)
	confirmKinds(c, pub, n, pipeline.KindHistory, pipeline.KindPartial)
	// Timeline 3 writes segment 9 again from its start and cuts a range
	// from offset 0: pending, it holds flush at the segment's start.
	stream(t, c, seg9+8000)
	clk.t = clk.t.Add(6 * time.Second)
	syncAndCut(t, c)
	if f := c.Flush(); f < before {
		t.Errorf("flush moved back from %s to %s once timeline 3 cut its first range of segment 9 (its hold is offset 0)", before, f)
	}
}

// Finding: a whole segment whose confirmation came first (an earlier life
// of the receiver archived it; the tracker remembers it as "early") is
// taken out of the spool when it completes, but its pending ranges are not
// dropped as confirm() drops them: they stay pending and hold flush inside
// a segment the bucket holds whole, they are still uploaded after the
// archiver that archived the whole segment deleted its ranges (so they
// are left in the bucket for good), and the segment's spans are never
// freed.
func TestReviewEarlyWholeConfirmationKeepsRangesPending(t *testing.T) {
	clk := &fakeClock{t: time.Unix(1e9, 0)}
	in := StartInput{Slot: SlotState{Exists: true, RestartLSN: 5 << 20, Timeline: 1}, ServerTLI: 1, ServerPos: 5 << 20}
	// An earlier life (its own spool, lost since) archived segment 5 whole.
	c1 := newRangeCore(t, t.TempDir(), clk)
	if err := c1.Start(in); err != nil {
		t.Fatal(err)
	}
	stream(t, c1, 6<<20+10)
	pub1 := &fakePub{}
	publishAll(t, c1, pub1)
	var whole pipeline.SegmentEvent
	for _, ev := range pub1.events {
		if ev.Kind == pipeline.KindSegment && ev.StartLSN == 5<<20 {
			whole = ev
		}
	}
	if whole.File == "" {
		t.Fatal("no event of segment 5 from the first life")
	}
	c1.Release()

	c := newRangeCore(t, t.TempDir(), clk)
	if err := c.Start(in); err != nil {
		t.Fatal(err)
	}
	stream(t, c, 5<<20+4000)
	clk.t = clk.t.Add(6 * time.Second)
	syncAndCut(t, c)
	pub := &fakePub{}
	publishAll(t, c, pub)
	if len(rangesOf(pub.events)) != 1 {
		t.Fatalf("no range cut")
	}
	// The earlier life's confirmation is replayed while 5 is being written.
	c.Archived(pipeline.ArchivedEvent{SegmentEvent: whole, Key: "k", Dest: "s3://b/p"})
	stream(t, c, 6<<20+10)
	if p := c.Positions(); p.PendingFiles != 0 {
		t.Errorf("%d files pending after segment 5 completed with its whole confirmation already in: its range should have left with it", p.PendingFiles)
	}
	if f := c.Flush(); f != 6<<20 {
		t.Errorf("flush %s, want 0/600000: the bucket holds segment 5 whole, yet its range holds flush", f)
	}
}

// Finding: confirm() matches a range confirmation by MsgID (file, offset
// within the segment by the event's own SegSize, length), SHA-256 and
// destination, then records the span from the confirmation's StartLSN and
// EndLSN and computes its segment from them with the receiver's size. A
// confirmation that carries another segment size passes Validate and
// names the same MsgID with LSNs in another segment: the pending range
// leaves without the bucket holding it where it belongs, and a span is
// credited to a segment the bucket holds nothing of; when the frontier
// gets there, flush passes WAL the bucket lacks.
func TestReviewRangeConfirmationWithOtherSegSize(t *testing.T) {
	tr := newTracker(mb, 5<<20, 5<<20, "s3://b/p")
	seg := pipeline.Segment{Timeline: 1, No: 5}
	ev := segEvent(1, 5)
	ev.Kind, ev.StartLSN, ev.EndLSN, ev.Size = pipeline.KindRange, seg.StartLSN(mb), seg.StartLSN(mb)+4000, 4000
	tr.add(ev, ev.StartLSN)
	forged := archivedOf(ev)
	forged.SegSize = 2 << 20 // the same file name is segment 5 at 0/A00000 with 2 MB segments
	forged.StartLSN, forged.EndLSN = 10<<20, 10<<20+4000
	if err := forged.SegmentEvent.Validate(); err != nil {
		t.Fatalf("the forged confirmation does not pass Validate (so DecodeArchivedEvent would drop it): %v", err)
	}
	if forged.MsgID() != ev.MsgID() {
		t.Fatalf("MsgID %s, pending %s", forged.MsgID(), ev.MsgID())
	}
	res, _, _, _ := tr.confirm(forged)
	if res == confirmOK {
		t.Errorf("a confirmation with segment size %d and LSNs %s-%s confirmed the range %s-%s of a %d-byte segment",
			forged.SegSize, forged.StartLSN, forged.EndLSN, ev.StartLSN, ev.EndLSN, uint64(mb))
	}
	// Segments 5 to 9 are archived whole (not modelled); the frontier is at 10.
	tr.setFrontierOn(1, 10<<20)
	if f := pipeline.LSN(tr.flush.Load()); f > 10<<20 {
		t.Errorf("flush %s inside segment 10, of which the bucket holds nothing", f)
	}
}

// Finding: a receiver restarted with --partial-interval 0 (ranges turned
// off after a run that cut some) publishes the segment its earlier run
// cut ranges of without Ranges, so no archiver ever deletes those range
// objects: they stay in the bucket for good. (Open and addFound mark a
// segment as possibly ranged only when ranges are on now.)
func TestReviewRangesOffAfterRangesOnLeavesThemForGood(t *testing.T) {
	dir := t.TempDir()
	clk := &fakeClock{t: time.Unix(1e9, 0)}
	in := StartInput{Slot: SlotState{Exists: true, RestartLSN: 5 << 20, Timeline: 1}, ServerTLI: 1, ServerPos: 5 << 20}
	c1 := newRangeCore(t, dir, clk)
	if err := c1.Start(in); err != nil {
		t.Fatal(err)
	}
	stream(t, c1, 5<<20+4000)
	clk.t = clk.t.Add(6 * time.Second)
	syncAndCut(t, c1)
	pub1 := &fakePub{}
	publishAll(t, c1, pub1)
	confirmAll(c1, pub1) // the range is in the bucket
	c1.Release()

	c2, err := NewCore(CoreConfig{Server: "s", SystemID: "42", Size: mb, Dir: dir, Dest: "s3://b/p", Now: clk.now})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c2.Release)
	if err := c2.Start(in); err != nil {
		t.Fatal(err)
	}
	stream(t, c2, 6<<20+10)
	pub := &fakePub{}
	publishAll(t, c2, pub)
	for _, ev := range pub.events {
		if ev.Kind == pipeline.KindSegment && ev.StartLSN == 5<<20 && !ev.Ranges {
			t.Errorf("segment 5, of which the bucket holds a range of the previous run, published without Ranges: the range is never deleted")
		}
	}
}
