package e2e

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/walship/walship/internal/testenv"
	"github.com/walship/walship/pipeline"
)

// restoreCommand is restore_command for a restored cluster: walship fetch
// with this stack's destination, as the postgres user runs it.
func (st *stack) restoreCommand(layout string, extra ...string) string {
	os.Chmod(filepath.Dir(walshipBin), 0o755)
	parts := append([]string{"env"}, st.env()...)
	parts = append(parts, walshipBin, "fetch", "%f", "%p", "--dest", "s3://"+st.s3.Bucket+"/"+st.prefix,
		"--s3-endpoint", st.s3.Endpoint(), "--s3-path-style", "--server", st.server, "--layout", layout)
	parts = append(parts, extra...)
	return strings.Join(parts, " ")
}

func count(p *testenv.Postgres, sql string) int {
	n, err := strconv.Atoi(p.QueryString(sql))
	if err != nil {
		p.Log()
	}
	return n
}

// pitrSetup streams with walship while it takes a base backup and writes
// rows before and after a restore point; it returns the backup, and how
// many rows each phase committed.
func pitrSetup(t *testing.T, st *stack, layout, codec string) (backup string, before, after int) {
	st.pg.Exec(`CREATE TABLE ledger (id serial primary key, phase text, at timestamptz default clock_timestamp())`)
	if err := st.pg.Pgbench(context.Background(), "-i", "-s", "1", "-q"); err != nil {
		t.Fatal(err)
	}
	w := startWalship(t, st.env(), st.args("run", "--create-slot", "--layout", layout, "--compression", codec)...)
	waitFor(t, 30*time.Second, "streaming", func() bool { return st.walsenderPID() != "" })
	backup = st.pg.BaseBackup()

	ctx, cancel := context.WithCancel(context.Background())
	bench := make(chan error, 1)
	go func() { bench <- st.pg.Pgbench(ctx, "-c", "2", "-T", "600", "-n") }()
	conn := st.pg.Conn(context.Background())
	defer conn.Close(context.Background())
	insert := func(phase string, n int) {
		for i := 0; i < n; i++ {
			if _, err := conn.Exec(context.Background(), `INSERT INTO ledger (phase) VALUES ($1)`, phase); err != nil {
				t.Fatal(err)
			}
			if i%50 == 0 {
				time.Sleep(20 * time.Millisecond)
			}
		}
	}
	before, after = 400, 300
	insert("before", before)
	st.pg.Exec(`SELECT pg_create_restore_point('walship_rp')`)
	insert("after", after)
	time.Sleep(2 * time.Second)
	cancel()
	if err := <-bench; err != nil {
		t.Fatal(err)
	}
	end := st.switchWAL()
	waitFor(t, 90*time.Second, "everything archived", func() bool { return st.replFlush() >= end })
	if err := w.stop(t); err != nil {
		t.Fatalf("walship exit: %v", err)
	}
	return backup, before, after
}

func waitPromoted(t *testing.T, r *testenv.Postgres) {
	waitFor(t, 120*time.Second, "recovery to finish", func() bool {
		return r.QueryString(`SELECT pg_is_in_recovery()::text`) == "false"
	})
}

