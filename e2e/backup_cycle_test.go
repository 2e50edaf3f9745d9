package e2e

import (
	"context"
	"encoding/json"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/walship/walship/internal/testenv"
	"github.com/walship/walship/pipeline"
	"github.com/walship/walship/pipeline/backup"
	"github.com/walship/walship/sinks"
)

// The whole cycle with the real commands: walship run, walship backup,
// walship restore --backup, walship prune, walship backup list. No
// fixture, no fake catalogue.

// fetchWrapper is a --walship-bin for walship restore: a script that runs
// the test's walship with the S3 credentials, so that the restored
// servers' restore_command reaches the bucket without t.Setenv (which a
// parallel test cannot use). The credentials stay in the script, never in
// postgresql.auto.conf.
func fetchWrapper(t *testing.T, st *stack) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "walship-wrap-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	os.Chmod(dir, 0o755)
	os.Chmod(filepath.Dir(walshipBin), 0o755) // restore_command runs as postgres
	bin := filepath.Join(dir, "walship")
	script := "#!/bin/sh\nexec env " + strings.Join(st.env(), " ") + " " + walshipBin + ` "$@"` + "\n"
	if err := os.WriteFile(bin, []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	return bin
}

// rowIDs is the ids of rpo on p, in order.
func rowIDs(t *testing.T, p *testenv.Postgres, where string) []string {
	t.Helper()
	s := p.QueryString(`SELECT coalesce(string_agg(id::text, ',' ORDER BY id), '') FROM rpo ` + where)
	if s == "" {
		return nil
	}
	return strings.Split(s, ",")
}

// diffIDs reports the difference between two id lists (both nil if equal).
func diffIDs(got, want []string) (missing, extra []string) {
	for _, id := range want {
		if !slices.Contains(got, id) {
			missing = append(missing, id)
		}
	}
	for _, id := range got {
		if !slices.Contains(want, id) {
			extra = append(extra, id)
		}
	}
	return missing, extra
}

