package e2e

import (
	"bufio"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/walship/walship/internal/testenv"
	"github.com/walship/walship/pipeline"
)

// Issue 9: a process restarted while NATS or S3 is unavailable starts
// anyway, says it is not ready (/readyz, walship_dependency_up, status),
// and catches up when the dependency returns; a misconfiguration still
// exits at once with one line.

// readyz returns the status code and body of a process's /readyz (0 when
// nothing answers).
func readyz(port int) (int, string) {
	resp, err := http.Get("http://127.0.0.1:" + strconv.Itoa(port) + "/readyz")
	if err != nil {
		return 0, err.Error()
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

// dependencyUp reads walship_dependency_up{dependency=dep} from a process.
func dependencyUp(port int, dep string) (float64, bool) {
	resp, err := http.Get("http://127.0.0.1:" + strconv.Itoa(port) + "/metrics")
	if err != nil {
		return 0, false
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	want := `walship_dependency_up{dependency="` + dep + `"} `
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), want); ok {
			f, err := strconv.ParseFloat(v, 64)
			return f, err == nil
		}
	}
	return 0, false
}

// waitNotReady waits until process p, on port, says it is not ready
// because of dep, on /readyz and in its gauge. p must not exit meanwhile.
func waitNotReady(t *testing.T, p *proc, port int, dep string) {
	t.Helper()
	var code int
	var body string
	waitFor(t, 30*time.Second, "/readyz 503 naming "+dep+" and walship_dependency_up{"+dep+"} 0", func() bool {
		stillUp(t, p, "walship")
		code, body = readyz(port)
		v, ok := dependencyUp(port, dep)
		return code == http.StatusServiceUnavailable && strings.Contains(body, dep+" unavailable") && ok && v == 0
	})
	t.Logf("/readyz: %d %s", code, strings.TrimSpace(body))
}

// waitReady waits until the process on port is ready and dep is up.
func waitReady(t *testing.T, port int, dep string) {
	t.Helper()
	waitFor(t, 45*time.Second, "/readyz 200 and walship_dependency_up{"+dep+"} 1", func() bool {
		code, _ := readyz(port)
		v, ok := dependencyUp(port, dep)
		return code == http.StatusOK && ok && v == 1
	})
}

// stillUp fails the test when a process has exited.
func stillUp(t *testing.T, p *proc, what string) {
	t.Helper()
	if p.exited() {
		b, _ := os.ReadFile(p.logPath)
		t.Fatalf("%s exited while a dependency was unavailable (%v): %s", what, p.err, tail(strings.TrimSpace(string(b)), 600))
	}
}

func tail(s string, n int) string {
	if len(s) > n {
		return s[len(s)-n:]
	}
	return s
}

// checkFails runs `walship check` and requires a FAIL line for name
// containing want, and a non-zero exit.
func (st *stack) checkFails(t *testing.T, name, want string, args ...string) {
	t.Helper()
	a := append([]string{"check", "--pg", st.pg.URL("postgres"), "--nats", st.nats.URL(), "--dest", "s3://" + st.s3.Bucket + "/" + st.prefix,
		"--s3-endpoint", st.s3.Endpoint(), "--s3-path-style", "--data-dir", t.TempDir(), "--server", st.server}, args...)
	out, err := runWalship(t, st.env(), a...)
	if err == nil {
		t.Errorf("walship check succeeded while %s was down:\n%s", name, out)
	}
	for _, line := range strings.Split(out, "\n") {
		if strings.HasPrefix(line, "FAIL") && strings.Fields(line)[1] == name && strings.Contains(line, want) {
			return
		}
	}
	t.Errorf("walship check: no FAIL %s line containing %q:\n%s", name, want, out)
}

// recvArgs is a receiver's command line; its metrics are on st.metrics.
func (st *stack) recvArgs(extra ...string) []string {
	a := []string{"receive", "--pg", st.pg.URL("postgres"), "--slot", "walship", "--server", st.server, "--nats", st.nats.URL(),
		"--dest", "s3://" + st.s3.Bucket + "/" + st.prefix, "--s3-endpoint", st.s3.Endpoint(),
		"--data-dir", st.dataDir, "--metrics-addr", "127.0.0.1:" + strconv.Itoa(st.metrics), "--status-interval", "1s", "--log-level", "debug"}
	return append(a, extra...)
}

