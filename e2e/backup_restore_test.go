package e2e

import (
	"context"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/walship/walship/internal/testenv"
	"github.com/walship/walship/pipeline/backup/unpack"
)

// restoreArgs are `walship restore`'s destination flags for st.
func (st *stack) restoreArgs(extra ...string) []string {
	return append([]string{"restore", "--dest", "s3://" + st.s3.Bucket + "/" + st.prefix, "--s3-endpoint", st.s3.Endpoint(),
		"--s3-path-style", "--server", st.server}, extra...)
}

// A base backup in the bucket (the catalogue's format, put by the
// fixture) with walship's WAL archive restores with `walship restore`:
// latest skips an incomplete backup and recovers to the newest WAL, a
// table in a second tablespace comes back into the mapped directory, a
// named restore point gives exactly the rows before it, and a chunk
// overwritten with other valid zstd bytes is refused by name.
func TestRestoreBaseBackup(t *testing.T) {
	st := newStack(t)
	// restore_command, run by the restored servers, takes the S3
	// credentials from their environment (which pg_ctl passes on).
	st.s3.SetEnv(t)
	os.Chmod(filepath.Dir(walshipBin), 0o755) // restore_command runs it as postgres
	tsDir := st.pg.OwnedDir("ts")
	st.pg.Exec(`CREATE TABLESPACE extra LOCATION '` + tsDir + `'`)
	st.pg.Exec(`CREATE TABLE ledger (id serial primary key, phase text); CREATE TABLE spaced (id int, v text) TABLESPACE extra`)
	st.pg.Exec(`INSERT INTO spaced SELECT g, md5(g::text) FROM generate_series(1, 5000) g`)
	if err := st.pg.Pgbench(context.Background(), "-i", "-s", "2", "-q"); err != nil {
		t.Fatal(err)
	}
	w := startWalship(t, st.env(), st.args("run", "--create-slot")...)
	waitFor(t, 30*time.Second, "streaming", func() bool { return st.walsenderPID() != "" })
	conn := st.pg.Conn(context.Background())
	defer conn.Close(context.Background())
	insert := func(phase string, n int) {
		for i := 0; i < n; i++ {
			if _, err := conn.Exec(context.Background(), `INSERT INTO ledger (phase) VALUES ($1)`, phase); err != nil {
				t.Fatal(err)
			}
		}
	}
	insert("before", 200)
	ctx, cancel := context.WithCancel(context.Background())
	bench := make(chan error, 1)
	go func() { bench <- st.pg.Pgbench(ctx, "-c", "2", "-T", "600", "-n") }()
	// The backup's postgresql.conf holds the targets of an earlier PITR of
	// this server (ignored once it promoted): restore latest must not stop
	// at them (a), nor refuse them beside its own target (b).
	st.pg.SetConf("recovery_target = 'immediate'", "recovery_target_action = 'promote'")
	cat := putFixtureBackup(t, st, fixtureOpts{})
	if len(cat.Archives) != 2 || cat.Archives[1].Location != tsDir {
		t.Fatalf("the fixture's archives: %+v, want base and the tablespace at %s", cat.Archives, tsDir)
	}
	insert("after-backup", 200)
	st.pg.Exec(`SELECT pg_create_restore_point('walship_rp')`)
	insert("after-rp", 200)
	st.pg.Exec(`INSERT INTO spaced SELECT g, md5(g::text) FROM generate_series(5001, 6000) g`)
	cancel()
	if err := <-bench; err != nil {
		t.Fatal(err)
	}
	// A newer backup that never completed: chunks and started.json, no catalogue.
	incomplete := putFixtureBackup(t, st, fixtureOpts{Incomplete: true})
	if incomplete.ID <= cat.ID {
		t.Fatalf("incomplete backup %s is not newer than %s", incomplete.ID, cat.ID)
	}
	end := st.switchWAL()
	waitFor(t, 60*time.Second, "everything archived", func() bool { return st.replFlush() >= end })
	if err := w.stop(t); err != nil {
		t.Fatalf("walship exit: %v", err)
	}
	wantBalance := st.pg.QueryString(`SELECT sum(abalance)::text FROM pgbench_accounts`)

	// (e) The incomplete backup is refused by ID.
	out, err := runWalship(t, st.env(), st.restoreArgs("--backup", incomplete.ID, "--target-dir", filepath.Join(t.TempDir(), "x"))...)
	if err == nil || !strings.Contains(out, "backup "+incomplete.ID+" is not complete (no catalogue)") {
		t.Errorf("restore of an incomplete backup: %v\n%s", err, out)
	}

	// (a, d) latest: the complete backup, recovered to the newest WAL, the tablespace mapped.
	d1 := st.pg.OwnedDir("restore1")
	ts1 := filepath.Join(filepath.Dir(d1), "ts1")
	out, err = runWalship(t, st.env(), st.restoreArgs("--backup", "latest", "--target-dir", d1, "--tablespace-mapping", tsDir+"="+ts1)...)
	if err != nil || !strings.Contains(out, "restoring backup "+cat.ID) {
		t.Fatalf("restore latest: %v\n%s", err, out)
	}
	t.Logf("restore latest:\n%s", out)
	conf, _ := os.ReadFile(filepath.Join(d1, "postgresql.auto.conf"))
	if strings.Contains(string(conf), testenv.S3SecretKey) || strings.Contains(string(conf), testenv.S3AccessKey) || !strings.Contains(string(conf), "fetch %f %p") {
		t.Errorf("postgresql.auto.conf holds a credential, or no restore_command:\n%s", conf)
	}
	r := st.pg.FromRestore(d1, ts1)
	if err := r.TryStart(120 * time.Second); err != nil {
		t.Fatalf("%v\n%s", err, r.Log())
	}
	waitPromoted(t, r)
	if got := count(r, `SELECT count(*)::text FROM ledger`); got != 600 {
		t.Errorf("restore latest: %d ledger rows, want 600 (every row, to the newest WAL)", got)
	}
	if got := count(r, `SELECT count(*)::text FROM spaced`); got != 6000 {
		t.Errorf("restore latest: %d rows in the second tablespace, want 6000", got)
	}
	if got := r.QueryString(`SELECT sum(abalance)::text FROM pgbench_accounts`); got != wantBalance {
		t.Errorf("restore latest: pgbench balance %s, want %s", got, wantBalance)
	}
	if loc := r.QueryString(`SELECT pg_tablespace_location(oid) FROM pg_tablespace WHERE spcname = 'extra'`); loc != ts1 {
		t.Errorf("restored tablespace at %q, want %q", loc, ts1)
	}
	r.Stop("fast")

	// (b) PITR to the restore point made after the backup.
	d2 := st.pg.OwnedDir("restore2")
	ts2 := filepath.Join(filepath.Dir(d2), "ts2")
	out, err = runWalship(t, st.env(), st.restoreArgs("--backup", cat.ID, "--target-dir", d2, "--tablespace-mapping", tsDir+"="+ts2,
		"--target-name", "walship_rp", "--target-action", "promote", "--jobs", "2")...)
	if err != nil {
		t.Fatalf("restore to a restore point: %v\n%s", err, out)
	}
	p := st.pg.FromRestore(d2, ts2)
	if err := p.TryStart(120 * time.Second); err != nil {
		t.Fatalf("%v\n%s", err, p.Log())
	}
	waitPromoted(t, p)
	if got := count(p, `SELECT count(*)::text FROM ledger WHERE phase <> 'after-rp'`); got != 400 {
		t.Errorf("restore point: %d rows from before it, want 400", got)
	}
	if got := count(p, `SELECT count(*)::text FROM ledger WHERE phase = 'after-rp'`); got != 0 {
		t.Errorf("restore point: %d rows from after it, want 0", got)
	}
	if got := count(p, `SELECT count(*)::text FROM spaced`); got != 5000 {
		t.Errorf("restore point: %d rows in the second tablespace, want 5000", got)
	}
	p.Stop("fast")

	// (c) A chunk overwritten, through the S3 API (so the store's own
	// checksum is right), with another chunk's valid zstd bytes and the
	// original metadata: only walship's SHA-256 check can catch it.
	chunks := cat.Archives[0].Chunks
	if len(chunks) < 3 {
		t.Fatalf("base archive has %d chunks; the test wants at least 3", len(chunks))
	}
	victim := chunks[len(chunks)/2].Key
	sink := fixtureSink(t, st)
	rc, _, err := sink.Get(context.Background(), chunks[0].Key)
	if err != nil {
		t.Fatal(err)
	}
	other, err := io.ReadAll(rc)
	rc.Close()
	if err != nil {
		t.Fatal(err)
	}
	meta, err := sink.Head(context.Background(), victim)
	if err != nil {
		t.Fatal(err)
	}
	if err := sink.Delete(context.Background(), victim); err != nil {
		t.Fatal(err)
	}
	if err := sink.Put(context.Background(), victim, other, meta); err != nil {
		t.Fatal(err)
	}
	d3 := filepath.Join(t.TempDir(), "restore3")
	out, err = runWalship(t, st.env(), st.restoreArgs("--backup", cat.ID, "--target-dir", d3, "--tablespace-mapping", tsDir+"="+filepath.Join(t.TempDir(), "ts3"))...)
	if ee, ok := err.(*exec.ExitError); !ok || ee.ExitCode() == 0 || !strings.Contains(out, victim) || !strings.Contains(out, "SHA-256") {
		t.Errorf("restore with a corrupt chunk: %v, want a failure naming %s and its SHA-256\n%s", err, victim, out)
	}
	t.Logf("restore with a corrupt chunk:\n%s", out)
	if _, err := os.Stat(filepath.Join(d3, "recovery.signal")); err == nil {
		t.Error("a failed restore wrote recovery.signal")
	}
	if _, err := os.Stat(filepath.Join(d3, unpack.FailedFile)); err != nil {
		t.Errorf("a failed restore is not marked: %v", err)
	}
}

