package e2e

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/walship/walship/internal/testenv"
	"github.com/walship/walship/pipeline"
)

// receiverArgs runs a receiver alone with its own data directory and
// metrics port, as on another host.
func (st *stack) receiverArgs(dataDir string, metricsPort int, extra ...string) []string {
	a := []string{"receive", "--pg", st.pg.URL("postgres"), "--nats", st.nats.URL(), "--server", st.server, "--create-slot",
		"--dest", "s3://" + st.s3.Bucket + "/" + st.prefix, "--s3-endpoint", st.s3.Endpoint(),
		"--data-dir", dataDir, "--metrics-addr", "127.0.0.1:" + strconv.Itoa(metricsPort), "--status-interval", "1s", "--log-level", "debug"}
	return append(a, extra...)
}

func (st *stack) archiverArgs(metricsPort int) []string {
	return []string{"archive", "--nats", st.nats.URL(), "--dest", "s3://" + st.s3.Bucket + "/" + st.prefix, "--s3-endpoint", st.s3.Endpoint(),
		"--s3-path-style", "--metrics-addr", "127.0.0.1:" + strconv.Itoa(metricsPort), "--data-dir", st.dataDir}
}

func metricAt(port int, name string) (float64, bool) {
	st := &stack{metrics: port}
	return st.metric(name)
}

// A second receiver waits while the first streams, takes over within
// seconds of the first dying, and the archive has no gap. The two never
// stream at once.
func TestTakeover(t *testing.T) {
	st := newStack(t)
	startWalship(t, st.env(), st.archiverArgs(testenv.FreePort(t))...)
	portA, portB := testenv.FreePort(t), testenv.FreePort(t)
	a := startWalship(t, st.env(), st.receiverArgs(t.TempDir(), portA, "--standby")...)
	waitFor(t, 30*time.Second, "receiver A streaming", func() bool { return st.walsenderPID() != "" })
	firstSeg := uint64(segSize.Start(st.slotRestart())) / uint64(segSize)
	startWalship(t, st.env(), st.receiverArgs(t.TempDir(), portB, "--standby")...)
	waitFor(t, 30*time.Second, "receiver B to report standby", func() bool {
		v, ok := metricAt(portB, "walship_receiver_standby")
		return ok && v == 1
	})

	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	defer func() { cancel(); wg.Wait() }() // however the test ends
	wg.Add(1)
	go func() {
		defer wg.Done()
		for ctx.Err() == nil {
			if n := st.pg.QueryString(`SELECT count(*)::text FROM pg_stat_replication WHERE application_name = 'walship'`); n != "0" && n != "1" {
				t.Errorf("%s walship connections stream at once", n)
			}
			time.Sleep(50 * time.Millisecond)
		}
	}()
	st.writeSegments(3)
	a.cmd.Process.Kill()
	<-a.done
	killed := time.Now()
	end := st.writeSegments(3)
	waitFor(t, 30*time.Second, "receiver B to take over", func() bool {
		v, ok := metricAt(portB, "walship_receiver_connected")
		return ok && v == 1
	})
	t.Logf("takeover %.1fs after the kill", time.Since(killed).Seconds())
	waitFor(t, 60*time.Second, "archiving after the takeover", func() bool { return st.replFlush() >= end })
	cancel()
	wg.Wait()
	st.checkArchive(firstSeg, uint64(end)/uint64(segSize))
}

// PostgreSQL restarted fast and immediately, and the receiver killed, all
// under load: every segment is archived and equals pg_wal.
func TestRestarts(t *testing.T) {
	st := newStack(t)
	if err := st.pg.Pgbench(context.Background(), "-i", "-s", "1", "-q"); err != nil {
		t.Fatal(err)
	}
	args := st.args("run", "--create-slot")
	w := startWalship(t, st.env(), args...)
	waitFor(t, 30*time.Second, "streaming", func() bool { return st.walsenderPID() != "" })
	firstSeg := uint64(segSize.Start(st.slotRestart())) / uint64(segSize)

	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	defer func() { cancel(); wg.Wait() }() // however the test ends
	wg.Add(1)
	go func() { // load that survives restarts
		defer wg.Done()
		for ctx.Err() == nil {
			c, stop := context.WithTimeout(ctx, 2*time.Second)
			st.pg.Pgbench(c, "-c", "2", "-T", "2", "-n")
			stop()
			time.Sleep(100 * time.Millisecond)
		}
	}()
	// After each disruption: archiving catches up, and every segment so far
	// is in the bucket and equals pg_wal.
	settle := func(what string) {
		end := st.switchWAL()
		waitFor(t, 90*time.Second, "archiving to catch up after "+what, func() bool { return st.replFlush() >= end })
		n := st.checkArchive(firstSeg, uint64(end)/uint64(segSize))
		t.Logf("after %s: %d segments compared", what, n)
	}
	for _, mode := range []string{"fast", "immediate"} {
		time.Sleep(2 * time.Second)
		st.pg.Stop(mode)
		time.Sleep(time.Second)
		st.pg.Start()
		waitFor(t, 60*time.Second, "walship to reconnect after a "+mode+" restart", func() bool { return st.walsenderPID() != "" })
		settle("a " + mode + " restart")
	}
	time.Sleep(2 * time.Second)
	w.cmd.Process.Kill()
	<-w.done
	w = startWalship(t, st.env(), args...)
	waitFor(t, 30*time.Second, "the restarted receiver", func() bool { return st.walsenderPID() != "" })
	settle("kill -9 of the receiver")
	time.Sleep(2 * time.Second)
	cancel()
	wg.Wait()
	end := st.switchWAL()
	waitFor(t, 90*time.Second, "archiving to catch up", func() bool { return st.replFlush() >= end })
	if err := w.stop(t); err != nil {
		t.Fatal(err)
	}
	n := st.checkArchive(firstSeg, uint64(end)/uint64(segSize))
	t.Logf("%d segments compared after two PostgreSQL restarts and a kill -9", n)
}

