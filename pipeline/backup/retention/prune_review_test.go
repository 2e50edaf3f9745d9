package retention

import (
	"context"
	"io"
	"testing"
	"time"

	"github.com/walship/walship/pipeline"
	"github.com/walship/walship/pipeline/backup"
	"github.com/walship/walship/pipeline/backup/retention/retentiontest"
	"github.com/walship/walship/sinks"
	"github.com/walship/walship/sinks/file"
)

// reviewBucket is a bucket with an identity and timeline 1's segments
// first..last (1 MiB segments), except those in skip.
func reviewBucket(t *testing.T, first, last uint64, skip ...uint64) (*file.Sink, sinks.Layout) {
	t.Helper()
	fs, err := file.New(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	layout := sinks.BarmanCloud{Prefix: "pre", Server: "db"}
	id := sinks.Identity{SystemID: "7", SegmentSize: uint64(testSeg), Server: "db"}
	put(t, fs, layout.IdentityKey(), id.Body())
next:
	for no := first; no <= last; no++ {
		for _, s := range skip {
			if s == no {
				continue next
			}
		}
		name := pipeline.Segment{Timeline: 1, No: no}.Name(testSeg)
		put(t, fs, layout.Key(name, ".zst"), []byte(name))
	}
	return fs, layout
}

func reviewBackup(t *testing.T, fs sinks.Sink, layout sinks.Layout, startSeg uint64, at time.Time, incomplete bool) string {
	t.Helper()
	S := pipeline.LSN(testSeg)
	id, err := retentiontest.Write(context.Background(), fs, layout, retentiontest.Spec{
		Server: "db", SystemID: "7", SegSize: uint64(testSeg), Timeline: 1,
		StartLSN: S*pipeline.LSN(startSeg) + 0x28, EndLSN: S*pipeline.LSN(startSeg) + 0x5000,
		StartTime: at, EndTime: at.Add(10 * time.Minute), Incomplete: incomplete,
	})
	if err != nil {
		t.Fatal(err)
	}
	return id
}

func segKey(layout sinks.Layout, no uint64) string {
	return layout.Key(pipeline.Segment{Timeline: 1, No: no}.Name(testSeg), ".zst")
}

// REVIEW FINDING 2
// A backup catalogue under a directory whose name this build does not
// parse as a backup ID — a newer walship's ID format (say, sub-second IDs
// so that two backups may start in one second), or a backup an operator
// copied aside as <id>-keep — is skipped by Scan as "not a backup's
// object". prune then computes its floor without it and deletes the WAL
// that backup needs. A catalogue prune cannot read must make it refuse
// (as an undecodable backup.json does), never be treated as absent.
func TestReviewPruneIgnoresCatalogueUnderUnknownID(t *testing.T) {
	ctx := context.Background()
	fs, layout := reviewBucket(t, 1, 20)
	base := time.Date(2026, 11, 1, 0, 0, 0, 0, time.UTC)
	reviewBackup(t, fs, layout, 3, base, false)
	reviewBackup(t, fs, layout, 12, base.Add(2*time.Hour), false)
	// A backup whose ID this build cannot parse, starting in segment 6.
	odd := layout.BackupPrefix() + "20261101T010000.250Z/" + backup.CatalogFile
	put(t, fs, odd, []byte(`{"v": 2, "id": "20261101T010000.250Z", "start_lsn": "0/600028", "timeline": 1}`))

	st, err := Scan(ctx, fs, layout, Options{})
	if err != nil {
		t.Fatal(err)
	}
	plan, err := NewPlan(st, Policy{Keep: 1, IncompleteAfter: 24 * time.Hour, Now: base.Add(3 * time.Hour)})
	if err != nil {
		return // refusing is right
	}
	if _, err := Execute(ctx, fs, st, plan); err != nil {
		t.Fatal(err)
	}
	if _, err := fs.Head(ctx, segKey(layout, 6)); err != nil {
		t.Fatalf("prune (floor %s) deleted segment 6, which the backup at %s needs: a catalogue it could not place was treated as absent", plan.Floor, odd)
	}
}

// REVIEW FINDING 3
// --keep 2 counts backups that cannot be restored (Window.Broken: the WAL
// from their start to their end is not in the bucket — a gap from a
// lifecycle rule, a hand deletion, or REVIEW FINDING 1). The two newest
// are broken; prune deletes the oldest, the only one that restores, and
// its WAL. Either refuse, or do not count a broken backup as kept.
func TestReviewPruneKeepsOnlyBrokenBackups(t *testing.T) {
	ctx := context.Background()
	// Segments 10 and 14 lost: the backups starting there cannot reach their end.
	fs, layout := reviewBucket(t, 1, 20, 10, 14)
	base := time.Date(2026, 11, 1, 0, 0, 0, 0, time.UTC)
	good := reviewBackup(t, fs, layout, 3, base, false)
	reviewBackup(t, fs, layout, 10, base.Add(time.Hour), false)
	reviewBackup(t, fs, layout, 14, base.Add(2*time.Hour), false)
	st, err := Scan(ctx, fs, layout, Options{})
	if err != nil {
		t.Fatal(err)
	}
	plan, err := NewPlan(st, Policy{Keep: 2, IncompleteAfter: 24 * time.Hour, Now: base.Add(3 * time.Hour)})
	if err != nil {
		return // refusing is right
	}
	restorable := 0
	for _, b := range plan.Keep {
		if b.Window != nil && !b.Window.Broken {
			restorable++
		}
	}
	if restorable == 0 {
		t.Fatalf("prune --keep 2 keeps only broken backups and deletes %s, the only one that restores", good)
	}
}

// REVIEW FINDING 5
// prune deletes an incomplete backup older than --incomplete-after (24 h
// by default) by the objects it listed. `walship backup --timeout` is
// independent of it (any duration), and StartedAt comes from the backup
// host's clock. When the backup completes between prune's Scan and its
// Execute (its catalogue written after the listing), Execute deletes the
// start marker and the chunks it listed but leaves the new catalogue: the
// bucket then shows a complete backup whose chunks are gone (backup list
// shows it; restore fails on it; --keep counts it).
func TestReviewPruneIncompleteBackupCompletingDuringPrune(t *testing.T) {
	ctx := context.Background()
	fs, layout := reviewBucket(t, 1, 20)
	base := time.Date(2026, 11, 1, 0, 0, 0, 0, time.UTC)
	reviewBackup(t, fs, layout, 3, base, false)
	// A long backup (walship backup --timeout 48h) still running: started 25 h ago.
	runningAt := base.Add(time.Hour)
	id := reviewBackup(t, fs, layout, 8, runningAt, true)
	now := runningAt.Add(25 * time.Hour)

	st, err := Scan(ctx, fs, layout, Options{})
	if err != nil {
		t.Fatal(err)
	}
	plan, err := NewPlan(st, Policy{Keep: 2, IncompleteAfter: 24 * time.Hour, Now: now})
	if err != nil {
		t.Fatal(err)
	}
	// The backup finishes now: its catalogue lands (the same one a
	// complete write produces), after prune's listing.
	other, err := file.New(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	if _, err := retentiontest.Write(ctx, other, layout, retentiontest.Spec{ID: id,
		Server: "db", SystemID: "7", SegSize: uint64(testSeg), Timeline: 1,
		StartLSN: pipeline.LSN(testSeg)*8 + 0x28, EndLSN: pipeline.LSN(testSeg)*8 + 0x5000,
		StartTime: runningAt, EndTime: runningAt.Add(10 * time.Minute)}); err != nil {
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

	if _, err := Execute(ctx, fs, st, plan); err != nil {
		t.Fatal(err)
	}
	if _, err := fs.Head(ctx, key); err != nil {
		return // the backup is gone as a whole: consistent
	}
	cat, err := backup.DecodeCatalog(body)
	if err != nil {
		t.Fatal(err)
	}
	for _, a := range append(cat.Archives, cat.Manifest) {
		for _, ch := range a.Chunks {
			if _, err := fs.Head(ctx, ch.Key); err != nil {
				t.Fatalf("backup %s has a catalogue but prune deleted its chunk %s: a complete-looking backup that cannot restore", id, ch.Key)
			}
		}
	}
}

// REVIEW FINDING 8
// "Newest" is decided by the end time the backup host's clock wrote into
// the catalogue (and `restore latest` by the ID, the same clock). One
// backup taken on a host whose clock ran two days ahead is the "newest"
// for two days: --keep 1 keeps it and deletes the backup taken after it
// (the one with the highest LSN), the age-of-newest-backup gauge goes
// negative so the stale-backup alert cannot fire while backups fail, and
// restore latest restores the older backup (recovery then replays
// everything since). Order backups by their position in the WAL (end
// timeline and end LSN), which no clock moves, and flag end times in the
// future.
func TestReviewPruneNewestByClockNotLSN(t *testing.T) {
	ctx := context.Background()
	fs, layout := reviewBucket(t, 1, 20)
	base := time.Date(2026, 11, 1, 0, 0, 0, 0, time.UTC)
	reviewBackup(t, fs, layout, 3, base, false)
	reviewBackup(t, fs, layout, 8, base.Add(48*time.Hour+time.Hour), false) // clock two days ahead
	newest := reviewBackup(t, fs, layout, 14, base.Add(2*time.Hour), false)
	st, err := Scan(ctx, fs, layout, Options{})
	if err != nil {
		t.Fatal(err)
	}
	plan, err := NewPlan(st, Policy{Keep: 1, IncompleteAfter: 24 * time.Hour, Now: base.Add(3 * time.Hour)})
	if err != nil {
		t.Fatal(err)
	}
	if len(plan.Keep) != 1 || plan.Keep[0].ID != newest {
		var kept []string
		for _, b := range plan.Keep {
			kept = append(kept, b.ID)
		}
		t.Fatalf("--keep 1 keeps %v, deletes %s, the backup with the highest LSN", kept, newest)
	}
}