// Point-in-time recovery from walship's archive alone: to a named restore
// point (every row before it, none after), and to the end (every row).
func TestPointInTimeRecovery(t *testing.T) {
	for _, c := range []struct{ layout, codec string }{{"barman-cloud", "zstd"}, {"wal-g", "gzip"}} {
		t.Run(c.layout+"-"+c.codec, func(t *testing.T) {
			st := newStack(t)
			backup, before, after := pitrSetup(t, st, c.layout, c.codec)

			r := st.pg.Restored(backup, "restore_command = '"+st.restoreCommand(c.layout)+"'",
				"recovery_target_name = 'walship_rp'", "recovery_target_action = 'promote'")
			if err := r.TryStart(120 * time.Second); err != nil {
				t.Fatalf("%v\n%s", err, r.Log())
			}
			waitPromoted(t, r)
			if got := count(r, `SELECT count(*)::text FROM ledger WHERE phase = 'before'`); got != before {
				t.Errorf("restore point: %d rows from before it, want %d", got, before)
			}
			if got := count(r, `SELECT count(*)::text FROM ledger WHERE phase = 'after'`); got != 0 {
				t.Errorf("restore point: %d rows from after it, want 0", got)
			}
			r.Stop("fast")

			full := st.pg.Restored(backup, "restore_command = '"+st.restoreCommand(c.layout)+"'")
			if err := full.TryStart(120 * time.Second); err != nil {
				t.Fatalf("%v\n%s", err, full.Log())
			}
			waitPromoted(t, full)
			if got := count(full, `SELECT count(*)::text FROM ledger`); got != before+after {
				t.Errorf("full recovery: %d rows, want %d", got, before+after)
			}
			want := st.pg.QueryString(`SELECT sum(abalance)::text FROM pgbench_accounts`)
			if got := full.QueryString(`SELECT sum(abalance)::text FROM pgbench_accounts`); got != want {
				t.Errorf("full recovery: pgbench balance %s, want %s", got, want)
			}
		})
	}
}

// Recovery waits out a short S3 outage and completes; a long one makes it
// abort, and the server never opens.
func TestFetchUnderFaults(t *testing.T) {
	st := newStack(t)
	backup, before, after := pitrSetup(t, st, "barman-cloud", "zstd")

	st.s3.Stop()
	r := st.pg.Restored(backup, "restore_command = '"+st.restoreCommand("barman-cloud", "--retry-for", "2m")+"'")
	started := make(chan error, 1)
	go func() { started <- r.TryStart(180 * time.Second) }()
	time.Sleep(4 * time.Second)
	st.s3.Start()
	if err := <-started; err != nil {
		t.Fatalf("%v\n%s", err, r.Log())
	}
	waitPromoted(t, r)
	if got := count(r, `SELECT count(*)::text FROM ledger`); got != before+after {
		t.Errorf("after a short outage: %d rows, want %d", got, before+after)
	}
	r.Stop("fast")

	st.s3.Stop()
	dead := st.pg.Restored(backup, "restore_command = '"+st.restoreCommand("barman-cloud", "--retry-for", "3s")+"'")
	err := dead.TryStart(60 * time.Second)
	if err == nil {
		t.Fatal("the server started while its archive was unreachable")
	}
	waitFor(t, 30*time.Second, "the server to exit", func() bool { return !dead.Running() })
	log := dead.Log()
	if strings.Contains(log, "ready to accept connections") || strings.Contains(log, "selected new timeline") {
		t.Errorf("recovery ended instead of aborting:\n%s", log)
	}
	if !strings.Contains(log, "walship: cannot fetch") {
		t.Errorf("the server log does not show walship's reason:\n%s", log)
	}
}

