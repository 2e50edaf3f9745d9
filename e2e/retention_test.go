package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"path"
	"strings"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/s3"

	"github.com/walship/walship/pipeline"
	"github.com/walship/walship/pipeline/backup"
	"github.com/walship/walship/pipeline/backup/retention/retentiontest"
	"github.com/walship/walship/sinks"
	s3sink "github.com/walship/walship/sinks/s3"
)

// fakeBackup stores a backup of the running server's WAL range start..end
// as `walship backup` leaves it in the bucket (marker, a chunk of each
// archive, catalogue last), with the given end time. It stands in for
// `walship backup` (another branch) in the retention test: swap it for a
// run of the real command once that is merged; prune and list read only
// the catalogue and the WAL.
func (st *stack) fakeBackup(t *testing.T, layout sinks.Layout, start, end pipeline.LSN, endTime time.Time) string {
	t.Helper()
	st.s3.SetEnv(t)
	sink, err := s3sink.New(context.Background(), s3sink.Options{Bucket: st.s3.Bucket, Endpoint: st.s3.Endpoint(), PathStyle: true, Timeout: 30 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	id, err := retentiontest.Write(context.Background(), sink, layout, retentiontest.Spec{
		Server: st.server, SystemID: st.pg.QueryString(`SELECT system_identifier::text FROM pg_control_system()`), SegSize: uint64(segSize),
		Timeline: 1, StartLSN: start, EndLSN: end, StartTime: endTime.Add(-time.Minute), EndTime: endTime,
	})
	if err != nil {
		t.Fatal(err)
	}
	return id
}

// bucketKeys lists every key under the stack's prefix.
func (st *stack) bucketKeys(t *testing.T) map[string]bool {
	t.Helper()
	out := map[string]bool{}
	p := s3.NewListObjectsV2Paginator(st.s3.Client(), &s3.ListObjectsV2Input{Bucket: aws.String(st.s3.Bucket), Prefix: aws.String(st.prefix + "/")})
	for p.HasMorePages() {
		page, err := p.NextPage(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		for _, o := range page.Contents {
			out[*o.Key] = true
		}
	}
	return out
}

func (st *stack) deleteKey(t *testing.T, key string) {
	t.Helper()
	if _, err := st.s3.Client().DeleteObject(context.Background(), &s3.DeleteObjectInput{Bucket: aws.String(st.s3.Bucket), Key: aws.String(key)}); err != nil {
		t.Fatal(err)
	}
}

// walSegmentOf is the segment a WAL key (whole or .partial, wal-g or
// barman-cloud layout) holds; ok is false for history files, the identity
// and anything else.
func walSegmentOf(key string) (pipeline.Segment, bool) {
	name := strings.TrimSuffix(strings.TrimSuffix(path.Base(key), path.Ext(key)), ".partial")
	seg, err := pipeline.ParseSegmentName(name, segSize)
	return seg, err == nil && (strings.Contains(key, "/wal_005/") || strings.Contains(key, "/wals/"))
}

// checkPruned checks a prune against the bucket before it: every WAL
// segment that ends at or before floor is gone, every other object that
// was there (WAL at or above it, history files, the identity, other
// tools' backups, the backups in keep) is still there, and exactly the
// objects of the backups in gone are gone.
func (st *stack) checkPruned(t *testing.T, before map[string]bool, floor pipeline.LSN, gone []string) {
	t.Helper()
	after := st.bucketKeys(t)
	walGone, walKept := 0, 0
	for key := range before {
		want := true
		if seg, ok := walSegmentOf(key); ok && seg.EndLSN(segSize) <= floor {
			want = false
		}
		for _, id := range gone {
			if strings.Contains(key, "/walship_backups/"+id+"/") || strings.Contains(key, "/walship-backups/"+id+"/") {
				want = false
			}
		}
		if after[key] != want {
			t.Errorf("%s: present %v after prune, want %v (floor %s)", key, after[key], want, floor)
		}
		if _, ok := walSegmentOf(key); ok {
			if want {
				walKept++
			} else {
				walGone++
			}
		}
	}
	if walGone == 0 || walKept == 0 {
		t.Errorf("prune to %s: %d WAL segments deleted, %d kept; the test wants both", floor, walGone, walKept)
	}
}

type listJSON struct {
	Backups []struct {
		ID       string       `json:"id"`
		Complete bool         `json:"complete"`
		EndLSN   pipeline.LSN `json:"end_lsn"`
		Window   struct {
			EndLSN pipeline.LSN `json:"end_lsn"`
			Gap    bool         `json:"gap"`
			GapAt  string       `json:"gap_at"`
		} `json:"recovery_window"`
	} `json:"backups"`
}

// Retention on a real bucket: five backups with real WAL between them;
// backup list and its windows; prune --dry-run deletes nothing; a WAL-G
// backup's sentinel holds its WAL; prune --keep 2 deletes exactly the WAL
// below the third-newest backup's start segment and the three old
// backups; --keep-within, by prune and by the archiver process
// (--prune-every); a gap is reported by list and the metrics.
func TestRetention(t *testing.T) {
	st := newStack(t)
	layout := sinks.WalG{Prefix: st.prefix}
	w := startWalship(t, st.env(), st.args("run", "--create-slot", "--layout", "wal-g", "--partial-interval", "0", "--backup-scan-every", "1s")...)
	waitFor(t, 30*time.Second, "streaming", func() bool { return st.walsenderPID() != "" })
	dest := []string{"--dest", "s3://" + st.s3.Bucket + "/" + st.prefix, "--s3-endpoint", st.s3.Endpoint(), "--s3-path-style", "--layout", "wal-g"}
	walship := func(args ...string) string {
		t.Helper()
		out, err := runWalship(t, st.env(), append(args, dest...)...)
		if err != nil {
			t.Fatalf("walship %s: %v\n%s", strings.Join(args, " "), err, out)
		}
		return out
	}

	now := time.Now().UTC().Truncate(time.Second)
	var ids []string
	var starts []pipeline.LSN
	st.writeSegments(1)
	for i := 0; i < 5; i++ {
		// A backup starts and ends inside a segment, as a real one does.
		st.pg.Exec(`CREATE TABLE IF NOT EXISTS marks (i int); INSERT INTO marks SELECT generate_series(1, 1000)`)
		start := st.currentLSN()
		st.pg.Exec(`INSERT INTO marks SELECT generate_series(1, 1000)`)
		end := st.currentLSN()
		if segSize.Start(start) == start || end <= start {
			t.Fatalf("backup %d: start %s, end %s: want both inside a segment", i, start, end)
		}
		st.writeSegments(2)
		ids = append(ids, st.fakeBackup(t, layout, start, end, now.Add(-time.Duration(5-i)*24*time.Hour)))
		starts = append(starts, start)
	}
	last := st.writeSegments(2)
	waitFor(t, 60*time.Second, "everything archived", func() bool { return st.replFlush() >= last })

	// backup list: five backups, each recoverable to the newest WAL.
	var list listJSON
	if err := json.Unmarshal([]byte(walship("backup", "list", "--json")), &list); err != nil {
		t.Fatal(err)
	}
	if len(list.Backups) != 5 {
		t.Fatalf("backup list: %d backups, want 5", len(list.Backups))
	}
	for i, b := range list.Backups {
		if b.ID != ids[i] || !b.Complete || b.Window.Gap || b.Window.EndLSN < last {
			t.Errorf("backup %d: %+v, want %s complete, window to at least %s without a gap", i, b, ids[i], last)
		}
	}
	table := walship("backup", "list")
	t.Logf("backup list:\n%s", table)
	for _, id := range ids {
		if !strings.Contains(table, id) {
			t.Errorf("backup list does not show %s:\n%s", id, table)
		}
	}

	// --dry-run deletes nothing.
	before := st.bucketKeys(t)
	out := walship("prune", "--keep", "2", "--dry-run")
	if !strings.Contains(out, "would delete backup "+ids[0]) || !strings.Contains(out, "nothing deleted") {
		t.Errorf("prune --dry-run output:\n%s", out)
	}
	if after := st.bucketKeys(t); len(after) < len(before) {
		t.Fatalf("prune --dry-run deleted objects: %d before, %d after", len(before), len(after))
	}

	// A WAL-G backup that started in backup 1's start segment holds its WAL.
	sentinel := st.prefix + "/basebackups_005/base_000000010000000000000001_backup_stop_sentinel.json"
	st.putObject(sentinel, []byte(fmt.Sprintf(`{"LSN": %d, "FinishLSN": %d, "Timeline": 1, "PgVersion": 150000}`, uint64(starts[1]), uint64(starts[1]+100))), nil)
	before = st.bucketKeys(t)
	walship("prune", "--keep", "2")
	st.checkPruned(t, before, segSize.Start(starts[1]), ids[:3])

	// Without it, prune --keep 2 goes up to the third-newest's start.
	st.deleteKey(t, sentinel)
	before = st.bucketKeys(t)
	out = walship("prune", "--keep", "2")
	t.Logf("prune --keep 2:\n%s", out)
	st.checkPruned(t, before, segSize.Start(starts[3]), nil)
	if !strings.Contains(out, "kept backup "+ids[3]) {
		t.Errorf("prune output does not give the floor's reason:\n%s", out)
	}

	// --keep-within 36h keeps backup 4 (1 day old) and the newest before
	// the cut (backup 3): nothing goes; 12h keeps only backup 4.
	before = st.bucketKeys(t)
	walship("prune", "--keep-within", "36h")
	if after := st.bucketKeys(t); len(after) < len(before) {
		t.Errorf("prune --keep-within 36h deleted %d objects, want none", len(before)-len(after))
	}
	// The archiver process prunes by itself: --prune-every (at start, then
	// periodically) with --keep-within 12h keeps only backup 4.
	if err := w.stop(t); err != nil {
		t.Fatalf("walship exit: %v", err)
	}
	before = st.bucketKeys(t)
	w = startWalship(t, st.env(), st.args("run", "--layout", "wal-g", "--partial-interval", "0", "--backup-scan-every", "1s",
		"--prune-every", "1h", "--keep-within", "0.5d")...)
	waitFor(t, 30*time.Second, "the archiver's prune", func() bool {
		v, ok := st.metric("walship_prune_runs_total")
		return ok && v >= 1
	})
	st.checkPruned(t, before, segSize.Start(starts[4]), ids[3:4])

	// A gap after the last backup: list reports it, and so do the metrics.
	var hole string
	for key := range st.bucketKeys(t) {
		if seg, ok := walSegmentOf(key); ok && seg.No > pipeline.SegmentOf(1, starts[4], segSize).No && seg.EndLSN(segSize) < last {
			hole = key
			break
		}
	}
	if hole == "" {
		t.Fatal("no segment to take out")
	}
	st.deleteKey(t, hole)
	holeSeg, _ := walSegmentOf(hole)
	table = walship("backup", "list")
	t.Logf("backup list after the hole:\n%s", table)
	if !strings.Contains(table, "gap at "+holeSeg.Name(segSize)) {
		t.Errorf("backup list does not report the gap at %s:\n%s", holeSeg.Name(segSize), table)
	}
	list = listJSON{}
	if err := json.Unmarshal([]byte(walship("backup", "list", "--json")), &list); err != nil {
		t.Fatal(err)
	}
	if len(list.Backups) != 1 || !list.Backups[0].Window.Gap || list.Backups[0].Window.GapAt != holeSeg.Name(segSize) || list.Backups[0].Window.EndLSN != holeSeg.StartLSN(segSize) {
		t.Errorf("backup list --json after the hole: %+v", list.Backups)
	}
	waitFor(t, 20*time.Second, "walship_recovery_window_gap 1", func() bool {
		v, ok := st.metric("walship_recovery_window_gap")
		return ok && v == 1
	})
	if _, ok := st.metric("walship_prune_errors_total"); !ok {
		t.Error("walship_prune_errors_total is not exposed")
	}
	if v, _ := st.metric("walship_backups"); v != 1 {
		t.Errorf("walship_backups = %v, want 1", v)
	}
	if v, _ := st.metric("walship_backup_latest_age_seconds"); v < 24*3600-60 || v > 24*3600+600 {
		t.Errorf("walship_backup_latest_age_seconds = %v, want about a day", v)
	}
	// The bucket's catalogue is what the list read: the kept backup's
	// catalogue decodes and names its start.
	raw, _ := st.object(backup.CatalogKey(layout.BackupPrefix(), ids[4]))
	if c, err := backup.DecodeCatalog(raw); err != nil || c.StartLSN != starts[4] || !bytes.Contains(raw, []byte(ids[4])) {
		t.Errorf("catalogue of %s: %+v %v", ids[4], c, err)
	}
	if err := w.stop(t); err != nil {
		t.Fatalf("walship exit: %v", err)
	}
}