// The wal-g layout (backups under walship_backups/, WAL under wal_005/,
// gzip WAL beside zstd chunks): restore latest needs no --server, and its
// restore_command recovers every row.
func TestRestoreBaseBackupWalG(t *testing.T) {
	st := newStack(t)
	st.s3.SetEnv(t)
	os.Chmod(filepath.Dir(walshipBin), 0o755)
	st.pg.Exec(`CREATE TABLE ledger (id serial primary key, phase text)`)
	st.pg.Exec(`INSERT INTO ledger (phase) SELECT 'before' FROM generate_series(1, 300)`)
	w := startWalship(t, st.env(), st.args("run", "--create-slot", "--layout", "wal-g", "--compression", "gzip")...)
	waitFor(t, 30*time.Second, "streaming", func() bool { return st.walsenderPID() != "" })
	cat := putFixtureBackup(t, st, fixtureOpts{Layout: "wal-g"})
	st.pg.Exec(`INSERT INTO ledger (phase) SELECT 'after' FROM generate_series(1, 300)`)
	end := st.switchWAL()
	waitFor(t, 60*time.Second, "everything archived", func() bool { return st.replFlush() >= end })
	if err := w.stop(t); err != nil {
		t.Fatalf("walship exit: %v", err)
	}
	d := st.pg.OwnedDir("restore")
	out, err := runWalship(t, st.env(), "restore", "--dest", "s3://"+st.s3.Bucket+"/"+st.prefix, "--s3-endpoint", st.s3.Endpoint(),
		"--s3-path-style", "--layout", "wal-g", "--backup", "latest", "--target-dir", d)
	if err != nil || !strings.Contains(out, "restoring backup "+cat.ID) {
		t.Fatalf("restore latest (wal-g): %v\n%s", err, out)
	}
	r := st.pg.FromRestore(d)
	if err := r.TryStart(120 * time.Second); err != nil {
		t.Fatalf("%v\n%s", err, r.Log())
	}
	waitPromoted(t, r)
	if got := count(r, `SELECT count(*)::text FROM ledger`); got != 600 {
		t.Errorf("wal-g restore: %d rows, want 600", got)
	}
}