// A flipped byte in the bucket is refused loudly by fetch and named by
// verify --deep; a deleted object is reported as an exact gap.
func TestCorruptionAndGaps(t *testing.T) {
	st := newStack(t)
	w := startWalship(t, st.env(), st.args("run", "--create-slot")...)
	waitFor(t, 30*time.Second, "streaming", func() bool { return st.walsenderPID() != "" })
	end := st.writeSegments(6)
	waitFor(t, 60*time.Second, "archiving", func() bool { return st.replFlush() >= end })
	if err := w.stop(t); err != nil {
		t.Fatal(err)
	}
	flags := []string{"--dest", "s3://" + st.s3.Bucket + "/" + st.prefix, "--s3-endpoint", st.s3.Endpoint(), "--s3-path-style", "--server", st.server}
	if out, err := runWalship(t, st.env(), append([]string{"verify", "--deep"}, flags...)...); err != nil || !strings.Contains(out, "OK: no gaps") {
		t.Fatalf("verify on a clean archive: %v\n%s", err, out)
	}

	have := st.archivedSegments()
	nums := sortedKeys(have)
	victim := nums[len(nums)/2]
	name := pipeline.Segment{Timeline: 1, No: victim}.Name(segSize)
	path := filepath.Join(st.s3.Root, st.s3.Bucket, have[victim])
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	flipped := append([]byte(nil), data...)
	flipped[len(flipped)/2] ^= 0x40
	if err := os.WriteFile(path, flipped, 0o644); err != nil {
		t.Fatal(err)
	}
	dest := filepath.Join(t.TempDir(), "RECOVERYXLOG")
	out, err := runWalship(t, st.env(), append([]string{"fetch", name, dest, "--prefetch", "0", "--retry-for", "10s"}, flags...)...)
	if ee, ok := err.(*exec.ExitError); !ok || ee.ExitCode() <= 125 {
		t.Errorf("fetch of a corrupt segment: %v, want an exit status above 125 so recovery aborts\n%s", err, out)
	}
	if !strings.Contains(out, "refusing to restore "+name) {
		t.Errorf("fetch output does not say why:\n%s", out)
	}
	if _, err := os.Stat(dest); err == nil {
		t.Error("fetch wrote a corrupt segment for PostgreSQL")
	}
	out, err = runWalship(t, st.env(), append([]string{"verify", "--deep"}, flags...)...)
	if err == nil || !strings.Contains(out, have[victim]) {
		t.Errorf("verify --deep did not name %s (%v):\n%s", have[victim], err, out)
	}
	os.WriteFile(path, data, 0o644)

	// A gap: delete one object.
	gone := nums[len(nums)/3]
	os.Remove(filepath.Join(st.s3.Root, st.s3.Bucket, have[gone]))
	out, err = runWalship(t, st.env(), append([]string{"verify"}, flags...)...)
	goneName := pipeline.Segment{Timeline: 1, No: gone}.Name(segSize)
	if err == nil || !strings.Contains(out, fmt.Sprintf("GAP %s .. %s (1 segments missing)", goneName, goneName)) {
		t.Errorf("verify did not report the gap at %s (%v):\n%s", goneName, err, out)
	}
	// And fetch says "not in the archive" (exit 1) for it.
	_, err = runWalship(t, st.env(), append([]string{"fetch", goneName, dest, "--prefetch", "0", "--retry-for", "10s"}, flags...)...)
	if ee, ok := err.(*exec.ExitError); !ok || ee.ExitCode() != 1 {
		t.Errorf("fetch of a missing segment: %v, want exit status 1", err)
	}
}

// Debian's barman-cloud-wal-restore reads walship's gzip archive in the
// barman-cloud layout, byte for byte.
func TestBarmanCloudReadsWalship(t *testing.T) {
	bin, err := exec.LookPath("barman-cloud-wal-restore")
	if err != nil {
		t.Fatal("barman-cloud-wal-restore not installed: scripts/deps.sh installs barman-cli-cloud and python3-boto3")
	}
	st := newStack(t)
	w := startWalship(t, st.env(), st.args("run", "--create-slot", "--compression", "gzip")...)
	waitFor(t, 30*time.Second, "streaming", func() bool { return st.walsenderPID() != "" })
	first := uint64(segSize.Start(st.slotRestart())) / uint64(segSize)
	end := st.writeSegments(4)
	waitFor(t, 60*time.Second, "archiving", func() bool { return st.replFlush() >= end })
	if err := w.stop(t); err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	n := 0
	for no := first; no < uint64(end)/uint64(segSize); no++ {
		name := pipeline.Segment{Timeline: 1, No: no}.Name(segSize)
		cmd := exec.Command("/usr/bin/python3", bin, "--endpoint-url", st.s3.Endpoint(), "--cloud-provider", "aws-s3",
			"s3://"+st.s3.Bucket+"/"+st.prefix, st.server, name, filepath.Join(dir, name))
		cmd.Env = append(os.Environ(), st.env()...)
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("barman-cloud-wal-restore %s: %v\n%s", name, err, out)
		}
		got, _ := os.ReadFile(filepath.Join(dir, name))
		want, _ := os.ReadFile(filepath.Join(st.pg.WALDir(), name))
		if !bytes.Equal(got, want) || len(want) == 0 {
			t.Errorf("segment %s restored by barman differs from pg_wal", name)
		}
		n++
	}
	if n < 4 {
		t.Errorf("only %d segments compared", n)
	}
}
