package e2e

import (
	"bufio"
	"context"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/s3"

	"github.com/walship/walship/internal/testenv"
)

// A spool the receiver cannot create or write stops it before it creates
// the replication slot: a failed first start never leaves a slot holding
// WAL (the compose stack's "mkdir .../spool: permission denied").
func TestSpoolBeforeSlot(t *testing.T) {
	st := newStack(t)
	notADir := filepath.Join(t.TempDir(), "file")
	if err := os.WriteFile(notADir, []byte("not a directory\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	extra := []string{"--create-slot", "--spool-dir", filepath.Join(notADir, "spool"), "--log-level", "error"}
	for cmd, args := range map[string][]string{"receive": st.recvArgs(extra...), "run": st.args("run", extra...)} {
		t.Run(cmd, func(t *testing.T) {
			failsWith(t, st.env(), args, "spool directory", "--spool-dir", "no replication slot was created")
			if s := st.pg.QueryString(`SELECT coalesce(string_agg(slot_name, ','), '') FROM pg_replication_slots`); s != "" {
				t.Fatalf("a failed start left replication slots behind: %s", s)
			}
		})
	}
}

// /readyz says ready only while the process does its job: a receiver
// while it streams (not while PostgreSQL is down, though NATS is up), an
// archiver while it consumes segment events.
func TestReadyMeansWorking(t *testing.T) {
	st := newStack(t)
	recv := startWalship(t, st.env(), st.recvArgs("--create-slot")...)
	archPort := testenv.FreePort(t)
	startWalship(t, st.env(), st.archArgs(archPort)...)
	waitFor(t, 30*time.Second, "the receiver to be ready", func() bool { code, _ := readyz(st.metrics); return code == http.StatusOK })
	waitFor(t, 30*time.Second, "the archiver to be ready", func() bool { code, _ := readyz(archPort); return code == http.StatusOK })

	st.pg.Stop("fast")
	var body string
	waitFor(t, 30*time.Second, "the receiver's /readyz 503: not streaming", func() bool {
		stillUp(t, recv, "the receiver")
		var code int
		code, body = readyz(st.metrics)
		return code == http.StatusServiceUnavailable && strings.Contains(body, "not streaming")
	})
	t.Logf("PostgreSQL down: /readyz %s", strings.TrimSpace(body))
	if v, ok := dependencyUp(st.metrics, "nats"); !ok || v != 1 {
		t.Errorf("walship_dependency_up{nats} = %v (%v) while NATS is up", v, ok)
	}
	if code, _ := readyz(archPort); code != http.StatusOK {
		t.Errorf("the archiver is not ready though NATS and S3 are up: %d", code)
	}
	// `walship status` says why too.
	waitFor(t, 30*time.Second, "walship status to show the receiver NOT READY: not streaming", func() bool {
		out, _ := runWalship(t, nil, "status", "--processes", "--nats", st.nats.URL())
		return strings.Contains(out, "NOT READY: not streaming from PostgreSQL")
	})
	st.pg.Start()
	waitFor(t, 45*time.Second, "the receiver to be ready again", func() bool { code, _ := readyz(st.metrics); return code == http.StatusOK })

	st.nats.Stop()
	waitFor(t, 30*time.Second, "the archiver's /readyz 503 with NATS down", func() bool {
		code, b := readyz(archPort)
		body = b
		return code == http.StatusServiceUnavailable && strings.Contains(b, "not consuming")
	})
	t.Logf("NATS down: archiver /readyz %s", strings.TrimSpace(body))
	st.nats.Start()
	waitFor(t, 45*time.Second, "the archiver to be ready again", func() bool { code, _ := readyz(archPort); return code == http.StatusOK })
}

// `walship version` names walship's version as make build sets it, the Go
// release, and the protocol libraries at the versions in go.mod.
func TestVersion(t *testing.T) {
	out, err := runWalship(t, nil, "version")
	if err != nil {
		t.Fatalf("walship version: %v\n%s", err, out)
	}
	want := builtVersion
	gomod, err := os.ReadFile("../go.mod")
	if err != nil {
		t.Fatal(err)
	}
	lines := []string{"walship " + want, "go " + runtime.Version()}
	for _, m := range []string{"github.com/jackc/pglogrepl", "github.com/nats-io/nats.go"} {
		v := regexp.MustCompile(`(?m)^\s*` + regexp.QuoteMeta(m) + ` (\S+)`).FindStringSubmatch(string(gomod))
		if v == nil {
			t.Fatalf("go.mod does not require %s", m)
		}
		lines = append(lines, m+" "+v[1])
	}
	got := strings.Split(strings.TrimSpace(out), "\n")
	for _, l := range lines {
		found := false
		for _, g := range got {
			found = found || g == l
		}
		if !found {
			t.Errorf("walship version lacks the line %q:\n%s", l, out)
		}
	}
	if got[0] != lines[0] {
		t.Errorf("first line %q, want %q", got[0], lines[0])
	}
}

// The README's install and quick-start lines, run as written by bash in a
// fresh HOME, install walship and archive WAL into the bucket. Only what
// the lines read from the environment is given: PGURL, BUCKET and
// S3_ENDPOINT for this test's servers, the AWS credentials, and walship's
// own WALSHIP_METRICS_ADDR and WALSHIP_EMBEDDED_NATS_LISTEN so that its
// default ports cannot collide with another test's. Go's module and build
// caches are shared with this machine's, as a fresh machine's would be
// filled by downloading.
func TestREADMEQuickstart(t *testing.T) {
	readme, err := os.ReadFile("../README.md")
	if err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile("(?s)<!-- quickstart:begin -->\\s*```sh\\n(.*?)```\\s*<!-- quickstart:end -->").FindSubmatch(readme)
	if m == nil {
		t.Fatal("README.md has no ```sh block between <!-- quickstart:begin --> and <!-- quickstart:end -->")
	}
	script := string(m[1])
	for _, want := range []string{"go install ./cmd/walship", "walship run"} {
		if !strings.Contains(script, want) {
			t.Fatalf("the quick start lacks %q:\n%s", want, script)
		}
	}
	pg := testenv.StartPostgres(t, testenv.PGOptions{})
	s3srv := testenv.StartS3(t)
	home := t.TempDir()
	goEnv := func(name string) string {
		out, err := exec.Command("go", "env", name).Output()
		if err != nil {
			t.Fatalf("go env %s: %v", name, err)
		}
		return strings.TrimSpace(string(out))
	}
	goroot := goEnv("GOROOT")
	env := append([]string{
		"HOME=" + home, "PATH=" + filepath.Join(goroot, "bin") + ":/usr/local/bin:/usr/bin:/bin",
		"GOMODCACHE=" + goEnv("GOMODCACHE"), "GOCACHE=" + goEnv("GOCACHE"), "GOFLAGS=", "GOTOOLCHAIN=local",
		"PGURL=" + pg.URL("postgres"), "BUCKET=" + s3srv.Bucket, "S3_ENDPOINT=" + s3srv.Endpoint(),
		"WALSHIP_METRICS_ADDR=127.0.0.1:" + strconv.Itoa(testenv.FreePort(t)),
		"WALSHIP_EMBEDDED_NATS_LISTEN=127.0.0.1:" + strconv.Itoa(testenv.FreePort(t)),
	}, s3srv.Env()...)
	if p := os.Getenv("GOPROXY"); p != "" {
		env = append(env, "GOPROXY="+p)
	}
	scriptPath := filepath.Join(t.TempDir(), "quickstart.sh")
	if err := os.WriteFile(scriptPath, []byte("set -euo pipefail\n"+script), 0o755); err != nil {
		t.Fatal(err)
	}
	logPath := filepath.Join(t.TempDir(), "quickstart.log")
	logf, err := os.Create(logPath)
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command("bash", scriptPath)
	cmd.Dir = ".." // the checkout
	cmd.Env = env
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait(); logf.Close() }()
	t.Cleanup(func() {
		syscall.Kill(-cmd.Process.Pid, syscall.SIGTERM)
		select {
		case <-done:
		case <-time.After(20 * time.Second):
			syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
			<-done
		}
		if t.Failed() {
			b, _ := os.ReadFile(logPath)
			t.Logf("quick start output:\n%s", tail(string(b), 6000))
		}
	})

	bin := filepath.Join(home, "go", "bin", "walship")
	client := s3srv.Client()
	wal := regexp.MustCompile(`^pg/pg-\d+/wals/[0-9A-F]{16}/[0-9A-F]{24}\.zst$`)
	var key string
	deadline := time.Now().Add(90 * time.Second)
	for key == "" {
		select {
		case err := <-done:
			t.Fatalf("the quick start ended before a segment was archived: %v", err)
		default:
		}
		if time.Now().After(deadline) {
			t.Fatal("no segment in the bucket within 90 s of the quick start")
		}
		if _, err := os.Stat(bin); err == nil && pg.QueryString(`SELECT count(*) FROM pg_replication_slots WHERE active`) == "1" {
			pg.Exec(`CREATE TABLE IF NOT EXISTS quickstart (v text); INSERT INTO quickstart SELECT 'row' FROM generate_series(1, 1000)`)
			pg.Exec(`SELECT pg_switch_wal()`)
		}
		out, err := client.ListObjectsV2(context.Background(), &s3.ListObjectsV2Input{Bucket: aws.String(s3srv.Bucket), Prefix: aws.String("pg/")})
		if err == nil {
			for _, o := range out.Contents {
				if wal.MatchString(aws.ToString(o.Key)) {
					key = aws.ToString(o.Key)
				}
			}
		}
		time.Sleep(500 * time.Millisecond)
	}
	t.Logf("archived: %s", key)
	// The install went where the README says, in the fresh HOME, and
	// `walship version` ran from it.
	b, _ := os.ReadFile(logPath)
	sc := bufio.NewScanner(strings.NewReader(string(b)))
	sawVersion := false
	for sc.Scan() {
		sawVersion = sawVersion || strings.HasPrefix(sc.Text(), "walship ") && !strings.HasPrefix(sc.Text(), "walship: ")
	}
	if !sawVersion {
		t.Errorf("the quick start's `walship version` printed no version line:\n%s", tail(string(b), 3000))
	}
}
