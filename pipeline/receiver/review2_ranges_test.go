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
