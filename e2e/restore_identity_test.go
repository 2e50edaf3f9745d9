package e2e

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/walship/walship/internal/testenv"
	"github.com/walship/walship/pipeline"
)

// copyWAL copies segments first..last-1 of timeline 1 from src into dir,
// owned by the restored cluster's user.
func copyWAL(t *testing.T, src, dir string, first, last uint64, owner string) {
	t.Helper()
	var st syscall.Stat_t
	if err := syscall.Stat(owner, &st); err != nil {
		t.Fatal(err)
	}
	os.MkdirAll(dir, 0o700)
	os.Chown(dir, int(st.Uid), int(st.Gid))
	for no := first; no < last; no++ {
		name := pipeline.Segment{Timeline: 1, No: no}.Name(segSize)
		b, err := os.ReadFile(filepath.Join(src, name))
		if err != nil {
			continue // before the oldest kept segment
		}
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, b, 0o600); err != nil {
			t.Fatal(err)
		}
		os.Chown(p, int(st.Uid), int(st.Gid))
	}
}

// refused checks that a restored cluster never opened: recovery aborted
// with walship's reason in the log.
func refused(t *testing.T, r *testenv.Postgres, reason string) {
	t.Helper()
	err := r.TryStart(60 * time.Second)
	waitFor(t, 30*time.Second, "the server to exit", func() bool { return !r.Running() })
	log := r.Log()
	if err == nil || strings.Contains(log, "ready to accept connections") || strings.Contains(log, "selected new timeline") {
		t.Fatalf("recovery ended and the server opened instead of aborting:\n%s", log)
	}
	if !strings.Contains(log, reason) {
		t.Errorf("the server log does not show %q:\n%s", reason, log)
	}
}

// (a), (b), (d): a restore whose WAL up to a consistent point is in pg_wal
// and whose later WAL is only in the archive. With a wrong --server, or
// pointed at another cluster's archive under the right name, recovery
// aborts — "not found" would promote at the end of pg_wal with fewer rows.
// Stale files of another archive in the prefetch directory are not served:
// the recovery has every row.
func TestRestoreRefusesAnotherArchive(t *testing.T) {
	st := newStack(t)
	st.pg.Exec(`CREATE TABLE ledger (id serial primary key, phase text)`)
	w := startWalship(t, st.env(), st.args("run", "--create-slot")...)
	waitFor(t, 30*time.Second, "streaming", func() bool { return st.walsenderPID() != "" })
	st.pg.Exec(`INSERT INTO ledger (phase) SELECT 'early' FROM generate_series(1, 200)`)
	backup := st.pg.BaseBackup()
	local := st.switchWAL() // pg_wal of the restore holds WAL up to here
	for i := 0; i < 3; i++ {
		st.pg.Exec(`INSERT INTO ledger (phase) SELECT 'late' FROM generate_series(1, 100)`)
		st.writeSegments(1)
	}
	end := st.switchWAL()
	waitFor(t, 60*time.Second, "archiving", func() bool { return st.replFlush() >= end })
	if err := w.stop(t); err != nil {
		t.Fatal(err)
	}
	localEnd, lastSeg := uint64(local)/uint64(segSize), uint64(end)/uint64(segSize)

	// Cluster B archives under the same server name in another prefix,
	// with segments of the same names.
	other := testenv.StartPostgres(t, testenv.PGOptions{})
	otherData := t.TempDir()
	wb := startWalship(t, st.env(), "run", "--pg", other.URL("postgres"), "--slot", "walship", "--create-slot", "--server", st.server,
		"--dest", "s3://"+st.s3.Bucket+"/other", "--s3-endpoint", st.s3.Endpoint(), "--s3-path-style",
		"--data-dir", otherData, "--metrics-addr", "", "--nats", testenv.StartNATS(t).URL(), "--status-interval", "1s")
	ost := &stack{t: t, pg: other}
	waitFor(t, 30*time.Second, "cluster B streaming", func() bool { return ost.walsenderPID() != "" })
	other.Exec(`CREATE TABLE t (x int)`)
	var bEnd pipeline.LSN
	for uint64(bEnd)/uint64(segSize) <= lastSeg+1 {
		other.Exec(`INSERT INTO t VALUES (1)`)
		bEnd = ost.switchWAL()
	}
	waitFor(t, 60*time.Second, "cluster B archiving", func() bool { return ost.replFlush() >= bEnd })
	if err := wb.stop(t); err != nil {
		t.Fatal(err)
	}

	restored := func(rc string) *testenv.Postgres {
		r := st.pg.Restored(backup, "restore_command = '"+rc+"'")
		copyWAL(t, st.pg.WALDir(), filepath.Join(r.DataDir, "pg_wal"), 0, localEnd, r.DataDir)
		return r
	}
	t.Run("WrongServer", func(t *testing.T) {
		wrong := *st
		wrong.server = "nosuch"
		refused(t, restored(wrong.restoreCommand("barman-cloud")), "walship: refusing to answer")
	})
	t.Run("AnotherClustersArchive", func(t *testing.T) {
		otherArchive := *st
		otherArchive.prefix = "other"
		refused(t, restored(otherArchive.restoreCommand("barman-cloud")), "walship: refusing to")
	})
	t.Run("StalePrefetchFromAnotherArchive", func(t *testing.T) {
		r := restored(st.restoreCommand("barman-cloud"))
		// Segments of cluster B under the names this recovery will ask
		// for, as a prefetcher against B's archive left them.
		pf := filepath.Join(r.DataDir, "pg_wal", ".walship-prefetch")
		copyWAL(t, other.WALDir(), pf, localEnd-1, lastSeg+1, r.DataDir)
		var sys syscall.Stat_t
		syscall.Stat(r.DataDir, &sys)
		for file, content := range map[string]string{
			".want": pipeline.Segment{Timeline: 1, No: localEnd - 2}.Name(segSize),
			".manifest": mustJSON(map[string]any{"dest": "s3://" + st.s3.Bucket + "/other", "layout": "barman-cloud", "server": st.server,
				"system_id": other.QueryString(`SELECT system_identifier::text FROM pg_control_system()`)}),
		} {
			os.WriteFile(filepath.Join(pf, file), []byte(content), 0o600)
			os.Chown(filepath.Join(pf, file), int(sys.Uid), int(sys.Gid))
		}
		if err := r.TryStart(120 * time.Second); err != nil {
			t.Fatalf("%v\n%s", err, r.Log())
		}
		waitPromoted(t, r)
		for phase, want := range map[string]int{"early": 200, "late": 300} {
			if got := count(r, `SELECT count(*)::text FROM ledger WHERE phase = '`+phase+`'`); got != want {
				t.Errorf("%s rows: %d, want %d", phase, got, want)
			}
		}
		if want, got := st.pg.QueryString(`SELECT count(*)::text FROM filler`), r.QueryString(`SELECT count(*)::text FROM filler`); got != want {
			t.Errorf("filler rows: %s, want %s", got, want)
		}
		if n, _ := strconv.Atoi(st.pg.QueryString(`SELECT count(*)::text FROM ledger`)); n != 500 {
			t.Fatalf("the source has %d ledger rows", n)
		}
	})
}

func mustJSON(v any) string {
	b, _ := json.Marshal(v)
	return string(b)
}
