package e2e

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/walship/walship/pipeline"
)

// writeSegments fills n segments with inserts and switches, returning the
// end of the last.
func (st *stack) writeSegments(n int) pipeline.LSN {
	st.pg.Exec(`CREATE TABLE IF NOT EXISTS filler (id bigserial, payload text)`)
	var end pipeline.LSN
	for i := 0; i < n; i++ {
		st.pg.Exec(`INSERT INTO filler (payload) SELECT repeat(md5(random()::text), 8) FROM generate_series(1, 2000)`)
		end = st.switchWAL()
	}
	return end
}

func (st *stack) walsenderPID() string {
	// Not 'startup': a walsender shows from the connection on, before the
	// receiver has created its slot and started replication.
	return st.pg.QueryString(`SELECT pid::text FROM pg_stat_replication WHERE application_name = 'walship' AND state <> 'startup'`)
}

// outage runs the common shape of the outage tests: stream, take a part
// away, write WAL, check the slot holds and the walsender stays, bring the
// part back, check the archive catches up without a gap.
func outage(t *testing.T, st *stack, args []string, down, up func()) {
	w := startWalship(t, st.env(), args...)
	waitFor(t, 30*time.Second, "streaming", func() bool { return st.walsenderPID() != "" })
	firstSeg := uint64(segSize.Start(st.slotRestart())) / uint64(segSize)
	before := st.writeSegments(3)
	waitFor(t, 60*time.Second, "archiving before the outage", func() bool { return st.replFlush() >= before })

	pid := st.walsenderPID()
	held := st.slotRestart()
	down()
	end := st.writeSegments(8)
	lag1, _ := st.metric("walship_archive_lag_bytes")
	// Longer than wal_sender_timeout (5s): a blocked receiver would be cut off.
	time.Sleep(8 * time.Second)
	st.writeSegments(2)
	time.Sleep(2 * time.Second)
	if got := st.slotRestart(); got != held {
		t.Errorf("restart_lsn moved from %s to %s while a stage was down", held, got)
	}
	if got := st.walsenderPID(); got != pid {
		t.Errorf("walsender changed from pid %q to %q: the receiver stopped answering during the outage", pid, got)
	}
	if got := st.lsn(`SELECT write_lsn::text FROM pg_stat_replication WHERE application_name = 'walship'`); got < end {
		t.Errorf("write_lsn %s behind %s: the receiver stopped writing the spool during the outage", got, end)
	}
	lag2, ok := st.metric("walship_archive_lag_bytes")
	if !ok || lag2 < float64(10*segSize) || lag2 <= lag1 {
		t.Errorf("walship_archive_lag_bytes %v then %v during the outage, want growth past 10 segments", lag1, lag2)
	}
	if secs, _ := st.metric("walship_archive_lag_seconds"); secs < 5 {
		t.Errorf("walship_archive_lag_seconds %v during a 10s outage", secs)
	}
	up()
	final := st.switchWAL()
	waitFor(t, 120*time.Second, "archiving to catch up", func() bool { return st.replFlush() >= final })
	if err := w.stop(t); err != nil {
		t.Fatalf("walship exit: %v", err)
	}
	st.checkArchive(firstSeg, uint64(final)/uint64(segSize))
}

func TestS3Down(t *testing.T) {
	st := newStack(t, "wal_sender_timeout = '5s'")
	outage(t, st, st.args("run", "--create-slot"), st.s3.Stop, st.s3.Start)
}

func TestNATSDown(t *testing.T) {
	st := newStack(t, "wal_sender_timeout = '5s'")
	outage(t, st, st.args("run", "--create-slot"), st.nats.Stop, st.nats.Start)
}

