package take

import (
	"testing"

	"github.com/walship/walship/pipeline"
)

// REVIEW2 FINDING 4
//
// A backup that starts on timeline 1 and ends on timeline 2 (a standby
// whose upstream was promoted during the backup) restores only if the
// bucket holds 00000002.history: recovery (recovery_target_timeline =
// latest, or 2) learns from it where timeline 1 ends; without it, it stays
// on timeline 1, which stops at the switch before the backup's end
// ("WAL ends before end of online backup"). walCheck looks for every
// segment on the right timeline now, but never for the history file. The
// archivers confirm files in any order (parallel workers, the history's
// upload being retried), so the catalogue can be written while the history
// is not in the bucket; if the receiver's spool is lost then, the history
// is never archived (see REVIEW2 FINDING 1) and the backup `walship backup`
// reported complete cannot restore.
func TestReview2WALCheckNeedsEndTimelineHistory(t *testing.T) {
	b := newWALBucket(t)
	sw := pipeline.LSN(7<<20 + 300)
	path := mustPath(t, 1, 2, []pipeline.HistoryEntry{{Parent: 1, Switch: sw}})
	start, end := pipeline.LSN(5<<20+100), pipeline.LSN(8<<20+5000)
	c := newWALCheck(b.fs, b.layout, testSys, mb, path, start, end)
	b.put(b.layout.Key(seg(1, 5), ".zst"))
	b.put(b.layout.Key(seg(1, 6), ".zst"))
	b.put(b.layout.Key(seg(2, 7), ".zst"))
	b.put(b.layout.Key(seg(2, 8), ".zst"))
	// No 00000002.history in the bucket.
	if m := b.missing(c); m == "" {
		t.Fatalf("every segment is there but %s is not: walCheck says the backup's WAL is archived, and the catalogue is written for a backup recovery cannot follow to timeline 2",
			pipeline.HistoryFileName(2))
	}
}
