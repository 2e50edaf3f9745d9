package e2e

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

// The whole pipeline built with the race detector: walship run against an
// external NATS (so bytes are staged and the archivers, the publisher, the
// confirmation watcher, housekeeping and the slot poller all run at once),
// under load, through an S3 outage, a NATS outage and a restart. No data
// race is reported, the invariant holds throughout, and the archive equals
// pg_wal.
func TestPipelineUnderRaceDetector(t *testing.T) {
	if testing.Short() {
		t.Skip("builds walship with -race")
	}
	bin := filepath.Join(t.TempDir(), "walship-race")
	build := exec.Command("go", "build", "-race", "-o", bin, "./cmd/walship")
	build.Dir = ".."
	build.Env = append(os.Environ(), "CGO_ENABLED=1")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("go build -race: %v\n%s", err, out)
	}
	st := newStack(t, "wal_sender_timeout = '5s'")
	if err := st.pg.Pgbench(context.Background(), "-i", "-s", "1", "-q"); err != nil {
		t.Fatal(err)
	}
	args := st.args("run", "--create-slot", "--republish-after", "5s", "--ack-wait", "5s")
	env := append(st.env(), "GORACE=halt_on_error=1")
	w := startBin(t, bin, env, args...)
	waitFor(t, 60*time.Second, "streaming", func() bool { return st.walsenderPID() != "" })
	firstSeg := uint64(segSize.Start(st.slotRestart())) / uint64(segSize)

	ctx, cancel := context.WithCancel(context.Background())
	samples, _, waitSampler := st.invariantSampler(ctx, t, firstSeg)
	defer func() { cancel(); waitSampler() }()
	// A paced load: the race detector makes walship several times slower,
	// and the point here is races, not throughput.
	loadCtx, stopLoad := context.WithCancel(ctx)
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for loadCtx.Err() == nil {
			st.pg.Pgbench(loadCtx, "-c", "2", "-R", "800", "-T", "5", "-n")
		}
	}()
	time.Sleep(5 * time.Second)
	st.s3.Stop()
	time.Sleep(8 * time.Second) // past --republish-after and --ack-wait
	st.s3.Start()
	time.Sleep(3 * time.Second)
	st.nats.Stop()
	time.Sleep(5 * time.Second)
	st.nats.Start()
	time.Sleep(3 * time.Second)
	if err := w.stop(t); err != nil {
		t.Fatalf("walship exit under the race detector: %v\n%s", err, raceReport(w))
	}
	w = startBin(t, bin, env, args...)
	time.Sleep(5 * time.Second)
	stopLoad()
	wg.Wait()
	end := st.switchWAL()
	if !waitUntil(120*time.Second, func() bool { return st.replFlush() >= end }) {
		b, _ := os.ReadFile(w.logPath)
		os.WriteFile("/tmp/race-walship.log", b, 0o644)
		t.Fatalf("timed out waiting for archiving to catch up (flush %s, end %s)", st.replFlush(), end)
	}
	cancel()
	waitSampler()
	if err := w.stop(t); err != nil {
		t.Fatalf("walship exit under the race detector: %v\n%s", err, raceReport(w))
	}
	n := st.checkArchive(firstSeg, uint64(end)/uint64(segSize))
	t.Logf("%d segments compared, %d invariant samples, no data race", n, *samples)
}

func raceReport(p *proc) string {
	b, _ := os.ReadFile(p.logPath)
	if i := strings.Index(string(b), "WARNING: DATA RACE"); i >= 0 {
		return string(b[i:min(len(b), i+8000)])
	}
	return ""
}