// PostgreSQL invalidates the slot while the archivers are stopped: walship
// reports it and stops, refuses to run on the lost slot, and
// `slot create --recreate` records the gap and lets it start again.
func TestSlotInvalidation(t *testing.T) {
	st := newStack(t, "max_slot_wal_keep_size = '4MB'", "wal_keep_size = 0")
	port := testenv.FreePort(t)
	args := st.receiverArgs(t.TempDir(), port)
	w := startWalship(t, st.env(), args...) // no archiver: nothing is confirmed
	waitFor(t, 30*time.Second, "streaming", func() bool { return st.walsenderPID() != "" })
	// max_slot_wal_keep_size is 4MB: safe_wal_size is under the warning
	// threshold (1GB by default) from the start.
	waitFor(t, 15*time.Second, "the safe_wal_size warning", func() bool {
		v, ok := metricAt(port, "walship_slot_safe_wal_size_low")
		return ok && v == 1
	})
	// Past max_slot_wal_keep_size the slot is "unreserved" until the next
	// checkpoint removes its WAL and invalidates it.
	sawBad := false
	for i := 0; i < 20 && !sawBad; i++ {
		st.writeSegments(2)
		waitUntil(3*time.Second, func() bool {
			v, ok := metricAt(port, `walship_slot_wal_status{server="main",wal_status="unreserved"}`)
			sawBad = ok && v == 1
			return sawBad
		})
	}
	for i := 0; i < 20 && !w.exited(); i++ {
		st.writeSegments(1)
		st.pg.Exec(`CHECKPOINT`)
		time.Sleep(300 * time.Millisecond)
	}
	select {
	case <-w.done:
	case <-time.After(30 * time.Second):
		t.Fatal("walship kept running on an invalidated slot")
	}
	if w.err == nil {
		t.Error("walship exited 0 on an invalidated slot")
	}
	if !sawBad {
		t.Error("walship_slot_wal_status never showed unreserved before the slot was lost")
	}
	if st.pg.QueryString(`SELECT wal_status FROM pg_replication_slots WHERE slot_name = 'walship'`) != "lost" {
		t.Fatal("the slot was not invalidated; the test proves nothing")
	}
	out, err := runWalship(t, st.env(), args...)
	if err == nil || !strings.Contains(out, "invalidated") || !strings.Contains(out, "--recreate") {
		t.Errorf("walship on a lost slot: %v\n%s", err, out)
	}
	out, err = runWalship(t, st.env(), "slot", "create", "--recreate", "--pg", st.pg.URL("postgres"), "--server", st.server,
		"--dest", "s3://"+st.s3.Bucket+"/"+st.prefix, "--s3-endpoint", st.s3.Endpoint(), "--s3-path-style")
	if err != nil || !strings.Contains(out, "gap") {
		t.Fatalf("slot create --recreate: %v\n%s", err, out)
	}
	marker := false
	for _, k := range keysOf(st.archivedFilesUnder(st.prefix + "/" + st.server + "/walship-gaps/")) {
		if strings.HasSuffix(k, ".json") {
			marker = true
		}
	}
	if !marker {
		t.Error("no gap marker in the archive")
	}
	startWalship(t, st.env(), args...)
	waitFor(t, 30*time.Second, "streaming on the recreated slot", func() bool { return st.walsenderPID() != "" })
}