// archArgs is an archiver's command line, with its metrics on port.
func (st *stack) archArgs(port int, extra ...string) []string {
	a := []string{"archive", "--nats", st.nats.URL(), "--dest", "s3://" + st.s3.Bucket + "/" + st.prefix, "--s3-endpoint", st.s3.Endpoint(),
		"--s3-path-style", "--data-dir", st.dataDir, "--metrics-addr", "127.0.0.1:" + strconv.Itoa(port), "--log-level", "debug"}
	return append(a, extra...)
}

// heldAt checks that the slot and the reported flush have not moved
// past held: nothing reached the bucket.
func (st *stack) heldAt(t *testing.T, held pipeline.LSN) {
	t.Helper()
	if got := st.slotRestart(); got != held {
		t.Errorf("restart_lsn moved from %s to %s while the bucket was unreachable", held, got)
	}
	if got := st.replFlush(); got > held {
		t.Errorf("flush_lsn %s is past %s while the bucket was unreachable", got, held)
	}
}

// (1) walship run restarted while S3 is stopped stays up, streams into
// its spool, says it is not ready, holds the slot, and archives everything
// once S3 is back. `walship check` fails loudly meanwhile, and `walship
// status` names the process and the reason.
func TestRunRestartsWithS3Down(t *testing.T) {
	st := newStack(t)
	w := startWalship(t, st.env(), st.args("run", "--create-slot")...)
	waitFor(t, 30*time.Second, "streaming", func() bool { return st.walsenderPID() != "" })
	firstSeg := uint64(segSize.Start(st.slotRestart())) / uint64(segSize)
	before := st.writeSegments(2)
	waitFor(t, 60*time.Second, "archiving before the outage", func() bool { return st.replFlush() >= before })
	if err := w.stop(t); err != nil {
		t.Fatalf("walship exit: %v", err)
	}

	st.s3.Stop()
	held := st.slotRestart()
	w = startWalship(t, st.env(), st.args("run")...)
	waitNotReady(t, w, st.metrics, "s3")
	if v, _ := dependencyUp(st.metrics, "nats"); v != 1 {
		t.Errorf("walship_dependency_up{nats} = %v with NATS up", v)
	}
	waitFor(t, 30*time.Second, "streaming again", func() bool { return st.walsenderPID() != "" })
	end := st.writeSegments(3)
	waitFor(t, 30*time.Second, "the spool to take the WAL written meanwhile", func() bool {
		return st.lsn(`SELECT write_lsn::text FROM pg_stat_replication WHERE application_name = 'walship'`) >= end
	})
	time.Sleep(3 * time.Second) // the archivers try the uploads, fail, and retry
	stillUp(t, w, "walship run")
	st.heldAt(t, held)
	st.checkFails(t, "bucket", "connection refused")
	out, err := runWalship(t, nil, "status", "--nats", st.nats.URL())
	if err != nil || !strings.Contains(out, "run on ") || !strings.Contains(out, "NOT READY") || !strings.Contains(out, "s3: UNAVAILABLE") {
		t.Errorf("walship status does not say that run cannot reach S3 (%v):\n%s", err, out)
	}
	t.Logf("walship status:\n%s", out)
	stillUp(t, w, "walship run")

	st.s3.Start()
	final := st.switchWAL()
	waitFor(t, 60*time.Second, "archiving to catch up", func() bool { return st.replFlush() >= final })
	waitReady(t, st.metrics, "s3")
	if err := w.stop(t); err != nil {
		t.Fatalf("walship exit: %v", err)
	}
	st.checkArchive(firstSeg, uint64(final)/uint64(segSize))
}

// (1) walship archive started while S3 is stopped stays up and says why
// it is not ready; the receiver keeps the slot; once S3 is back the
// archive catches up.
func TestArchiveStartsWithS3Down(t *testing.T) {
	st := newStack(t)
	archPort := testenv.FreePort(t)
	recv := startWalship(t, st.env(), st.recvArgs("--create-slot")...)
	waitFor(t, 30*time.Second, "streaming", func() bool { return st.walsenderPID() != "" })
	held := st.slotRestart()
	firstSeg := uint64(segSize.Start(held)) / uint64(segSize)

	st.s3.Stop()
	arch := startWalship(t, st.env(), st.archArgs(archPort)...)
	waitNotReady(t, arch, archPort, "s3")
	end := st.writeSegments(3)
	waitFor(t, 30*time.Second, "the spool to take the WAL", func() bool {
		return st.lsn(`SELECT write_lsn::text FROM pg_stat_replication WHERE application_name = 'walship'`) >= end
	})
	time.Sleep(3 * time.Second) // the archiver has the events and fails their uploads
	stillUp(t, arch, "walship archive")
	st.heldAt(t, held)

	st.s3.Start()
	final := st.switchWAL()
	waitFor(t, 60*time.Second, "archiving to catch up", func() bool { return st.replFlush() >= final })
	waitReady(t, archPort, "s3")
	if err := recv.stop(t); err != nil {
		t.Fatalf("receiver exit: %v", err)
	}
	if err := arch.stop(t); err != nil {
		t.Fatalf("archiver exit: %v", err)
	}
	st.checkArchive(firstSeg, uint64(final)/uint64(segSize))
}

