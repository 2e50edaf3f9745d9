package e2e

import (
	"context"
	"errors"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/walship/walship/internal/testenv"
	"github.com/walship/walship/pipeline"
)

const stageSecret = "e2e-stage-secret-0123456789abcdef"

func stageSecretFile(t *testing.T) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "stage.secret")
	if err := os.WriteFile(p, []byte(stageSecret+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// streamState reads a JetStream stream's state: messages held and the last
// sequence ever stored (0 for a stream that does not exist).
func streamState(t *testing.T, url, name string) (msgs, last uint64) {
	t.Helper()
	nc, err := nats.Connect(url)
	if err != nil {
		t.Fatalf("nats: %v", err)
	}
	defer nc.Close()
	js, _ := jetstream.New(nc)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	s, err := js.Stream(ctx, name)
	if errors.Is(err, jetstream.ErrStreamNotFound) {
		return 0, 0
	}
	if err != nil {
		t.Fatalf("stream %s: %v", name, err)
	}
	st := s.CachedInfo().State
	return st.Msgs, st.LastSeq
}

// The claim check (--stage http) in the split shape: the receiver serves
// its spool, the archiver (another process, which cannot read the spool)
// fetches each segment over HTTP with the shared secret; every segment in
// the bucket equals pg_wal, flush reaches the end, and not one byte went
// through the JetStream object store. The stage refuses a request without
// the secret.
func TestStageHTTP(t *testing.T) {
	st := newStack(t)
	secret := stageSecretFile(t)
	stagePort := testenv.FreePort(t)
	startWalship(t, st.env(), append(st.archiverArgs(testenv.FreePort(t)), "--stage-secret-file", secret)...)
	startWalship(t, st.env(), st.receiverArgs(t.TempDir(), testenv.FreePort(t),
		"--stage", "http", "--stage-listen", "127.0.0.1:"+strconv.Itoa(stagePort), "--stage-secret-file", secret)...)
	waitFor(t, 30*time.Second, "streaming", func() bool { return st.walsenderPID() != "" })
	firstSeg := uint64(segSize.Start(st.slotRestart())) / uint64(segSize)
	end := st.writeSegments(4)
	waitFor(t, 45*time.Second, "flush to reach the end", func() bool { return st.replFlush() >= end })
	if n := st.checkArchive(firstSeg, uint64(end)/uint64(segSize)); n < 4 {
		t.Errorf("only %d segments compared", n)
	}
	if _, last := streamState(t, st.nats.URL(), "OBJ_WALSHIP_SPOOL"); last != 0 {
		t.Errorf("the object store holds %d messages' worth of staging; --stage http must not use it", last)
	}
	resp, err := http.Get("http://127.0.0.1:" + strconv.Itoa(stagePort) + "/wal/" + st.server + "/" + pipeline.Segment{Timeline: 1, No: firstSeg}.Name(segSize))
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusUnauthorized {
		t.Errorf("stage without the secret: %s, want 401", resp.Status)
	}
}

// The freeze case: a receiver announces segments (no archiver yet) and is
// killed; a new receiver on another stage port publishes them again from
// the spool. The archiver, started only then, gets the old events (whose
// URL is dead) and the new ones: everything is archived without a gap,
// flush reaches the end, and the old events do not stay in the queue.
func TestStageHTTPReceiverMoves(t *testing.T) {
	st := newStack(t)
	secret := stageSecretFile(t)
	dataDir := t.TempDir()
	recv := func(port int) *proc {
		return startWalship(t, st.env(), st.receiverArgs(dataDir, testenv.FreePort(t),
			"--stage", "http", "--stage-listen", "127.0.0.1:"+strconv.Itoa(port), "--stage-secret-file", secret)...)
	}
	a := recv(testenv.FreePort(t))
	waitFor(t, 30*time.Second, "streaming", func() bool { return st.walsenderPID() != "" })
	firstSeg := uint64(segSize.Start(st.slotRestart())) / uint64(segSize)
	st.writeSegments(3)
	waitFor(t, 30*time.Second, "three segments announced", func() bool {
		msgs, _ := streamState(t, st.nats.URL(), "WALSHIP_SEGMENTS")
		return msgs >= 3
	})
	a.cmd.Process.Kill() // SIGKILL: no goodbye
	<-a.done
	old, _ := streamState(t, st.nats.URL(), "WALSHIP_SEGMENTS")

	recv(testenv.FreePort(t))
	waitFor(t, 30*time.Second, "the new receiver streaming", func() bool { return st.walsenderPID() != "" })
	end := st.writeSegments(2)
	archMetrics := testenv.FreePort(t)
	startWalship(t, st.env(), append(st.archiverArgs(archMetrics), "--stage-secret-file", secret)...)
	waitFor(t, 45*time.Second, "flush to reach the end", func() bool { return st.replFlush() >= end })
	if n := st.checkArchive(firstSeg, uint64(end)/uint64(segSize)); n < 5 {
		t.Errorf("only %d segments compared", n)
	}
	// The dead receiver's events end too (found in the bucket on
	// redelivery): nothing is left to freeze the queue.
	waitFor(t, 30*time.Second, "the segment queue to drain", func() bool {
		msgs, _ := streamState(t, st.nats.URL(), "WALSHIP_SEGMENTS")
		return msgs == 0
	})
	if _, last := streamState(t, st.nats.URL(), "OBJ_WALSHIP_SPOOL"); last != 0 {
		t.Errorf("the object store was used (%d messages)", last)
	}
	// The dead URLs were really tried: each old event's first delivery
	// fetches from the killed receiver and fails.
	failed := scrapeSum(archMetrics, "walship_archiver_errors_total", `stage="archive"`)
	if failed < 1 {
		t.Errorf("no failed fetch from the killed receiver's stage: the test did not exercise its dead URLs")
	}
	t.Logf("%d events announced before the kill, %v failed fetches", old, failed)
}

// Bad --stage input: one line, exit status 2, the secret never shown.
func TestStageHTTPBadInput(t *testing.T) {
	base := []string{"receive", "--nats", "nats://127.0.0.1:1", "--dest", "s3://b/p", "--pg", "postgres://x@127.0.0.1:1/x",
		"--metrics-addr", "", "--data-dir", t.TempDir()}
	secret := stageSecretFile(t)
	exit2 := func(t *testing.T, env []string, args []string, phrases ...string) {
		t.Helper()
		out := failsWith(t, env, args, phrases...)
		if strings.Contains(out, stageSecret) {
			t.Errorf("the secret appears in the output:\n%s", out)
		}
		_, err := runWalship(t, env, args...)
		var ee *exec.ExitError
		if !errors.As(err, &ee) || ee.ExitCode() != 2 {
			t.Errorf("exit %v, want 2", err)
		}
	}
	t.Run("NoSecret", func(t *testing.T) {
		exit2(t, nil, append(base, "--stage", "http"), "--stage http needs a shared secret", "--stage-secret-file")
	})
	t.Run("EmptySecretFile", func(t *testing.T) {
		empty := filepath.Join(t.TempDir(), "empty")
		os.WriteFile(empty, nil, 0o600)
		exit2(t, nil, append(base, "--stage", "http", "--stage-secret-file", empty), "is empty")
	})
	t.Run("BadMode", func(t *testing.T) {
		exit2(t, nil, append(base, "--stage", "s3"), `--stage "s3"`, "use auto, nats or http")
	})
	t.Run("BadListen", func(t *testing.T) {
		exit2(t, nil, append(base, "--stage", "http", "--stage-secret-file", secret, "--stage-listen", "127.0.0.1:99999"), "--stage-listen")
		exit2(t, []string{"WALSHIP_STAGE_SECRET=" + stageSecret}, append(base, "--stage", "http", "--stage-listen", "nonsense"), "--stage-listen")
	})
}

// One stage server serves every server of a `receive --config` process:
// two clusters, the stage keys at the file's top level, one archiver.
// Both archive byte for byte through the one stage; the object store
// stays empty.
func TestStageHTTPManyServers(t *testing.T) {
	nats, s3 := testenv.StartNATS(t), testenv.StartS3(t)
	secret := stageSecretFile(t)
	dataDir := t.TempDir()
	env := s3.Env()
	var sts []*stack
	for _, name := range []string{"alpha", "bravo"} {
		pg := testenv.StartPostgres(t, testenv.PGOptions{Conf: []string{"shared_buffers = '16MB'"}})
		sts = append(sts, &stack{t: t, pg: pg, nats: nats, s3: s3, dataDir: dataDir, prefix: "backups", server: name})
		env = append(env, "PG_"+strings.ToUpper(name)+"="+pg.URL("postgres"))
	}
	cfg := filepath.Join(t.TempDir(), "walship.yml")
	yml := "nats: " + nats.URL() + "\n" +
		"dest: s3://" + s3.Bucket + "/backups\n" +
		"s3-endpoint: " + s3.Endpoint() + "\n" +
		"data-dir: " + dataDir + "\n" +
		"metrics-addr: \"\"\n" +
		"create-slot: true\n" +
		"status-interval: 1s\n" +
		"stage: http\n" +
		"stage-listen: 127.0.0.1:" + strconv.Itoa(testenv.FreePort(t)) + "\n" +
		"stage-secret-file: " + secret + "\n" +
		"servers:\n" +
		"  - server: alpha\n    pg: ${PG_ALPHA}\n" +
		"  - server: bravo\n    pg: ${PG_BRAVO}\n"
	if err := os.WriteFile(cfg, []byte(yml), 0o600); err != nil {
		t.Fatal(err)
	}
	startWalship(t, env, "receive", "--config", cfg)
	startWalship(t, env, "archive", "--nats", nats.URL(), "--dest", "s3://"+s3.Bucket+"/backups", "--s3-endpoint", s3.Endpoint(),
		"--s3-path-style", "--metrics-addr", "", "--data-dir", t.TempDir(), "--stage-secret-file", secret)
	for _, st := range sts {
		waitFor(t, 30*time.Second, st.server+" streaming", func() bool { return st.walsenderPID() != "" })
	}
	firsts := make([]uint64, len(sts))
	ends := make([]pipeline.LSN, len(sts))
	for i, st := range sts {
		firsts[i] = uint64(segSize.Start(st.slotRestart())) / uint64(segSize)
		ends[i] = st.writeSegments(3)
	}
	for i, st := range sts {
		waitFor(t, 45*time.Second, st.server+" flush to reach the end", func() bool { return st.replFlush() >= ends[i] })
		if n := st.checkArchive(firsts[i], uint64(ends[i])/uint64(segSize)); n < 3 {
			t.Errorf("%s: only %d segments compared", st.server, n)
		}
	}
	if _, last := streamState(t, nats.URL(), "OBJ_WALSHIP_SPOOL"); last != 0 {
		t.Errorf("the object store was used (%d messages)", last)
	}
}

// The receiver's host is lost for good: it had cut ranges of the segment
// being written (announced, unarchived: no archiver ran), and a new
// receiver on another host (an empty spool) streams the slot again. The
// lost receiver's range events can be fetched from nowhere and nobody
// publishes them again; the archiver ends them after --stage-give-up, so
// the queue drains, and flush reaches the end without a gap.
func TestStageHTTPReceiverHostLost(t *testing.T) {
	st := newStack(t)
	secret := stageSecretFile(t)
	recv := func(metrics int) *proc {
		return startWalship(t, st.env(), st.receiverArgs(t.TempDir(), metrics, "--partial-interval", "1s",
			"--stage", "http", "--stage-listen", "127.0.0.1:"+strconv.Itoa(testenv.FreePort(t)), "--stage-secret-file", secret)...)
	}
	metricsA := testenv.FreePort(t)
	a := recv(metricsA)
	waitFor(t, 30*time.Second, "streaming", func() bool { return st.walsenderPID() != "" })
	firstSeg := uint64(segSize.Start(st.slotRestart())) / uint64(segSize)
	st.pg.Exec(`CREATE TABLE trickle (id serial, at timestamptz default clock_timestamp())`)
	waitFor(t, 30*time.Second, "ranges cut", func() bool {
		st.pg.Exec(`INSERT INTO trickle DEFAULT VALUES`)
		v, _ := metricAt(metricsA, "walship_partial_ranges_cut_total")
		return v >= 2
	})
	waitFor(t, 10*time.Second, "the ranges announced", func() bool {
		msgs, _ := streamState(t, st.nats.URL(), "WALSHIP_SEGMENTS")
		return msgs >= 2
	})
	a.cmd.Process.Kill()
	<-a.done

	recv(testenv.FreePort(t))
	waitFor(t, 30*time.Second, "the new receiver streaming", func() bool { return st.walsenderPID() != "" })
	end := st.writeSegments(2)
	archMetrics := testenv.FreePort(t)
	startWalship(t, st.env(), append(st.archiverArgs(archMetrics), "--stage-secret-file", secret, "--stage-give-up", "3s")...)
	waitFor(t, 45*time.Second, "flush to reach the end", func() bool { return st.replFlush() >= end })
	st.checkArchive(firstSeg, uint64(end)/uint64(segSize))
	waitFor(t, 45*time.Second, "the lost receiver's events to end", func() bool {
		msgs, _ := streamState(t, st.nats.URL(), "WALSHIP_SEGMENTS")
		return msgs == 0
	})
	if v := scrapeSum(archMetrics, "walship_archiver_unavailable_total"); v < 1 {
		t.Errorf("no event was terminated: the lost receiver's ranges were not the case tested")
	}
}
