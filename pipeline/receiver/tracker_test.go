package receiver

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/walship/walship/pipeline"
)

const mb = pipeline.SegmentSize(1 << 20)

func archived(tli uint32, no uint64) pipeline.ArchivedEvent {
	seg := pipeline.Segment{Timeline: tli, No: no}
	return pipeline.ArchivedEvent{SegmentEvent: pipeline.SegmentEvent{
		SystemID: "1", Timeline: tli, File: seg.Name(mb), Kind: pipeline.KindSegment,
		StartLSN: seg.StartLSN(mb), EndLSN: seg.EndLSN(mb),
	}, Key: "k"}
}

// Across a timeline switch the flush stays on the old timeline until it is
// archived up to the switch segment, then follows the new one.
func TestTrackerTimelineChain(t *testing.T) {
	tr := newTracker(mb, pipeline.Segment{Timeline: 1, No: 10}, 10<<20)
	tr.confirm(archived(1, 10))
	// Timeline 2 starts in segment 12 (the switch point is inside it).
	tr.switchTimeline(pipeline.Segment{Timeline: 2, No: 12})
	steps := []struct {
		ev   pipeline.ArchivedEvent
		want pipeline.LSN
	}{
		{archived(2, 12), 11 << 20}, // timeline 1 still owes segment 11
		{archived(2, 13), 11 << 20},
		{archived(1, 11), 14 << 20}, // now the chain is whole: 2/12 and 2/13 count
		{archived(1, 12), 14 << 20}, // the old timeline's copy of 12 changes nothing
		{archived(2, 15), 14 << 20}, // a gap at 14 holds the flush
		{archived(2, 14), 16 << 20},
	}
	for i, s := range steps {
		tr.confirm(s.ev)
		if got := pipeline.LSN(tr.flush.Load()); got != s.want {
			t.Errorf("step %d (%s): flush %s, want %s", i, s.ev.File, got, s.want)
		}
	}
}

func TestTrackerFloorAndRequeue(t *testing.T) {
	// A slot restart_lsn inside segment 5: the flush never goes below it.
	tr := newTracker(mb, pipeline.Segment{Timeline: 1, No: 5}, 5<<20+100)
	if got := pipeline.LSN(tr.flush.Load()); got != 5<<20+100 {
		t.Fatalf("initial flush %s", got)
	}
	ev := archived(1, 5).SegmentEvent
	tr.add(ev)
	if got, ok := tr.next(context.Background()); !ok || got.File != ev.File {
		t.Fatalf("next: %v %v", got.File, ok)
	}
	tr.markPublished(ev, time.Now().Add(-time.Hour))
	if n := tr.requeueStale(time.Now(), time.Minute); n != 1 {
		t.Errorf("requeued %d stale segments, want 1", n)
	}
	if n := tr.requeueStale(time.Now(), time.Minute); n != 0 {
		t.Errorf("requeued an already queued segment")
	}
	tr.confirm(archived(1, 5))
	if tr.isPending(ev) {
		t.Error("confirmed segment still pending")
	}
}

func TestShutdownDetector(t *testing.T) {
	var d shutdownDetector
	// Caught up, flush behind, replies requested again and again: stopping.
	hit := false
	for i := 0; i < 5; i++ {
		hit = d.ping(true, 100, 100, 50)
	}
	if !hit {
		t.Error("five reply requests in a row with nothing to send were not seen as a shutdown")
	}
	// Normal keepalives: no reply requested, or data still coming.
	d = shutdownDetector{}
	for i := 0; i < 10; i++ {
		if d.ping(i%2 == 0, 100, 100, 50) || d.ping(true, 200, 100, 50) {
			t.Fatal("ordinary keepalives taken for a shutdown")
		}
	}
}

func TestParseSize(t *testing.T) {
	for in, want := range map[string]uint64{"16MB": 16 << 20, "1GB": 1 << 30, "1024kB": 1 << 20, "1048576": 1 << 20} {
		if got, err := parseSize(in); err != nil || got != want {
			t.Errorf("parseSize(%q) = %d, %v", in, got, err)
		}
	}
	if err := scrub(errTest("connect postgres://u:secret@h/db failed")); strings.Contains(err.Error(), "secret") {
		t.Errorf("scrub left the password: %v", err)
	}
}

type errTest string

func (e errTest) Error() string { return string(e) }