// (2) A receiver that has run before (its spool exists) and an archiver,
// both restarted while NATS is stopped, stay up: the receiver streams into
// its spool, both say NATS is unavailable, the slot holds; when NATS is
// back everything is archived. `walship check` fails loudly meanwhile.
func TestReceiveRestartsWithNATSDown(t *testing.T) {
	st := newStack(t)
	archPort := testenv.FreePort(t)
	archArgs := st.archArgs(archPort)
	recv := startWalship(t, st.env(), st.recvArgs("--create-slot")...)
	arch := startWalship(t, st.env(), archArgs...)
	waitFor(t, 30*time.Second, "streaming", func() bool { return st.walsenderPID() != "" })
	firstSeg := uint64(segSize.Start(st.slotRestart())) / uint64(segSize)
	before := st.writeSegments(2)
	waitFor(t, 60*time.Second, "archiving before the outage", func() bool { return st.replFlush() >= before })
	for _, p := range []*proc{recv, arch} {
		if err := p.stop(t); err != nil {
			t.Fatalf("exit: %v", err)
		}
	}
	if _, err := os.Stat(filepath.Join(st.dataDir, "spool", st.server)); err != nil {
		t.Fatalf("the receiver left no spool: %v", err)
	}

	st.nats.Stop()
	held := st.slotRestart()
	recv = startWalship(t, st.env(), st.recvArgs()...)
	arch = startWalship(t, st.env(), archArgs...)
	waitNotReady(t, recv, st.metrics, "nats")
	waitNotReady(t, arch, archPort, "nats")
	waitFor(t, 30*time.Second, "streaming again", func() bool { return st.walsenderPID() != "" })
	end := st.writeSegments(3)
	waitFor(t, 30*time.Second, "the spool to take the WAL written meanwhile", func() bool {
		return st.lsn(`SELECT write_lsn::text FROM pg_stat_replication WHERE application_name = 'walship'`) >= end
	})
	time.Sleep(3 * time.Second) // the receiver tries to publish, fails, and retries
	stillUp(t, recv, "walship receive")
	stillUp(t, arch, "walship archive")
	st.heldAt(t, held)
	st.checkFails(t, "nats", "cannot reach NATS")
	if out, err := runWalship(t, nil, "status", "--nats", st.nats.URL()); err == nil || !strings.Contains(out, "cannot reach NATS") {
		t.Errorf("walship status with NATS down: %v\n%s", err, out)
	}

	st.nats.Start()
	final := st.switchWAL()
	waitFor(t, 60*time.Second, "archiving to catch up", func() bool { return st.replFlush() >= final })
	waitReady(t, st.metrics, "nats")
	waitReady(t, archPort, "nats")
	for _, p := range []*proc{recv, arch} {
		if err := p.stop(t); err != nil {
			t.Fatalf("exit: %v", err)
		}
	}
	st.checkArchive(firstSeg, uint64(final)/uint64(segSize))
}

