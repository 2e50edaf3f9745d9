package receiver

import (
	"testing"

	"github.com/walship/walship/pipeline"
)

// REVIEW2 FINDING 1
//
// A promotion right after an XLOG_SWITCH (archive_timeout on an idle
// primary, pg_switch_wal before a planned failover) puts the switch point
// exactly on a segment boundary. The receiver had archived timeline 1 up
// to that boundary (flush = 0/700000 = the switch) when it lost the
// connection; the server it comes back to is on timeline 2. The replan of
// f825cbe (ResumeBehind) and a plain process restart both go through
// makePlan with restart_lsn = the switch: owner(0/700000) is timeline 2, so
// streaming starts on timeline 2 and the server never answers "end of
// timeline 1" - EndTimeline never runs, and 00000002.history is never
// written to the spool nor published. Flush then moves over timeline 2's
// WAL while the bucket has no 00000002.history: a restore with
// recovery_target_timeline = latest stays on timeline 1 and ends at the
// switch, silently without everything written on timeline 2.
func TestReview2SwitchOnSegmentBoundaryArchivesHistory(t *testing.T) {
	dir := t.TempDir()
	c1 := newTestCore(t, dir, nil)
	if err := c1.Start(StartInput{Slot: SlotState{Exists: true, Physical: true, RestartLSN: 5 << 20, Timeline: 1}, ServerTLI: 1, ServerPos: 5 << 20, History: serverHistory}); err != nil {
		t.Fatal(err)
	}
	stream(t, c1, 7<<20) // timeline 1 segments 5 and 6, ending with the XLOG_SWITCH
	pub := &fakePub{}
	publishAll(t, c1, pub)
	confirmAll(c1, pub)
	if c1.Flush() != 7<<20 {
		t.Fatalf("flush %s, want 0/700000: the scenario did not arise", c1.Flush())
	}
	c1.Release()

	// The server was promoted: timeline 2 begins at 0/700000.
	boundary := func(tli uint32) ([]byte, error) {
		return []byte("1\t0/700000\tno recovery target specified\n"), nil
	}
	c2 := newTestCore(t, dir, nil)
	slot := SlotState{Exists: true, Physical: true, RestartLSN: 7 << 20, Timeline: 1}
	if err := c2.Start(StartInput{Slot: slot, ServerTLI: 2, ServerPos: 7<<20 + 4096, History: boundary}); err != nil {
		t.Fatal(err)
	}
	tli, start := c2.Resume()
	stream(t, c2, 8<<20+100) // timeline 2's first segment, whole
	pub2 := &fakePub{}
	publishAll(t, c2, pub2)
	confirmAll(c2, pub2)
	history := false
	for _, ev := range pub2.events {
		if ev.Kind == pipeline.KindHistory && ev.Timeline == 2 {
			history = true
		}
	}
	if !history {
		t.Fatalf("resumed on timeline %d at %s and flush reached %s over timeline 2's WAL, but 00000002.history was never published (events %d): the bucket cannot restore timeline 2",
			tli, start, c2.Flush(), len(pub2.events))
	}
}
