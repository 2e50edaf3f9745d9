package receiver

import (
	"strings"
	"testing"
	"time"

	"github.com/walship/walship/pipeline"
)

const mb = pipeline.SegmentSize(1 << 20)

func segEvent(tli uint32, no uint64) pipeline.SegmentEvent {
	seg := pipeline.Segment{Timeline: tli, No: no}
	return pipeline.SegmentEvent{
		V: 1, Server: "s", SystemID: "1", Timeline: tli, File: seg.Name(mb), Kind: pipeline.KindSegment,
		StartLSN: seg.StartLSN(mb), EndLSN: seg.EndLSN(mb), Size: int64(mb), SegSize: uint64(mb),
		SHA256: strings.Repeat("a", 64),
	}
}

func archivedOf(ev pipeline.SegmentEvent) pipeline.ArchivedEvent {
	return pipeline.ArchivedEvent{SegmentEvent: ev, Key: "k", Dest: "s3://b/p"}
}

// Flush is the lowest pending hold, whatever the order of confirmations.
func TestTrackerFlushIsTheOldestPending(t *testing.T) {
	tr := newTracker(mb, 5<<20, 5<<20, "s3://b/p")
	var evs []pipeline.SegmentEvent
	for no := uint64(5); no < 9; no++ {
		ev := segEvent(1, no)
		evs = append(evs, ev)
		tr.add(ev, ev.StartLSN)
		tr.setFrontier(ev.EndLSN)
	}
	steps := []struct {
		confirm int
		want    pipeline.LSN
	}{{2, 5 << 20}, {0, 6 << 20}, {3, 6 << 20}, {1, 9 << 20}}
	for _, s := range steps {
		if res, _, _, _ := tr.confirm(archivedOf(evs[s.confirm])); res != confirmOK {
			t.Fatalf("confirm %s: %v", evs[s.confirm].File, res)
		}
		if got := pipeline.LSN(tr.flush.Load()); got != s.want {
			t.Errorf("after %s: flush %s, want %s", evs[s.confirm].File, got, s.want)
		}
	}
}

// Defect 6: a confirmation moves nothing unless its bytes and destination
// match the pending file.
func TestTrackerConfirmMustMatch(t *testing.T) {
	tr := newTracker(mb, 5<<20, 5<<20, "s3://b/p")
	ev := segEvent(1, 5)
	tr.add(ev, ev.StartLSN)
	tr.setFrontier(6 << 20)
	wrongSum := archivedOf(ev)
	wrongSum.SHA256 = strings.Repeat("b", 64)
	wrongDest := archivedOf(ev)
	wrongDest.Dest = "s3://old/p"
	for _, c := range []struct {
		ev     pipeline.ArchivedEvent
		reason string
	}{{wrongSum, "sha256"}, {wrongDest, "dest"}} {
		if res, reason, path, _ := tr.confirm(c.ev); res != confirmMismatch || reason != c.reason || len(path) != 0 {
			t.Errorf("confirm with a wrong %s: %v %q %d", c.reason, res, reason, len(path))
		}
	}
	if got := pipeline.LSN(tr.flush.Load()); got != 5<<20 {
		t.Fatalf("flush moved to %s on mismatched confirmations", got)
	}
	if res, _, _, moved := tr.confirm(archivedOf(ev)); res != confirmOK || !moved {
		t.Fatalf("matching confirmation: %v moved=%v", res, moved)
	}
	if res, _, _, _ := tr.confirm(archivedOf(ev)); res != confirmStale {
		t.Errorf("duplicate confirmation: %v, want stale", res)
	}
}

// The floor: a slot created inside segment 5 keeps flush at its
// restart_lsn, never below.
func TestTrackerFloor(t *testing.T) {
	tr := newTracker(mb, 5<<20+100, 5<<20, "")
	ev := segEvent(1, 5)
	tr.add(ev, ev.StartLSN)
	if got := pipeline.LSN(tr.flush.Load()); got != 5<<20+100 {
		t.Fatalf("flush %s, want the floor", got)
	}
}

// Late confirmations are checked, in order of their holds, once per
// interval; a check that finds the event still queued restarts the timer.
func TestTrackerRequeueStale(t *testing.T) {
	tr := newTracker(mb, 0, 5<<20, "")
	t0 := time.Unix(1000, 0)
	for _, no := range []uint64{7, 5, 6} {
		ev := segEvent(1, no)
		tr.add(ev, ev.StartLSN)
		it, ok := tr.tryNext()
		if !ok || it.check {
			t.Fatalf("next: %+v %v", it, ok)
		}
		tr.markPublished(it.ev, no*10, t0)
	}
	if n := tr.requeueStale(t0.Add(time.Minute), 5*time.Minute); n != 0 {
		t.Fatalf("requeued %d before the interval", n)
	}
	if n := tr.requeueStale(t0.Add(5*time.Minute), 5*time.Minute); n != 3 {
		t.Fatalf("requeued %d, want 3", n)
	}
	for _, want := range []uint64{5, 6, 7} {
		it, ok := tr.tryNext()
		if !ok || !it.check || it.ev.File != segEvent(1, want).File || it.seq != want*10 {
			t.Fatalf("next check: %+v %v, want segment %d seq %d", it, ok, want, want*10)
		}
		tr.markPublished(it.ev, it.seq, t0.Add(5*time.Minute))
	}
	if n := tr.requeueStale(t0.Add(6*time.Minute), 5*time.Minute); n != 0 {
		t.Errorf("requeued %d right after the checks", n)
	}
}

func TestShutdownDetector(t *testing.T) {
	var d shutdownDetector
	now := time.Unix(0, 0)
	// Caught up, flush behind, replies requested again and again: stopping.
	hit := false
	for i := 0; i < 5; i++ {
		hit = d.ping(now.Add(time.Duration(i)*100*time.Millisecond), true, 100, 100, 50)
	}
	if !hit {
		t.Error("five reply requests in a row with nothing to send were not seen as a shutdown")
	}
	// Normal keepalives: no reply requested, or data still coming.
	d = shutdownDetector{}
	for i := 0; i < 10; i++ {
		if d.ping(now, i%2 == 0, 100, 100, 50) || d.ping(now, true, 200, 100, 50) {
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