// (3) A misconfiguration still stops a process at once, with one line
// saying what is wrong and a non-zero status — also when it shows only
// once an unavailable dependency answers.
func TestMisconfigurationExits(t *testing.T) {
	st := newStack(t)
	// oneLine requires a non-zero exit with exactly one "walship:" line,
	// the last, containing want.
	oneLine := func(t *testing.T, out string, err error, want string) {
		t.Helper()
		if err == nil {
			t.Fatalf("walship exited 0:\n%s", out)
		}
		out = strings.TrimSpace(out)
		var lines []string
		for _, l := range strings.Split(out, "\n") {
			if strings.HasPrefix(l, "walship: ") {
				lines = append(lines, l)
			}
		}
		last := out[strings.LastIndex(out, "\n")+1:]
		if len(lines) != 1 || !strings.Contains(lines[0], want) || !strings.HasPrefix(last, "walship: ") {
			t.Errorf("want one last line \"walship: …%s…\", got:\n%s", want, out)
		}
		t.Logf("%s (%v)", last, err)
	}
	// atOnce starts walship, which must exit within 15s.
	atOnce := func(t *testing.T, env []string, want string, args ...string) {
		t.Helper()
		p := startWalship(t, env, args...)
		select {
		case <-p.done:
		case <-time.After(15 * time.Second):
			t.Fatal("walship still runs 15s after start")
		}
		b, _ := os.ReadFile(p.logPath)
		oneLine(t, string(b), p.err, want)
	}
	port := testenv.FreePort(t)
	badSecret := append([]string(nil), st.env()...)
	for i, e := range badSecret {
		if strings.HasPrefix(e, "AWS_SECRET_ACCESS_KEY=") {
			badSecret[i] = "AWS_SECRET_ACCESS_KEY=wrong"
		}
	}

	t.Run("missing bucket", func(t *testing.T) {
		atOnce(t, st.env(), "does not exist", st.archArgs(port, "--dest", "s3://no-such-bucket/x")...)
	})
	t.Run("access denied", func(t *testing.T) {
		atOnce(t, badSecret, "access denied", st.archArgs(port)...)
	})
	t.Run("read-only bucket", func(t *testing.T) {
		ro := st.s3.ReadOnly(t)
		atOnce(t, st.env(), "cannot write to the destination", st.archArgs(port, "--s3-endpoint", ro.Endpoint())...)
	})
	t.Run("endpoint without a scheme", func(t *testing.T) {
		atOnce(t, st.env(), "not a valid URI", st.archArgs(port, "--s3-endpoint", strings.TrimPrefix(st.s3.Endpoint(), "http://"))...)
	})
	t.Run("first receive with NATS down", func(t *testing.T) {
		n := testenv.StartNATS(t)
		n.Stop()
		atOnce(t, st.env(), "cannot reach NATS", st.recvArgs("--create-slot", "--data-dir", t.TempDir(), "--nats", n.URL())...)
	})
	// The bucket is missing, but S3 is down when the archiver starts: it
	// waits, and exits with the line when S3 answers.
	t.Run("missing bucket found when S3 returns", func(t *testing.T) {
		st.s3.Stop()
		p := startWalship(t, st.env(), st.archArgs(port, "--dest", "s3://no-such-bucket/x")...)
		waitNotReady(t, p, port, "s3")
		st.s3.Start()
		select {
		case <-p.done:
		case <-time.After(45 * time.Second):
			t.Fatal("the archiver still runs 45s after S3 said the bucket does not exist")
		}
		b, _ := os.ReadFile(p.logPath)
		oneLine(t, string(b), p.err, "does not exist")
	})
}

// Several archivers on one host: a second one given the same
// --metrics-addr exits at once saying how to run several; one with an
// empty --metrics-addr runs beside the first, and `walship status
// --processes` lists both.
func TestTwoArchiversOnOneHost(t *testing.T) {
	st := newStack(t)
	port := testenv.FreePort(t)
	first := startWalship(t, st.env(), st.archArgs(port)...)
	waitFor(t, 30*time.Second, "the first archiver to be ready", func() bool { code, _ := readyz(port); return code == http.StatusOK })
	second := startWalship(t, st.env(), st.archArgs(port)...)
	select {
	case <-second.done:
	case <-time.After(15 * time.Second):
		t.Fatal("a second archiver on the same --metrics-addr still runs after 15s")
	}
	b, _ := os.ReadFile(second.logPath)
	if out := strings.TrimSpace(string(b)); second.err == nil || !strings.Contains(out, "is in use") || !strings.Contains(out, "its own --metrics-addr") {
		t.Errorf("second archiver on the same --metrics-addr (%v):\n%s", second.err, out)
	}
	third := startWalship(t, st.env(), st.archArgs(port, "--metrics-addr", "")...)
	var out string
	waitFor(t, 20*time.Second, "status to list both archivers", func() bool {
		out, _ = runWalship(t, nil, "status", "--processes", "--nats", st.nats.URL())
		return strings.Count(out, "archive on ") == 2 && !strings.Contains(out, "NOT READY")
	})
	stillUp(t, first, "the first archiver")
	stillUp(t, third, "the archiver without metrics")
	t.Logf("status --processes:\n%s", out)
}
