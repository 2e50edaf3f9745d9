package retention

import (
	"context"
	"io"
	"testing"
	"time"

	"github.com/walship/walship/pipeline"
	"github.com/walship/walship/pipeline/backup"
	"github.com/walship/walship/pipeline/backup/retention/retentiontest"
	"github.com/walship/walship/sinks/file"
)

// REVIEW2 FINDING 2
//
// The fix of review finding 5 keeps an incomplete backup's chunks when its
// catalogue appeared between prune's Scan and Execute (Result.Completed),
// but the plan's WAL floor was computed without that backup: it was
// DeleteIncomplete, so its start LSN did not lower the floor. Execute goes
// on to delete the WAL below the floor, which includes the WAL from the
// just-completed backup's start. Timeline: a long `walship backup
// --timeout 48h` started 25 h ago (older than --incomplete-after 24h); a
// newer backup completed meanwhile; `prune --keep 1` scans; the long
// backup writes its catalogue, its stillThere sees the marker and every
// chunk (prune has not deleted anything yet) and exits 0; prune deletes
// the marker, finds the catalogue (Completed), and deletes the WAL. The
// backup the operator was told succeeded can never be restored (PostgreSQL:
// could not find WAL for the checkpoint).
func TestReview2PruneDeletesWALOfBackupCompletedDuringPrune(t *testing.T) {
	ctx := context.Background()
	fs, layout := reviewBucket(t, 1, 20)
	base := time.Date(2026, 11, 1, 0, 0, 0, 0, time.UTC)
	reviewBackup(t, fs, layout, 3, base, false)
	runningAt := base.Add(time.Hour)
	id := reviewBackup(t, fs, layout, 8, runningAt, true) // still running
	now := runningAt.Add(25 * time.Hour)
	reviewBackup(t, fs, layout, 12, now.Add(-2*time.Hour), false) // a newer backup, complete

	st, err := Scan(ctx, fs, layout, Options{})
	if err != nil {
		t.Fatal(err)
	}
	plan, err := NewPlan(st, Policy{Keep: 1, IncompleteAfter: 24 * time.Hour, Now: now})
	if err != nil {
		t.Fatal(err)
	}
	// The long backup completes now (its catalogue as take writes it).
	other, err := file.New(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	if _, err := retentiontest.Write(ctx, other, layout, retentiontest.Spec{ID: id,
		Server: "db", SystemID: "7", SegSize: uint64(testSeg), Timeline: 1,
		StartLSN: pipeline.LSN(testSeg)*8 + 0x28, EndLSN: pipeline.LSN(testSeg)*8 + 0x5000,
		StartTime: runningAt, EndTime: now}); err != nil {
		t.Fatal(err)
	}
	key := backup.CatalogKey(layout.BackupPrefix(), id)
	rc, _, err := other.Get(ctx, key)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(rc)
	rc.Close()
	put(t, fs, key, body)

	res, err := Execute(ctx, fs, st, plan)
	if err != nil {
		return // refusing to go on is right
	}
	if _, err := fs.Head(ctx, key); err != nil {
		return // the backup is gone as a whole: consistent
	}
	if _, err := fs.Head(ctx, segKey(layout, 8)); err != nil {
		t.Fatalf("prune left backup %s complete (Completed %v) but deleted segment 8, the WAL from its start (floor %s): a backup that reported success cannot restore",
			id, res.Completed, plan.Floor)
	}
}