// restoreAndStart runs walship restore with args into a new empty
// directory and starts PostgreSQL on it (as postgres, its own port); it
// returns the server once recovery has ended.
func restoreAndStart(t *testing.T, st *stack, owner *testenv.Postgres, name string, args ...string) (*testenv.Postgres, string) {
	t.Helper()
	dir := owner.OwnedDir(name)
	out, err := runWalship(t, st.env(), append(args, "--target-dir", dir)...)
	if err != nil {
		t.Fatalf("walship restore %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	conf, err := os.ReadFile(filepath.Join(dir, "postgresql.auto.conf"))
	if err != nil || strings.Contains(string(conf), testenv.S3SecretKey) || strings.Contains(string(conf), testenv.S3AccessKey) || !strings.Contains(string(conf), "fetch %f %p") {
		t.Errorf("restored postgresql.auto.conf (%v) holds a credential, or no restore_command:\n%s", err, conf)
	}
	var tsDirs []string // mapped tablespaces, for the cluster's OS user too
	for i, a := range args {
		if a == "--tablespace-mapping" && i+1 < len(args) {
			if _, to, ok := strings.Cut(args[i+1], "="); ok {
				tsDirs = append(tsDirs, to)
			}
		}
	}
	r := owner.FromRestore(dir, tsDirs...)
	if err := r.TryStart(90 * time.Second); err != nil {
		t.Fatalf("%v\n%s", err, r.Log())
	}
	waitPromoted(t, r)
	return r, out
}

// Issue 11, test 1: a running server under pgbench, a row every 50 ms;
// walship backup exits 0 with the backup complete; rows go on, a restore
// point, more rows; everything archived. walship restore --backup latest
// into an empty directory recovers every row (the same ids as the server,
// which include every row committed before the backup's end) and the same
// pgbench balance; a second restore with --target-name gives exactly the
// rows committed before the restore point. A table in a second tablespace
// restores (test 5) with --tablespace-mapping, its rows from the backup
// and from the WAL.
func TestBackupCycle(t *testing.T) {
	t.Parallel()
	st := newStack(t)
	wrapper := fetchWrapper(t, st)
	st.pg.Exec(`CREATE TABLE rpo (id serial primary key, phase text, at timestamptz default clock_timestamp())`)
	// Issue 11, test 5, with the real backup: a table in a second
	// tablespace, rows in it before the backup (in the tablespace's
	// archive) and after it (in the WAL).
	ts := tablespaceDir(t)
	st.pg.Exec(`CREATE TABLESPACE ts2 LOCATION '` + ts + `'`)
	st.pg.Exec(`CREATE TABLE in_ts2 (id int primary key, v text) TABLESPACE ts2;
		INSERT INTO in_ts2 SELECT g, md5(g::text) FROM generate_series(1, 3000) g`)
	if err := st.pg.Pgbench(context.Background(), "-i", "-s", "1", "-q"); err != nil {
		t.Fatal(err)
	}
	w := startWalship(t, st.env(), st.args("run", "--create-slot")...)
	waitFor(t, 30*time.Second, "streaming", func() bool { return st.walsenderPID() != "" })
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	bench := make(chan error, 1)
	go func() { bench <- st.pg.Pgbench(ctx, "-c", "1", "-R", "100", "-T", "600", "-n") }()
	c1 := startCommitter(t, st.pg, "before", 50*time.Millisecond)
	waitFor(t, 30*time.Second, "rows before the backup", func() bool { return count(st.pg, `SELECT count(*)::text FROM rpo`) >= 20 })

	_, wait := backupCmd(t, st, st.backupArgs(st.s3.Endpoint(), "--chunk-size", "1MiB", "--label", "cycle"))
	began := time.Now()
	id, log, err := wait()
	backupDone := time.Now()
	if err != nil {
		t.Fatalf("walship backup: %v\n%s", err, log)
	}
	t.Logf("walship backup %s took %s", id, backupDone.Sub(began))
	cat := st.readCatalog(id)
	if cat.ID != id || cat.EndLSN <= cat.StartLSN || cat.EndTime.After(backupDone) {
		t.Fatalf("catalogue %+v (backup exited at %s)", cat, backupDone)
	}
	if len(cat.Archives) != 2 || cat.Archives[1].Location != ts {
		t.Fatalf("catalogue archives %+v: want base and the tablespace at %s", cat.Archives, ts)
	}
	st.pg.Exec(`INSERT INTO in_ts2 SELECT g, md5(g::text) FROM generate_series(3001, 4000) g`)
	tsWant := st.pg.QueryString(`SELECT count(*)::text || '/' || md5(string_agg(v, ',' ORDER BY id)) FROM in_ts2`)
	// Rows keep coming after the backup, then a restore point, then more.
	n := count(st.pg, `SELECT count(*)::text FROM rpo`)
	waitFor(t, 30*time.Second, "rows after the backup", func() bool { return count(st.pg, `SELECT count(*)::text FROM rpo`) >= n+20 })
	times := c1.halt()
	beforeRP := rowIDs(t, st.pg, "")
	st.pg.Exec(`SELECT pg_create_restore_point('after')`)
	c2 := startCommitter(t, st.pg, "after", 50*time.Millisecond)
	waitFor(t, 30*time.Second, "rows after the restore point", func() bool {
		return count(st.pg, `SELECT count(*)::text FROM rpo WHERE phase = 'after'`) >= 20
	})
	c2.halt()
	cancel()
	if err := <-bench; err != nil {
		t.Fatal(err)
	}
	// Everything committed is archived: the switch's segment is in the bucket.
	end := st.switchWAL()
	waitFor(t, 60*time.Second, "everything archived", func() bool { return st.replFlush() >= end })
	if last := pipeline.SegmentOf(1, end-1, segSize); st.archivedSegments()[last.No] == "" {
		t.Fatalf("flush reached %s but segment %s is not in the bucket", end, last.Name(segSize))
	}
	if err := w.stop(t); err != nil {
		t.Fatalf("walship exit: %v", err)
	}
	all := rowIDs(t, st.pg, "")
	balance := st.pg.QueryString(`SELECT sum(abalance)::text FROM pgbench_accounts`)
	beforeEnd := committedBefore(times, backupDone) // rows 1..beforeEnd committed before the backup's end
	if beforeEnd < 20 || len(beforeRP) <= beforeEnd || len(all) <= len(beforeRP) {
		t.Fatalf("%d rows before the backup's end, %d before the restore point, %d in all: the test wants each phase to add rows", beforeEnd, len(beforeRP), len(all))
	}

	// latest, recovered to the newest WAL in the bucket.
	tsLatest := tablespaceDir(t)
	r, out := restoreAndStart(t, st, st.pg, "latest", st.restoreArgs("--backup", "latest", "--walship-bin", wrapper,
		"--tablespace-mapping", ts+"="+tsLatest)...)
	if !strings.Contains(out, "restoring backup "+id) {
		t.Errorf("restore latest did not restore %s:\n%s", id, out)
	}
	got := rowIDs(t, r, "")
	if missing, extra := diffIDs(got, all); len(missing) > 0 || len(extra) > 0 {
		t.Errorf("restore latest: %d rows, want the server's %d; missing %v, extra %v", len(got), len(all), missing, extra)
	}
	for i := 1; i <= beforeEnd; i++ {
		if !slices.Contains(got, all[i-1]) {
			t.Errorf("restore latest lacks row %s, committed before the backup's end", all[i-1])
			break
		}
	}
	if b := r.QueryString(`SELECT sum(abalance)::text FROM pgbench_accounts`); b != balance {
		t.Errorf("restore latest: pgbench balance %s, want %s", b, balance)
	}
	if got := r.QueryString(`SELECT count(*)::text || '/' || md5(string_agg(v, ',' ORDER BY id)) FROM in_ts2`); got != tsWant {
		t.Errorf("restore latest: the table in the second tablespace holds %s, want %s", got, tsWant)
	}
	if loc := r.QueryString(`SELECT pg_tablespace_location(oid) FROM pg_tablespace WHERE spcname = 'ts2'`); loc != tsLatest {
		t.Errorf("restore latest: tablespace ts2 at %q, want the mapped %s", loc, tsLatest)
	}
	r.Stop("fast")

	// PITR to the restore point made after the backup: exactly the rows before it.
	p, _ := restoreAndStart(t, st, st.pg, "rp", st.restoreArgs("--backup", id, "--walship-bin", wrapper,
		"--tablespace-mapping", ts+"="+tablespaceDir(t), "--target-name", "after", "--target-action", "promote")...)
	got = rowIDs(t, p, "")
	if missing, extra := diffIDs(got, beforeRP); len(missing) > 0 || len(extra) > 0 {
		t.Errorf("restore to 'after': %d rows, want the %d before it; missing %v, extra %v", len(got), len(beforeRP), missing, extra)
	}
	p.Stop("fast")
	t.Logf("backup %s: restored %d rows to the end, %d to the restore point (%d committed before the backup's end)", id, len(all), len(beforeRP), beforeEnd)
}

// catalogIn reads a backup's catalogue in a layout.
func (st *stack) catalogIn(t *testing.T, layout sinks.Layout, id string) backup.Catalog {
	t.Helper()
	body, _, ok := st.getObject(backup.CatalogKey(layout.BackupPrefix(), id))
	if !ok {
		t.Fatalf("backup %s has no catalogue", id)
	}
	cat, err := backup.DecodeCatalog(body)
	if err != nil {
		t.Fatal(err)
	}
	return cat
}

// Issue 11, test 3, with the real commands: walship streams from a
// standby (the default barman-cloud layout, whole segments; TestRetention
// covers wal-g's); five walship backups with rows
// and WAL switches between them, the first three of the primary on
// timeline 1, then the standby promoted and the last two of it on timeline
// 2. prune --keep 2 --dry-run deletes nothing; prune --keep 2 deletes
// exactly the three old backups and the WAL, on both timelines, whose
// segment ends at or before the start segment of the 4th backup; history
// files and everything above stay; backup list shows two; both kept
// backups restore to the end with every row.
func TestBackupRetention(t *testing.T) {
	t.Parallel()
	testBackupRetention(t, "barman-cloud")
}

func testBackupRetention(t *testing.T, layoutName string) {
	st := newStack(t)
	layout, err := sinks.NewLayout(layoutName, st.prefix, st.server)
	if err != nil {
		t.Fatal(err)
	}
	wrapper := fetchWrapper(t, st)
	primary := st.pg
	primary.Exec(`CREATE TABLE rpo (id serial primary key, phase text, at timestamptz default clock_timestamp())`)
	standby := primary.StartStandby()
	st.pg = standby
	w := startWalship(t, st.env(), st.args("run", "--create-slot", "--layout", layoutName, "--partial-interval", "0")...)
	waitFor(t, 30*time.Second, "streaming from the standby", func() bool { return st.walsenderPID() != "" })
	dest := []string{"--dest", "s3://" + st.s3.Bucket + "/" + st.prefix, "--s3-endpoint", st.s3.Endpoint(), "--s3-path-style", "--layout", layoutName, "--server", st.server}
	walship := func(args ...string) string {
		t.Helper()
		out, err := runWalship(t, st.env(), append(args, dest...)...)
		if err != nil {
			t.Fatalf("walship %s: %v\n%s", strings.Join(args, " "), err, out)
		}
		return out
	}
	// rows commits rows on p and ends the segment.
	rows := func(p *testenv.Postgres, phase string) {
		p.Exec(`INSERT INTO rpo (phase) SELECT $1 FROM generate_series(1, 50)`, phase)
		p.Exec(`SELECT pg_switch_wal()`)
	}
	takeBackup := func(p *testenv.Postgres) backup.Catalog {
		t.Helper()
		args := st.backupArgs(st.s3.Endpoint(), "--layout", layoutName, "--chunk-size", "1MiB")
		args[slices.Index(args, "--pg")+1] = p.URL("postgres")
		_, wait := backupCmd(t, st, args)
		id, log, err := wait()
		if err != nil {
			t.Fatalf("walship backup: %v\n%s", err, log)
		}
		return st.catalogIn(t, layout, id)
	}

	cur := primary
	var cats []backup.Catalog
	for i := 0; i < 5; i++ {
		if i == 3 {
			// The timeline switch: the standby walship streams from is promoted.
			want := count(primary, `SELECT count(*)::text FROM rpo`)
			waitFor(t, 30*time.Second, "the standby to replay timeline 1", func() bool {
				return count(standby, `SELECT count(*)::text FROM rpo`) == want
			})
			primary.Stop("fast")
			standby.Promote()
			waitFor(t, 30*time.Second, "promotion", func() bool { return standby.QueryString(`SELECT pg_is_in_recovery()::text`) == "false" })
			cur = standby
		} else {
			rows(cur, "before "+string(rune('1'+i)))
		}
		cats = append(cats, takeBackup(cur))
		rows(cur, "after "+string(rune('1'+i)))
	}
	end := st.switchWAL()
	waitFor(t, 60*time.Second, "everything archived", func() bool { return st.replFlush() >= end })
	if err := w.stop(t); err != nil {
		t.Fatalf("walship exit: %v", err)
	}
	all := rowIDs(t, standby, "")
	ids := make([]string, len(cats))
	for i, c := range cats {
		ids[i] = c.ID
		t.Logf("backup %d: %s timeline %d %s-%s", i+1, c.ID, c.Timeline, c.StartLSN, c.EndLSN)
	}
	if cats[2].Timeline != 1 || cats[3].Timeline != 2 || cats[4].Timeline != 2 {
		t.Fatalf("timelines of the backups: %d %d %d, want 1 2 2", cats[2].Timeline, cats[3].Timeline, cats[4].Timeline)
	}

	var list listJSON
	if err := json.Unmarshal([]byte(walship("backup", "list", "--json")), &list); err != nil {
		t.Fatal(err)
	}
	if len(list.Backups) != 5 {
		t.Fatalf("backup list: %d backups, want 5", len(list.Backups))
	}
	for i, b := range list.Backups {
		if b.ID != ids[i] || !b.Complete || b.Window.Gap || b.Window.EndLSN < end {
			t.Errorf("backup list, backup %d: %+v, want %s complete, recoverable to at least %s without a gap", i+1, b, ids[i], end)
		}
	}

	// The bucket holds both timelines: timeline 1's segments, the .partial
	// at the switch, timeline 2's, and the history file.
	before := st.bucketKeys(t)
	history := layout.Key("00000002.history", "")
	var tl1, tl1Partial bool
	for key := range before {
		if seg, ok := walSegmentOf(key); ok && seg.Timeline == 1 {
			tl1 = true
			tl1Partial = tl1Partial || strings.Contains(key, ".partial")
		}
		if strings.HasPrefix(key, history) {
			history = key
		}
	}
	if !before[history] || !tl1 || !tl1Partial {
		t.Fatalf("before prune: history %v, timeline 1 WAL %v, its .partial %v; want all three:\n%v", before[history], tl1, tl1Partial, keysOfSet(before))
	}

	// --dry-run deletes nothing.
	out := walship("prune", "--keep", "2", "--dry-run")
	t.Logf("prune --keep 2 --dry-run:\n%s", out)
	if after := st.bucketKeys(t); !maps.Equal(after, before) {
		t.Fatalf("prune --dry-run changed the bucket: %d keys before, %d after", len(before), len(after))
	}
	for _, id := range ids[:3] {
		if !strings.Contains(out, "would delete backup "+id) {
			t.Errorf("prune --dry-run does not say it would delete backup %s", id)
		}
	}

	restoreAll := func(id string) {
		t.Helper()
		r, _ := restoreAndStart(t, st, standby, "r"+id, append([]string{"restore", "--backup", id, "--walship-bin", wrapper}, dest...)...)
		got := rowIDs(t, r, "")
		if missing, extra := diffIDs(got, all); len(missing) > 0 || len(extra) > 0 {
			t.Errorf("restore of kept backup %s: %d rows, want %d; missing %v, extra %v", id, len(got), len(all), missing, extra)
		}
		if tli := r.QueryString(`SELECT substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8)`); tli != "00000003" {
			t.Errorf("restore of kept backup %s: on timeline %s, want 3 (recovery followed timeline 2 to its end)", id, tli)
		}
		r.Stop("fast")
	}
	// deletedPerTimeline counts the WAL objects in before and not in after.
	deletedPerTimeline := func(before, after map[string]bool) map[uint32]int {
		n := map[uint32]int{}
		for key := range before {
			if seg, ok := walSegmentOf(key); ok && !after[key] {
				n[seg.Timeline]++
			}
		}
		return n
	}

	// prune --keep 3 keeps backup 3, on timeline 1: the floor is its start
	// segment; timeline 1's WAL from there, the .partial at the switch and
	// the history file stay, and backup 3 restores through the switch to
	// the end of timeline 2.
	out = walship("prune", "--keep", "3")
	t.Logf("prune --keep 3 (floor %s):\n%s", segSize.Start(cats[2].StartLSN), out)
	st.checkPruned(t, before, segSize.Start(cats[2].StartLSN), ids[:2])
	after := st.bucketKeys(t)
	for key := range before {
		if seg, ok := walSegmentOf(key); ok && seg.Timeline == 1 && strings.Contains(key, ".partial") && !after[key] {
			t.Errorf("prune --keep 3 deleted %s, the end of timeline 1 that backup 3 recovers through", key)
		}
	}
	restoreAll(ids[2])

	// prune --keep 2: the floor is the start of the 4th backup's segment,
	// on timeline 2; WAL below it goes on both timelines.
	before = after
	floor := segSize.Start(cats[3].StartLSN)
	out = walship("prune", "--keep", "2")
	t.Logf("prune --keep 2 (floor %s):\n%s", floor, out)
	st.checkPruned(t, before, floor, ids[2:3])
	after = st.bucketKeys(t)
	if !after[history] {
		t.Errorf("prune deleted %s", history)
	}
	if n := deletedPerTimeline(before, after); n[1] == 0 || n[2] == 0 {
		t.Errorf("prune --keep 2 deleted %d WAL objects of timeline 1 and %d of timeline 2; the test wants both", n[1], n[2])
	}
	for key := range after {
		for _, id := range ids[:3] {
			if strings.Contains(key, id) {
				t.Errorf("%s of a pruned backup is still there", key)
			}
		}
	}
	var kept listJSON
	if err := json.Unmarshal([]byte(walship("backup", "list", "--json")), &kept); err != nil {
		t.Fatal(err)
	}
	if len(kept.Backups) != 2 || kept.Backups[0].ID != ids[3] || kept.Backups[1].ID != ids[4] {
		t.Errorf("backup list after prune: %+v, want %v", kept.Backups, ids[3:])
	}
	for _, b := range kept.Backups {
		if !b.Complete || b.Window.Gap || b.Window.EndLSN < end {
			t.Errorf("backup list after prune: %+v, want complete, recoverable to at least %s without a gap", b, end)
		}
	}

	// Both kept backups restore, to the end, with every row.
	restoreAll(ids[3])
	restoreAll(ids[4])
}

func keysOfSet(m map[string]bool) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	slices.Sort(out)
	return out
}