// synchronous_commit = remote_write with walship as the synchronous
// standby: a commit returns only once its WAL is in walship's spool.
func TestSynchronousCommit(t *testing.T) {
	st := newStack(t, "autovacuum = off")
	args := st.args("run", "--create-slot", "--synchronous")
	w := startWalship(t, st.env(), args...)
	waitFor(t, 30*time.Second, "streaming", func() bool { return st.walsenderPID() != "" })
	firstSeg := uint64(segSize.Start(st.slotRestart())) / uint64(segSize)
	st.pg.Exec(`ALTER SYSTEM SET synchronous_standby_names = 'walship'`)
	st.pg.Exec(`SELECT pg_reload_conf()`)
	waitFor(t, 30*time.Second, "walship to be the synchronous standby", func() bool {
		return st.pg.QueryString(`SELECT sync_state FROM pg_stat_replication WHERE application_name = 'walship'`) == "sync"
	})
	st.pg.Exec(`CREATE TABLE sync_rows (id int, note text)`)
	st.pg.Exec(`CREATE EXTENSION pg_walinspect`)

	ctx := context.Background()
	conn := st.pg.Conn(ctx)
	defer conn.Close(ctx)
	if _, err := conn.Exec(ctx, `SET synchronous_commit = remote_write`); err != nil {
		t.Fatal(err)
	}
	var before, xid string
	if err := conn.QueryRow(ctx, `SELECT pg_current_wal_insert_lsn()::text`).Scan(&before); err != nil {
		t.Fatal(err)
	}
	tx, err := conn.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := tx.QueryRow(ctx, `INSERT INTO sync_rows VALUES (1, 'must survive') RETURNING pg_current_xact_id()::text`).Scan(&xid); err != nil {
		t.Fatal(err)
	}
	if err := tx.Commit(ctx); err != nil { // returns once walship has it fsynced
		t.Fatal(err)
	}
	w.cmd.Process.Kill() // right after the commit returned
	<-w.done

	// The end of the commit's own WAL record: what the spool must hold.
	var commitEnd string
	if err := conn.QueryRow(ctx, `SELECT end_lsn::text FROM pg_get_wal_records_info($1::pg_lsn, pg_current_wal_flush_lsn())
		WHERE xid::text = $2 AND resource_manager = 'Transaction' AND record_type LIKE 'COMMIT%'`, before, xid).Scan(&commitEnd); err != nil {
		t.Fatalf("find the commit record of transaction %s: %v", xid, err)
	}
	at, _ := pipeline.ParseLSN(commitEnd)
	seg := pipeline.SegmentOf(1, at-1, segSize)
	dir := filepath.Join(st.dataDir, "spool", st.server)
	spooled, err := os.ReadFile(filepath.Join(dir, seg.Name(segSize)+".partial"))
	if err != nil {
		spooled, err = os.ReadFile(filepath.Join(dir, seg.Name(segSize)))
	}
	if err != nil {
		t.Fatalf("the commit's segment is not in the spool: %v", err)
	}
	want, _ := os.ReadFile(filepath.Join(st.pg.WALDir(), seg.Name(segSize)))
	n := segSize.Offset(at-1) + 1
	if !bytes.Equal(spooled[:n], want[:n]) {
		t.Fatalf("the spool does not hold the committed WAL up to %s", at)
	}

	startWalship(t, st.env(), args...)
	end := st.switchWAL()
	waitFor(t, 60*time.Second, "the committed WAL to reach the bucket", func() bool { return st.replFlush() >= end })
	st.checkArchive(firstSeg, uint64(end)/uint64(segSize))
}

func (st *stack) archivedFilesUnder(prefix string) map[string]string {
	out := map[string]string{}
	res, err := st.s3.Client().ListObjectsV2(context.Background(), listInput(st.s3.Bucket, prefix))
	if err != nil {
		st.t.Fatal(err)
	}
	for _, o := range res.Contents {
		out[*o.Key] = *o.Key
	}
	return out
}

// waitUntil polls cond until it holds or the timeout passes.
func waitUntil(timeout time.Duration, cond func() bool) bool {
	for deadline := time.Now().Add(timeout); time.Now().Before(deadline); time.Sleep(100 * time.Millisecond) {
		if cond() {
			return true
		}
	}
	return false
}

// Defect 10 of issue 8: with a pg_hba.conf that allows walship's role
// replication connections only, the slot's health is still watched (over
// a replication connection) instead of the poller failing in silence.
func TestSlotPollReplicationOnly(t *testing.T) {
	st := newStack(t)
	st.pg.Exec(`CREATE ROLE replonly LOGIN REPLICATION`)
	port := testenv.FreePort(t)
	args := []string{"receive", "--pg", strings.Replace(st.pg.URL("postgres"), "postgres@", "replonly@", 1), "--nats", st.nats.URL(),
		"--server", st.server, "--create-slot", "--dest", "s3://" + st.s3.Bucket + "/" + st.prefix, "--s3-endpoint", st.s3.Endpoint(),
		"--data-dir", t.TempDir(), "--metrics-addr", "127.0.0.1:" + strconv.Itoa(port), "--log-level", "debug"}
	startWalship(t, st.env(), args...)
	waitFor(t, 30*time.Second, "streaming as a replication-only role", func() bool { return st.walsenderPID() != "" })
	waitFor(t, 30*time.Second, "the slot's health to be read over a replication connection", func() bool {
		v, ok := metricAt(port, "walship_slot_exists")
		return ok && v == 1
	})
	if v, ok := metricAt(port, `walship_errors_total{server="main",stage="slotpoll"}`); !ok || v != 0 {
		t.Errorf("slot poll errors %v (%v): the fallback did not read the slot", v, ok)
	}
}
