package e2e

import (
	"testing"
	"time"

	"github.com/walship/walship/internal/testenv"
	"github.com/walship/walship/pipeline"
)

// fillOn writes n segments' worth of rows on p, switching WAL after each,
// and returns p's WAL position after the last switch.
func fillOn(t *testing.T, p *testenv.Postgres, n int) pipeline.LSN {
	t.Helper()
	p.Exec(`CREATE TABLE IF NOT EXISTS filler (id bigserial, payload text)`)
	for i := 0; i < n; i++ {
		p.Exec(`INSERT INTO filler (payload) SELECT repeat(md5(random()::text), 8) FROM generate_series(1, 2000)`)
		p.Exec(`SELECT pg_switch_wal()`)
	}
	l, err := pipeline.ParseLSN(p.QueryString(`SELECT pg_current_wal_lsn()::text`))
	if err != nil {
		t.Fatal(err)
	}
	return l
}

// Defect 1 of issue 8, on real servers: walship streams from a standby;
// S3 goes down; WAL is written; the standby is promoted; the receiver is
// restarted twice (stopped, then killed) with S3 still down. The slot must
// not move at all: every byte since the outage is only in the spool and
// in pg_wal. When S3 returns, every segment of both timelines, the history
// file and the old timeline's .partial arrive identical to pg_wal.
func TestRestartAfterPromotionHoldsSlot(t *testing.T) {
	st := newStack(t)
	primary := st.pg
	standby := primary.StartStandby()
	st.pg = standby
	startWalship(t, st.env(), st.archiverArgs(testenv.FreePort(t))...)
	recvArgs := st.receiverArgs(t.TempDir(), testenv.FreePort(t))
	recv := startWalship(t, st.env(), recvArgs...)
	waitFor(t, 30*time.Second, "streaming from the standby", func() bool { return st.walsenderPID() != "" })
	firstSeg := uint64(segSize.Start(st.slotRestart())) / uint64(segSize)
	replayed := func(at pipeline.LSN) func() bool {
		return func() bool { return st.lsn(`SELECT pg_last_wal_replay_lsn()::text`) >= at }
	}
	received := func(at pipeline.LSN) func() bool {
		return func() bool {
			return st.lsn(`SELECT coalesce(write_lsn, '0/0')::text FROM pg_stat_replication WHERE application_name = 'walship'`) >= at
		}
	}

	before := fillOn(t, primary, 2)
	waitFor(t, 30*time.Second, "the standby to replay", replayed(before))
	waitFor(t, 60*time.Second, "archiving before the outage", func() bool { return st.replFlush() >= before })

	st.s3.Stop()
	held := st.slotRestart()
	onTL1 := fillOn(t, primary, 3)
	waitFor(t, 30*time.Second, "the standby to replay timeline 1", replayed(onTL1))
	waitFor(t, 30*time.Second, "walship to receive timeline 1", received(onTL1))
	primary.Stop("fast")
	standby.Promote()
	waitFor(t, 30*time.Second, "promotion", func() bool { return standby.QueryString(`SELECT pg_is_in_recovery()::text`) == "false" })
	onTL2 := fillOn(t, standby, 2)
	waitFor(t, 60*time.Second, "walship to follow to timeline 2", received(onTL2))
	if got := st.slotRestart(); got != held {
		t.Fatalf("restart_lsn moved from %s to %s with S3 down", held, got)
	}

	for i, stop := range []func(){
		func() { recv.stop(t) },
		func() { recv.cmd.Process.Kill(); <-recv.done },
	} {
		stop()
		recv = startWalship(t, st.env(), recvArgs...)
		waitFor(t, 30*time.Second, "the receiver to stream again", func() bool { return st.walsenderPID() != "" })
		// Several status intervals: whatever flush the restarted receiver
		// computes, it has reported it by now.
		time.Sleep(4 * time.Second)
		if got, flush := st.slotRestart(), st.replFlush(); got != held || flush > held {
			t.Fatalf("restart %d with S3 down: restart_lsn %s, flush %s; it must stay at %s: timeline 1's segments are only in the spool",
				i+1, got, flush, held)
		}
	}

	st.s3.Start()
	end := st.switchWAL()
	waitFor(t, 120*time.Second, "archiving both timelines after S3 returns", func() bool { return st.replFlush() >= end })
	switchAt, n := st.checkPromotedArchive(t, standby, firstSeg, end)
	t.Logf("slot held at %s through a promotion and two restarts; switch at %s; %d segments compared", held, switchAt, n)
}
