package retention

import (
	"context"
	"testing"
	"time"

	"github.com/walship/walship/pipeline"
	"github.com/walship/walship/pipeline/backup/retention/retentiontest"
)

// REVIEW2 FINDING 6
//
// Window follows the newest timeline whose history branches off the
// backup's timeline at or after the backup's START (legs: e.Switch >=
// c.StartLSN); for a backup that starts and ends on one timeline it never
// checks that the branch lies after its END. A PITR creates such a branch:
// backup B (segment 3) restored to a point in segment 15 (to undo a bad
// DELETE) made timeline 2 at 0/F00100, which production now runs on.
// Backup A ran on timeline 1 from segment 10 to segment 16, past the
// branch. Recovery of A can never get onto timeline 2: the branch point
// lies before A's end, so replay switches to timeline 2 before it sees A's
// backup-end record ("WAL ends before end of online backup"); A restores
// only timeline 1 (with the bad DELETE). Window nevertheless has A reach
// far into timeline 2, not broken: `prune --keep 1` keeps A as the newest
// restorable backup and deletes B and the WAL below A's start, leaving no
// backup that can restore the timeline production runs on.
func TestReview2PruneKeepsBackupThatCannotReachThePITRBranch(t *testing.T) {
	ctx := context.Background()
	fs, layout := reviewBucket(t, 1, 20) // timeline 1, segments 1..20
	S := pipeline.LSN(testSeg)
	sw := 15*S + 0x100
	put(t, fs, layout.Key(pipeline.HistoryFileName(2), ""), []byte("1\t0/F00100\tbefore the bad DELETE\n"))
	for no := uint64(15); no <= 22; no++ {
		name := pipeline.Segment{Timeline: 2, No: no}.Name(testSeg)
		put(t, fs, layout.Key(name, ".zst"), []byte(name))
	}
	base := time.Date(2026, 11, 1, 0, 0, 0, 0, time.UTC)
	b := reviewBackup(t, fs, layout, 3, base, false)
	a, err := retentiontest.Write(ctx, fs, layout, retentiontest.Spec{
		Server: "db", SystemID: "7", SegSize: uint64(testSeg), Timeline: 1,
		StartLSN: 10*S + 0x28, EndLSN: 16*S + 0x5000,
		StartTime: base.Add(24 * time.Hour), EndTime: base.Add(25 * time.Hour),
	})
	if err != nil {
		t.Fatal(err)
	}
	st, err := Scan(ctx, fs, layout, Options{})
	if err != nil {
		t.Fatal(err)
	}
	plan, err := NewPlan(st, Policy{Keep: 1, IncompleteAfter: 24 * time.Hour, Now: base.Add(48 * time.Hour)})
	if err != nil {
		return // refusing is right
	}
	for _, k := range plan.Keep {
		if k.ID == b {
			return
		}
	}
	var aw Window
	for _, x := range st.Backups {
		if x.ID == a && x.Window != nil {
			aw = *x.Window
		}
	}
	t.Fatalf("prune --keep 1 keeps only %s (window to %s on timeline %d, broken %v) and deletes %s, the only backup that restores timeline 2 (branched at %s, before %s ended); WAL floor %s",
		a, aw.EndLSN, aw.Timeline, aw.Broken, b, sw, a, plan.Floor)
}