// The receiver dies by SIGKILL with a segment half written; the restarted
// one streams that segment again from its start, and the archive has no gap
// and no differing duplicate (put-if-absent would refuse one, and the byte
// comparison would show it).
func TestKill9MidSegment(t *testing.T) {
	st := newStack(t)
	args := st.args("run", "--create-slot")
	w := startWalship(t, st.env(), args...)
	waitFor(t, 30*time.Second, "streaming", func() bool { return st.walsenderPID() != "" })
	firstSeg := uint64(segSize.Start(st.slotRestart())) / uint64(segSize)
	st.writeSegments(3)
	// Half a segment, not switched: it sits in the spool as .partial.
	st.pg.Exec(`INSERT INTO filler (payload) SELECT repeat('y', 100) FROM generate_series(1, 2000)`)
	cur := st.currentLSN()
	partial := filepath.Join(st.dataDir, "spool", st.server, pipeline.SegmentOf(1, cur, segSize).Name(segSize)+".partial")
	waitFor(t, 30*time.Second, "the .partial to hold the insert", func() bool {
		return st.lsn(`SELECT write_lsn::text FROM pg_stat_replication WHERE application_name = 'walship'`) >= cur
	})
	if _, err := os.Stat(partial); err != nil {
		t.Fatalf("no .partial in the spool: %v", err)
	}
	w.cmd.Process.Kill()
	<-w.done

	// More WAL while it is down, then restart.
	st.pg.Exec(`INSERT INTO filler (payload) SELECT repeat('z', 100) FROM generate_series(1, 2000)`)
	w2 := startWalship(t, st.env(), args...)
	end := st.writeSegments(3)
	waitFor(t, 60*time.Second, "archiving after the restart", func() bool { return st.replFlush() >= end })
	if err := w2.stop(t); err != nil {
		t.Fatalf("walship exit: %v", err)
	}
	n := st.checkArchive(firstSeg, uint64(end)/uint64(segSize))
	if n < 6 {
		t.Errorf("compared only %d segments", n)
	}
	// Nothing left in the spool but the segment being written.
	entries, _ := os.ReadDir(filepath.Join(st.dataDir, "spool", st.server))
	for _, e := range entries {
		if !strings.HasSuffix(e.Name(), ".partial") && !strings.HasPrefix(e.Name(), ".") {
			t.Errorf("spool still holds %s after everything was archived", e.Name())
		}
	}
}

// `walship run --pg URL` and nothing else: embedded NATS, file destination
// under ~/.walship, default ports.
func TestEmbeddedDefaults(t *testing.T) {
	st := newStack(t)
	home := t.TempDir()
	env := []string{"HOME=" + home}
	out, err := runWalship(t, env, "slot", "create", "--pg", st.pg.URL("postgres"))
	if err != nil {
		t.Fatalf("slot create: %v\n%s", err, out)
	}
	w := startWalship(t, env, "run", "--pg", st.pg.URL("postgres"))
	waitFor(t, 30*time.Second, "streaming", func() bool { return st.walsenderPID() != "" })
	firstSeg := uint64(segSize.Start(st.slotRestart())) / uint64(segSize)
	end := st.writeSegments(4)
	waitFor(t, 60*time.Second, "archiving", func() bool { return st.replFlush() >= end })
	if err := w.stop(t); err != nil {
		t.Fatalf("walship exit: %v", err)
	}
	sysid := st.pg.QueryString(`SELECT system_identifier::text FROM pg_control_system()`)
	wals := filepath.Join(home, ".walship", "archive", "pg-"+sysid, "wals")
	for no := firstSeg; no < uint64(end)/uint64(segSize); no++ {
		name := pipeline.Segment{Timeline: 1, No: no}.Name(segSize)
		got, err := decompressFile(filepath.Join(wals, name[:16], name+".zst"))
		if err != nil {
			t.Fatalf("segment %s: %v", name, err)
		}
		want, err := os.ReadFile(filepath.Join(st.pg.WALDir(), name))
		if err != nil {
			t.Fatal(err)
		}
		if string(got) != string(want) {
			t.Errorf("segment %s differs from pg_wal", name)
		}
	}
	if _, err := os.Stat(filepath.Join(home, ".walship", "nats")); err != nil {
		t.Errorf("embedded NATS store missing: %v", err)
	}
}
