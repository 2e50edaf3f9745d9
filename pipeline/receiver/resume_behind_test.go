package receiver

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/walship/walship/pipeline"
)

// Found by the simulation (seeds 2901, 3961 with base backups): the
// segment being written is also complete in the spool from an earlier
// life; once the bucket holds it whole, flush passes it, the server may
// remove it, and a reconnect would stream it again from its start. The
// receiver must plan again instead (Receiver.reconnect, ResumeBehind).
func TestResumeBehindTheSlot(t *testing.T) {
	dir := t.TempDir()
	c1 := newTestCore(t, dir, nil)
	slot := SlotState{Exists: true, Physical: true, RestartLSN: 5 << 20, Timeline: 1}
	if err := c1.Start(StartInput{Slot: slot, ServerTLI: 1, ServerPos: 8 << 20, History: serverHistory}); err != nil {
		t.Fatal(err)
	}
	stream(t, c1, 7<<20+100) // segments 5 and 6 complete, 7 being written
	c1.Release()
	// Segment 5's spool file is lost (an operator freed the disk); the
	// next life streams it again and, past it, segment 6 again too.
	seg5 := pipeline.Segment{Timeline: 1, No: 5}.Name(mb)
	if err := os.Remove(filepath.Join(dir, seg5)); err != nil {
		t.Fatal(err)
	}
	c2 := newTestCore(t, dir, nil)
	if err := c2.Start(StartInput{Slot: slot, ServerTLI: 1, ServerPos: 8 << 20, History: serverHistory}); err != nil {
		t.Fatal(err)
	}
	if _, start := c2.Resume(); start != 5<<20 {
		t.Fatalf("resumes at %s, want 0/500000", start)
	}
	stream(t, c2, 6<<20+100)
	pub := &fakePub{}
	publishAll(t, c2, pub)
	confirmAll(c2, pub)
	_, start := c2.Resume()
	if c2.Flush() < 7<<20 || start != 6<<20 {
		t.Fatalf("flush %s, resume %s: the scenario did not arise", c2.Flush(), start)
	}
	if !c2.ResumeBehind(c2.Flush()) {
		t.Fatalf("flush %s passed the segment at %s being written, but ResumeBehind says streaming again from it is fine", c2.Flush(), start)
	}
	if c2.ResumeBehind(6 << 20) {
		t.Fatal("ResumeBehind with the slot in the segment being written")
	}
}
