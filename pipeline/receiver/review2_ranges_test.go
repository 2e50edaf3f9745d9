package receiver

// Second adversarial review of the range (sub-segment upload) change: each
// test here demonstrates one finding of /tmp/review2-findings.txt and fails
// until it is fixed.

import (
	"testing"
	"time"

	"github.com/walship/walship/pipeline"
)

// Finding R2-1 (receiver side; see also pipeline/restore
// TestReviewFetchNewTimelineShortOwnRanges): after a timeline switch
// inside segment 9, flush is at the switch point by the old timeline's
// ranges (inherited), but the new timeline's first range of segment 9 is
// cut from offset 0 to whatever is fsynced when the timer fires, possibly
// below the switch point. A restore of 00000003…09 stitches only timeline
// 3's own ranges from offset 0 and serves that range zero-padded:
// PostgreSQL takes it (it does not ask for the older timeline's file once
// the newer one was found) and recovery ends below the flush the slot was
// given.
func TestReviewNewTimelineRangeEndsBelowSwitch(t *testing.T) {
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
	stream(t, c, hist[2].Begin) // timeline 2 ends at 9<<20 + 5000
	syncAndCut(t, c)
	publishAll(t, c, pub)
	confirmAll(c, pub)
	if err := c.EndTimeline(3, hist[2].Begin, historyContent(3)); err != nil {
		t.Fatal(err)
	}
	// Timeline 3 is streamed again from segment 9's start; the timer fires
	// while the catch-up has reached 9<<20 + 2000 only.
	n := len(pub.events)
	stream(t, c, seg9+2000)
	clk.t = clk.t.Add(6 * time.Second)
	syncAndCut(t, c)
	publishAll(t, c, pub)
	confirmAll(c, pub)
	// What a restore of timeline 3's segment 9 gets from its own ranges:
	// the contiguous run from offset 0.
	end := seg9
	for moved := true; moved; {
		moved = false
		for _, ev := range rangesOf(pub.events[n:]) {
			if ev.Timeline == 3 && ev.StartLSN <= end && ev.EndLSN > end {
				end, moved = ev.EndLSN, true
			}
		}
	}
	if end > seg9 && c.Flush() > end {
		t.Errorf("flush %s, but timeline 3's ranges of segment 9 (what fetch --allow-partial serves for it) hold WAL to %s only", c.Flush(), end)
	}
}

// Finding R2-2: ranges an earlier run (or the receiver a --standby took
// over from) cut of a segment past the slot's segment stay in the bucket
// for good. That run's flush was held in an earlier segment (still
// pending) while it cut ranges of the segment being written; a run that
// starts without that spool (spool lost, another host's standby) starts
// at the slot's segment, catches up too fast to cut anything, and
// publishes the later segment without Ranges, so no archiver deletes its
// ranges. Only the first segment (Open) and spool files are marked.
func TestReviewRangesOfEarlierRunPastSlotSegmentLeftBehind(t *testing.T) {
	clk := &fakeClock{t: time.Unix(1e9, 0)}
	c := newRangeCore(t, t.TempDir(), clk)
	// The earlier run wrote to 6/80000 and cut ranges of segment 6 while
	// segment 5 was not confirmed: the slot is at 5's start. The server's
	// position at start is past everything that run can have cut.
	if err := c.Start(StartInput{Slot: SlotState{Exists: true, RestartLSN: 5 << 20, Timeline: 1}, ServerTLI: 1, ServerPos: 6<<20 + 0x80000, History: serverHistory}); err != nil {
		t.Fatal(err)
	}
	pub := &fakePub{}
	stream(t, c, 7<<20+100)
	publishAll(t, c, pub)
	for _, ev := range pub.events {
		if ev.Kind == pipeline.KindSegment && ev.StartLSN == 6<<20 && !ev.Ranges {
			t.Errorf("segment %s (the server had WAL in it when this run started, so an earlier run may have cut ranges of it) published without Ranges: its ranges in the bucket are never deleted", ev.File)
		}
	}
}

// Finding R2-4: every segment completed with its confirmation already
// known (tracker.early: a takeover or a restart catching up WAL another
// receiver or an earlier life archived) leaves a full span in
// tracker.spans for good. The completion callback adds the segment while
// it is still the frontier, so dropRanges keeps "a full span for the
// frontier segment", and nothing ever deletes it: memory and the O(n)
// scans in dropRanges grow with every segment of the catch-up.
func TestReviewEarlyWholeConfirmationsLeakSpans(t *testing.T) {
	clk := &fakeClock{t: time.Unix(1e9, 0)}
	start := StartInput{Slot: SlotState{Exists: true, RestartLSN: 5 << 20, Timeline: 1}, ServerTLI: 1, ServerPos: 5 << 20, History: serverHistory}
	a := newRangeCore(t, t.TempDir(), clk)
	if err := a.Start(start); err != nil {
		t.Fatal(err)
	}
	pub := &fakePub{}
	stream(t, a, 7<<20+100)
	publishAll(t, a, pub)

	b := newRangeCore(t, t.TempDir(), clk) // takes over with its own spool
	if err := b.Start(start); err != nil {
		t.Fatal(err)
	}
	confirmAll(b, pub) // a's confirmations, replayed: early for b
	stream(t, b, 7<<20+100)
	b.tr.mu.Lock()
	n := len(b.tr.spans)
	b.tr.mu.Unlock()
	if n > 1 {
		t.Errorf("%d segments' spans kept after two segments completed already archived; want at most the frontier's", n)
	}
}
