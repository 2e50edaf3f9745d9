package e2e

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/walship/walship/pipeline"
)

// A base backup taken on a standby (pg_basebackup -Ft against it: its tar
// and manifest hold standby.signal, its postgresql.auto.conf the
// standby's primary_conninfo) restores into a server that recovers from
// the archive and ends recovery with every row: restore leaves out
// standby.signal (it still matches the manifest) and comments out
// primary_conninfo, rather than making a standby that streams from the
// production primary and never promotes.
func TestRestoreBaseBackupOfStandby(t *testing.T) {
	st := newStack(t)
	st.s3.SetEnv(t)
	os.Chmod(filepath.Dir(walshipBin), 0o755) // restore_command runs it as postgres
	primary := st.pg
	primary.Exec(`CREATE TABLE ledger (id int, phase text); INSERT INTO ledger SELECT g, 'before' FROM generate_series(1, 1000) g`)
	standby := primary.StartStandby()
	st.pg = standby
	w := startWalship(t, st.env(), st.args("run", "--create-slot")...)
	waitFor(t, 30*time.Second, "streaming from the standby", func() bool { return st.walsenderPID() != "" })

	cat := putFixtureBackup(t, st, fixtureOpts{NoWALWait: true})
	base := untar(t, st.archiveBytes(cat.Archives[0]))
	if _, ok := base["standby.signal"]; !ok || !strings.Contains(string(base["postgresql.auto.conf"]), "primary_conninfo") {
		t.Fatalf("the standby's backup holds no standby.signal or no primary_conninfo: nothing to test")
	}
	primary.Exec(`INSERT INTO ledger SELECT g, 'after' FROM generate_series(1001, 1500) g`)
	sw, err := pipeline.ParseLSN(primary.QueryString(`SELECT pg_switch_wal()::text`))
	if err != nil {
		t.Fatal(err)
	}
	end := segSize.Start(sw) + pipeline.LSN(segSize)
	primary.Exec(`INSERT INTO ledger VALUES (0, 'next segment')`)
	waitFor(t, 60*time.Second, "the WAL after the backup archived", func() bool { return st.replFlush() >= max(end, cat.EndLSN) })
	if err := w.stop(t); err != nil {
		t.Fatalf("walship exit: %v", err)
	}

	d := primary.OwnedDir("restore")
	out, err := runWalship(t, st.env(), st.restoreArgs("--backup", "latest", "--target-dir", d)...)
	if err != nil || !strings.Contains(out, "restoring backup "+cat.ID) || !strings.Contains(out, "left out the backup's standby.signal") {
		t.Fatalf("restore: %v\n%s", err, out)
	}
	if _, err := os.Stat(filepath.Join(d, "standby.signal")); !os.IsNotExist(err) {
		t.Errorf("standby.signal restored: %v", err)
	}
	if _, err := os.Stat(filepath.Join(d, "recovery.signal")); err != nil {
		t.Errorf("no recovery.signal: %v", err)
	}
	conf, _ := os.ReadFile(filepath.Join(d, "postgresql.auto.conf"))
	for _, line := range strings.Split(string(conf), "\n") {
		if strings.HasPrefix(line, "primary_conninfo") || strings.HasPrefix(line, "primary_slot_name") {
			t.Errorf("postgresql.auto.conf keeps %q", line)
		}
	}
	r := primary.FromRestore(d)
	if err := r.TryStart(120 * time.Second); err != nil {
		t.Fatalf("%v\n%s", err, r.Log())
	}
	waitPromoted(t, r)
	if got := count(r, `SELECT count(*)::text FROM ledger WHERE id > 0`); got != 1500 {
		t.Errorf("%d rows, want 1500 (every row archived after the backup)", got)
	}
}
