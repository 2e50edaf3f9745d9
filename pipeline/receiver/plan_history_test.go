package receiver

import (
	"reflect"
	"testing"

	"github.com/walship/walship/pipeline"
)

// TestPlanHistories: the plan names the history files of the timelines it
// streams without seeing them begin, and only those (review 2, finding 1).
func TestPlanHistories(t *testing.T) {
	onBoundary := []pipeline.HistoryEntry{{Parent: 1, Switch: 7 << 20}}
	two := []pipeline.HistoryEntry{{Parent: 1, Switch: 7 << 20}, {Parent: 2, Switch: 9<<20 + 300}}
	cases := []struct {
		name string
		in   planInput
		tli  uint32
		want []timelineSwitch
	}{
		{
			name: "slot on a switch on a segment boundary",
			in:   planInput{slot: SlotState{Exists: true, RestartLSN: 7 << 20, Timeline: 1}, serverTLI: 2, serverPos: 8 << 20, serverHistory: onBoundary},
			tli:  2, want: []timelineSwitch{{2, 7 << 20}},
		},
		{
			name: "whole spool segments carry the start onto the switch",
			in: planInput{slot: SlotState{Exists: true, RestartLSN: 5 << 20, Timeline: 1}, serverTLI: 2, serverPos: 8 << 20, serverHistory: onBoundary,
				spool: listing{complete: []spoolFile{complete(1, 5), complete(1, 6)}}},
			tli: 2, want: []timelineSwitch{{2, 7 << 20}},
		},
		{
			// Streaming starts on timeline 1 below the switch: the server
			// ends it and EndTimeline follows.
			name: "streaming from below the switch",
			in:   planInput{slot: SlotState{Exists: true, RestartLSN: 6 << 20, Timeline: 1}, serverTLI: 2, serverPos: 8 << 20, serverHistory: onBoundary},
			tli:  1,
		},
		{
			name: "switch inside a segment, slot at it",
			in:   planInput{slot: SlotState{Exists: true, RestartLSN: 7<<20 + 300, Timeline: 1}, serverTLI: 2, serverPos: 8 << 20, serverHistory: tl2},
			tli:  1,
		},
		{
			name: "the slot passed the switch",
			in:   planInput{slot: SlotState{Exists: true, RestartLSN: 8 << 20, Timeline: 2}, serverTLI: 2, serverPos: 9 << 20, serverHistory: onBoundary},
			tli:  2,
		},
		{
			// Timeline 2 is streamed from its start; the server ends it
			// inside segment 9 and EndTimeline archives timeline 3's.
			name: "two switches, the first on the slot",
			in:   planInput{slot: SlotState{Exists: true, RestartLSN: 7 << 20, Timeline: 1}, serverTLI: 3, serverPos: 10 << 20, serverHistory: two},
			tli:  2, want: []timelineSwitch{{2, 7 << 20}},
		},
		{
			name: "the spool carries the start over both switches",
			in: planInput{slot: SlotState{Exists: true, RestartLSN: 7 << 20, Timeline: 1}, serverTLI: 3, serverPos: 11 << 20, serverHistory: two,
				spool: listing{complete: []spoolFile{complete(2, 7), complete(2, 8), complete(3, 9)}}},
			tli: 3, want: []timelineSwitch{{2, 7 << 20}, {3, 9<<20 + 300}},
		},
	}
	for _, c := range cases {
		c.in.size = mb
		p := makePlan(c.in)
		if p.tli != c.tli || !reflect.DeepEqual(p.histories, c.want) {
			t.Errorf("%s: timeline %d, histories %v; want %d, %v", c.name, p.tli, p.histories, c.tli, c.want)
		}
	}
}

// TestCoreSwitchOnBoundaryHoldsFlush: the history queued at start-up holds
// flush at the switch until its own confirmation, and flush never moves
// back; a restart before that finds it in the spool and queues it once.
func TestCoreSwitchOnBoundaryHoldsFlush(t *testing.T) {
	dir := t.TempDir()
	boundary := func(tli uint32) ([]byte, error) {
		return []byte("1\t0/700000\tno recovery target specified\n"), nil
	}
	slot := SlotState{Exists: true, Physical: true, RestartLSN: 7 << 20, Timeline: 1}
	in := StartInput{Slot: slot, ServerTLI: 2, ServerPos: 9 << 20, History: boundary}
	c := newTestCore(t, dir, nil)
	if err := c.Start(in); err != nil {
		t.Fatal(err)
	}
	if tli, start := c.Resume(); tli != 2 || start != 7<<20 {
		t.Fatalf("resume %d/%s, want 2/0/700000", tli, start)
	}
	stream(t, c, 9<<20+100) // timeline 2's segments 7 and 8
	pub := &fakePub{}
	publishAll(t, c, pub)
	var hist pipeline.SegmentEvent
	for _, ev := range pub.events {
		if ev.Kind == pipeline.KindHistory {
			hist = ev
			continue
		}
		c.Archived(pipeline.ArchivedEvent{SegmentEvent: ev, Key: "k", Dest: "s3://b/p"})
	}
	if hist.Timeline != 2 || hist.Attempt != 1 {
		t.Fatalf("history event %+v, want timeline 2's, attempt 1", hist)
	}
	if c.Flush() != 7<<20 {
		t.Fatalf("flush %s with 00000002.history unconfirmed, want 0/700000", c.Flush())
	}
	c.Release()

	// A restart: the history is pending in the spool, queued once, still
	// holding flush.
	c = newTestCore(t, dir, nil)
	if err := c.Start(in); err != nil {
		t.Fatal(err)
	}
	pub = &fakePub{}
	publishAll(t, c, pub)
	n := 0
	for _, ev := range pub.events {
		if ev.Kind == pipeline.KindHistory {
			n++
		}
	}
	if n != 1 || c.Flush() != 7<<20 {
		t.Fatalf("after a restart: %d history events, flush %s; want 1, 0/700000", n, c.Flush())
	}
	confirmAll(c, pub)
	if c.Flush() != 9<<20 {
		t.Fatalf("flush %s once everything is confirmed, want 0/900000", c.Flush())
	}
}
