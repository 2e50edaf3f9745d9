package retention

import (
	"context"
	"io"
	"strings"
	"testing"
	"time"

	"github.com/walship/walship/pipeline"
	"github.com/walship/walship/pipeline/backup"
	"github.com/walship/walship/pipeline/backup/retention/retentiontest"
	"github.com/walship/walship/sinks/file"
)

// An incomplete backup that completes between the plan and Execute lowers
// the WAL floor to its start segment: exactly the WAL below it goes, and
// the plan says so. A catalogue that appeared but cannot be read stops the
// prune before any WAL.
func TestExecuteLowersFloorForBackupCompletedMeanwhile(t *testing.T) {
	for _, readable := range []bool{true, false} {
		ctx := context.Background()
		fs, layout := reviewBucket(t, 1, 20)
		base := time.Date(2026, 11, 1, 0, 0, 0, 0, time.UTC)
		reviewBackup(t, fs, layout, 3, base, false)
		runningAt := base.Add(time.Hour)
		id := reviewBackup(t, fs, layout, 8, runningAt, true)
		now := runningAt.Add(25 * time.Hour)
		reviewBackup(t, fs, layout, 12, now.Add(-2*time.Hour), false)
		st, err := Scan(ctx, fs, layout, Options{})
		if err != nil {
			t.Fatal(err)
		}
		plan, err := NewPlan(st, Policy{Keep: 1, IncompleteAfter: 24 * time.Hour, Now: now})
		if err != nil {
			t.Fatal(err)
		}
		if plan.Floor != 12*pipeline.LSN(testSeg) {
			t.Fatalf("planned floor %s, want segment 12's start", plan.Floor)
		}
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
		if !readable {
			body = []byte(`{"v": 99}`)
		}
		put(t, fs, key, body)

		res, err := Execute(ctx, fs, st, plan)
		if !readable {
			if err == nil || !strings.Contains(err.Error(), "no WAL deleted") || res.WAL != 0 {
				t.Fatalf("unreadable catalogue: err %v, %d WAL deleted; want an error before any WAL", err, res.WAL)
			}
			for no := uint64(1); no <= 20; no++ {
				if _, err := fs.Head(ctx, segKey(layout, no)); err != nil {
					t.Fatalf("unreadable catalogue: segment %d deleted", no)
				}
			}
			continue
		}
		if err != nil {
			t.Fatal(err)
		}
		if len(res.Completed) != 1 || res.Completed[0] != id {
			t.Fatalf("Completed %v, want %s", res.Completed, id)
		}
		if plan.Floor != 8*pipeline.LSN(testSeg) || !strings.Contains(plan.FloorReason, id) || res.WAL != 7 || len(plan.WAL) != 7 {
			t.Fatalf("floor %s (%s), %d WAL deleted, plan.WAL %d; want segment 8's start and segments 1-7", plan.Floor, plan.FloorReason, res.WAL, len(plan.WAL))
		}
		for no := uint64(1); no <= 20; no++ {
			_, err := fs.Head(ctx, segKey(layout, no))
			if gone := err != nil; gone != (no < 8) {
				t.Fatalf("segment %d: deleted %v, want %v", no, gone, no < 8)
			}
		}
	}
}
