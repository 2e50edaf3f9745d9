package receiver

import (
	"testing"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/walship/walship/pipeline"
)

// Confirmations of base backup chunks (walship backup) travel on the same
// archived subject as WAL; the receiver ignores them without a trace: no
// "ignored" count, no effect on flush, nothing remembered for later.
func TestCoreIgnoresBackupConfirmations(t *testing.T) {
	c := newTestCore(t, t.TempDir(), nil)
	if err := c.Start(StartInput{Slot: SlotState{Exists: true, RestartLSN: 5 << 20, Timeline: 1}, ServerTLI: 1, ServerPos: 5 << 20, History: serverHistory}); err != nil {
		t.Fatal(err)
	}
	stream(t, c, 8<<20+100)
	pub := &fakePub{}
	publishAll(t, c, pub)
	if len(pub.events) < 3 {
		t.Fatalf("published %d files", len(pub.events))
	}
	// Confirm only the first segment: flush moves to its end.
	c.Archived(pipeline.ArchivedEvent{SegmentEvent: pub.events[0], Key: "k", Dest: "s3://b/p"})
	flush := c.Flush()
	if flush != 6<<20 {
		t.Fatalf("flush %s after the first confirmation", flush)
	}
	ignored := func() float64 {
		n := 0.0
		for _, r := range []string{"sha256", "dest", "position", "undecodable"} {
			n += testutil.ToFloat64(c.cfg.Metrics.Ignored.WithLabelValues("s", r))
		}
		return n
	}
	before := ignored()
	// A flood of backup confirmations, one named like a pending segment,
	// others with other destinations and bytes.
	for i := range maxEarly + 50 {
		ev := pipeline.ArchivedEvent{SegmentEvent: pipeline.SegmentEvent{V: 1, Server: "s", SystemID: "42", Timeline: 1,
			File: "20261129T210000Z/base/000001", Kind: pipeline.KindBackup, StartLSN: 6 << 20, EndLSN: 6 << 20,
			Size: 10, SegSize: uint64(mb), SHA256: pub.events[1].SHA256}, Key: "p/s/walship-backups/x", Dest: "s3://b/p"}
		if i%2 == 1 {
			ev.File, ev.Dest = pub.events[1].File, "s3://other/p"
		}
		c.Archived(ev)
	}
	if got := ignored(); got != before {
		t.Fatalf("backup confirmations counted as ignored: %v -> %v", before, got)
	}
	if got := c.Flush(); got != flush {
		t.Fatalf("flush moved from %s to %s on backup confirmations", flush, got)
	}
	c.tr.mu.Lock()
	early := len(c.tr.early)
	c.tr.mu.Unlock()
	if early != 0 {
		t.Fatalf("%d backup confirmations remembered as early WAL confirmations", early)
	}
	// The WAL confirmations still work afterwards.
	confirmAll(c, pub)
	if got := c.Flush(); got != 8<<20 {
		t.Fatalf("flush %s after every WAL confirmation, want 0/800000", got)
	}
}
