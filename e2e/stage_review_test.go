package e2e

import (
	"net/http"
	"strconv"
	"testing"
	"time"

	"github.com/walship/walship/internal/testenv"
)

// Review (rev-stage): with --stage http a receiver process serves its
// spool only once a run has connected to PostgreSQL (Hold comes after
// prepare, which needs the server). A receiver process that starts while
// PostgreSQL is down — a host reboot or an upgrade during an outage, or
// after the primary is lost for good, the case RPO is about — answers 404
// (server unknown) for every file its spool holds: the archivers look in
// the bucket, do not find them, and terminate the events; nothing the
// spool holds reaches the bucket until PostgreSQL answers again. With
// --stage nats the same segments are in the object store and are archived
// during the outage (the "nats" case, which passes, is the control).
//
// Here: three segments are announced, no archiver runs yet; PostgreSQL
// stops (fast: everything is streamed); the receiver is killed and started
// again on the same stage port; an archiver starts. The receiver runs with
// --standby, so that it waits for PostgreSQL instead of exiting (without
// it, a receiver process that starts while PostgreSQL is unreachable exits
// at once, and serves nothing either).
func TestReviewStageHTTPArchivesWhilePostgresDown(t *testing.T) {
	for _, stage := range []string{"nats", "http"} {
		t.Run(stage, func(t *testing.T) { reviewArchiveWhilePostgresDown(t, stage) })
	}
}

func reviewArchiveWhilePostgresDown(t *testing.T, stage string) {
	st := newStack(t)
	secret := stageSecretFile(t)
	stagePort := testenv.FreePort(t)
	recvMetrics := testenv.FreePort(t)
	dataDir := t.TempDir()
	start := func() *proc {
		args := []string{"--stage", stage, "--standby"}
		if stage == "http" {
			args = append(args, "--stage-listen", "127.0.0.1:"+strconv.Itoa(stagePort), "--stage-secret-file", secret)
		}
		return startWalship(t, st.env(), st.receiverArgs(dataDir, recvMetrics, args...)...)
	}
	recv := start()
	waitFor(t, 30*time.Second, "streaming", func() bool { return st.walsenderPID() != "" })
	firstSeg := uint64(segSize.Start(st.slotRestart())) / uint64(segSize)
	end := st.writeSegments(3)
	endSeg := uint64(end) / uint64(segSize)
	waitFor(t, 30*time.Second, "three segments announced", func() bool {
		msgs, _ := streamState(t, st.nats.URL(), "WALSHIP_SEGMENTS")
		return msgs >= 3
	})

	st.pg.Stop("fast")
	// The receiver process restarts (host reboot, upgrade, OOM) while
	// PostgreSQL is still down, on the same stage URL.
	recv.cmd.Process.Kill()
	<-recv.done
	recv = start()
	waitFor(t, 10*time.Second, "the new receiver's metrics", func() bool {
		resp, err := http.Get("http://127.0.0.1:" + strconv.Itoa(recvMetrics) + "/healthz")
		if err == nil {
			resp.Body.Close()
		}
		return err == nil
	})
	arch := st.archiverArgs(testenv.FreePort(t))
	if stage == "http" {
		arch = append(arch, "--stage-secret-file", secret)
	}
	startWalship(t, st.env(), arch...)

	missing := func(have map[uint64]string) int {
		n := 0
		for no := firstSeg; no < endSeg; no++ {
			if _, ok := have[no]; !ok {
				n++
			}
		}
		return n
	}
	deadline := time.Now().Add(25 * time.Second)
	have := st.archivedSegments()
	for missing(have) > 0 && time.Now().Before(deadline) {
		time.Sleep(500 * time.Millisecond)
		have = st.archivedSegments()
	}
	if recv.exited() {
		t.Fatalf("the receiver exited while PostgreSQL was down")
	}
	if n := missing(have); n > 0 {
		notFound := scrapeSum(recvMetrics, "walship_stage_requests_total", `answer="not_found"`)
		unavailable := scrapeSum(recvMetrics, "walship_stage_requests_total", `answer="unavailable"`)
		t.Fatalf("--stage %s: %d of %d segments the receiver had received, fsynced and announced before PostgreSQL stopped are not in the bucket 25 s later "+
			"(the restarted receiver's stage answered %v requests 404 and %v 503: it serves nothing until a run connects to PostgreSQL)",
			stage, n, endSeg-firstSeg, notFound, unavailable)
	}
	// What was archived is the server's WAL, byte for byte.
	st.checkArchive(firstSeg, endSeg)
}
