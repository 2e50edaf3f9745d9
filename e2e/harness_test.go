// Package e2e proves the pipeline end to end: the real walship binary
// against a real PostgreSQL, NATS JetStream and Versity S3 Gateway.
package e2e

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/s3"

	"github.com/walship/walship/compress"
	"github.com/walship/walship/internal/testenv"
	"github.com/walship/walship/pipeline"
)

var (
	walshipBin   string
	builtVersion string // the version walshipBin was built with
)

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "walship-bin-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	walshipBin = filepath.Join(dir, "walship")
	// The version make build stamps, as the tree is now (TestVersion).
	builtVersion = "dev"
	if b, err := exec.Command("git", "-C", "..", "describe", "--tags", "--always", "--dirty").Output(); err == nil {
		builtVersion = strings.TrimSpace(string(b))
	}
	// The same build as the Dockerfile's: make build.
	cmd := exec.Command("make", "-s", "-C", "..", "build", "BIN="+walshipBin, "VERSION="+builtVersion)
	cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	if err := cmd.Run(); err != nil {
		fmt.Fprintln(os.Stderr, "build walship:", err)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

const segSize = pipeline.SegmentSize(1 << 20)

// stack is one PostgreSQL, NATS and S3 gateway, and the walship flags that
// point at them.
type stack struct {
	t       testing.TB
	pg      *testenv.Postgres
	nats    *testenv.NATS
	s3      *testenv.S3
	dataDir string
	metrics int
	prefix  string
	server  string
}

func newStack(t testing.TB, pgConf ...string) *stack {
	t.Helper()
	st := &stack{t: t, pg: testenv.StartPostgres(t, testenv.PGOptions{Conf: pgConf}), nats: testenv.StartNATS(t),
		s3: testenv.StartS3(t), dataDir: t.TempDir(), metrics: testenv.FreePort(t), prefix: "backups", server: "main"}
	return st
}

func (st *stack) args(cmd string, extra ...string) []string {
	a := []string{cmd, "--pg", st.pg.URL("postgres"), "--slot", "walship", "--server", st.server,
		"--dest", "s3://" + st.s3.Bucket + "/" + st.prefix, "--s3-endpoint", st.s3.Endpoint(), "--s3-path-style",
		"--data-dir", st.dataDir, "--metrics-addr", "127.0.0.1:" + strconv.Itoa(st.metrics),
		"--status-interval", "1s", "--log-level", "debug"}
	if st.nats != nil {
		a = append(a, "--nats", st.nats.URL())
	}
	return append(a, extra...)
}

// proc is a running walship process.
type proc struct {
	cmd     *exec.Cmd
	logPath string
	log     *bytes.Buffer
	done    chan struct{}
	err     error
}

type syncBuffer struct {
	bytes.Buffer
}

func startWalship(t testing.TB, env []string, args ...string) *proc {
	t.Helper()
	return startBin(t, walshipBin, env, args...)
}

// startBin runs a walship binary with args; its log goes to p.logPath.
func startBin(t testing.TB, bin string, env []string, args ...string) *proc {
	t.Helper()
	cmd := exec.Command(bin, args...)
	cmd.Env = append(os.Environ(), env...)
	logPath := filepath.Join(t.TempDir(), "walship.log")
	f, err := os.Create(logPath)
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stdout, cmd.Stderr = f, f
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	p := &proc{cmd: cmd, done: make(chan struct{}), logPath: logPath}
	go func() { p.err = cmd.Wait(); f.Close(); close(p.done) }()
	t.Cleanup(func() {
		p.kill()
		if t.Failed() {
			b, _ := os.ReadFile(logPath)
			if len(b) > 20000 {
				b = b[len(b)-20000:]
			}
			t.Logf("walship log (tail):\n%s", b)
		}
	})
	return p
}

func (p *proc) kill() {
	select {
	case <-p.done:
	default:
		p.cmd.Process.Kill()
		<-p.done
	}
}

// stop sends SIGTERM and returns the exit error.
func (p *proc) stop(t testing.TB) error {
	p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
		return p.err
	case <-time.After(60 * time.Second):
		t.Fatal("walship did not stop within 60s of SIGTERM")
		return nil
	}
}

func (p *proc) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

func (st *stack) env() []string { return st.s3.Env() }

// waitFor polls cond until it holds or the timeout passes.
func waitFor(t testing.TB, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		if cond() {
			return
		}
		time.Sleep(200 * time.Millisecond)
	}
	t.Fatalf("timed out after %s waiting for %s", timeout, what)
}

// lsn reads an LSN-valued query ("" and NULL are 0).
func (st *stack) lsn(query string) pipeline.LSN {
	s := st.pg.QueryString(query)
	if s == "" {
		return 0
	}
	l, err := pipeline.ParseLSN(s)
	if err != nil {
		st.t.Fatalf("%s: %v", query, err)
	}
	return l
}

func (st *stack) slotRestart() pipeline.LSN {
	return st.lsn(`SELECT restart_lsn::text FROM pg_replication_slots WHERE slot_name = 'walship'`)
}

func (st *stack) replFlush() pipeline.LSN {
	return st.lsn(`SELECT flush_lsn::text FROM pg_stat_replication WHERE application_name = 'walship'`)
}

func (st *stack) currentLSN() pipeline.LSN { return st.lsn(`SELECT pg_current_wal_lsn()::text`) }

// switchWAL ends the current segment and returns the end of it.
func (st *stack) switchWAL() pipeline.LSN {
	st.pg.Exec(`CREATE TABLE IF NOT EXISTS switch_marker (at timestamptz); INSERT INTO switch_marker VALUES (now())`)
	end := st.lsn(`SELECT pg_switch_wal()::text`)
	return segSize.Start(end) + pipeline.LSN(segSize)
}

// archivedSegments lists the segments in the bucket by number, with keys.
func (st *stack) archivedSegments() map[uint64]string {
	out, err := st.tryArchivedSegments()
	if err != nil {
		st.t.Fatalf("list bucket: %v", err)
	}
	return out
}

// tryArchivedSegments is archivedSegments for goroutines: it returns the
// error instead of failing the test.
func (st *stack) tryArchivedSegments() (map[uint64]string, error) {
	out := map[uint64]string{}
	p := s3.NewListObjectsV2Paginator(st.s3.Client(), &s3.ListObjectsV2Input{
		Bucket: aws.String(st.s3.Bucket), Prefix: aws.String(st.prefix + "/" + st.server + "/wals/"),
	})
	for p.HasMorePages() {
		page, err := p.NextPage(context.Background())
		if err != nil {
			return nil, err
		}
		for _, o := range page.Contents {
			name := filepath.Base(*o.Key)
			base := strings.TrimSuffix(name, filepath.Ext(name))
			if seg, err := pipeline.ParseSegmentName(base, segSize); err == nil && seg.Timeline == 1 {
				out[seg.No] = *o.Key
			}
		}
	}
	return out, nil
}

// contiguousEnd is the end of the run of archived segments from first.
func contiguousEnd(have map[uint64]string, first uint64) pipeline.LSN {
	n := first
	for {
		if _, ok := have[n]; !ok {
			return pipeline.LSN(n * uint64(segSize))
		}
		n++
	}
}

// object downloads and decompresses a key, returning raw bytes and metadata.
func (st *stack) object(key string) ([]byte, map[string]string) {
	st.t.Helper()
	out, err := st.s3.Client().GetObject(context.Background(), &s3.GetObjectInput{Bucket: aws.String(st.s3.Bucket), Key: aws.String(key)})
	if err != nil {
		st.t.Fatalf("get %s: %v", key, err)
	}
	defer out.Body.Close()
	codec, ok := compress.CodecForExt(filepath.Ext(key))
	if !ok {
		codec = compress.None
	}
	r, err := compress.NewReader(codec, out.Body)
	if err != nil {
		st.t.Fatal(err)
	}
	defer r.Close()
	raw, err := io.ReadAll(r)
	if err != nil {
		st.t.Fatalf("decompress %s: %v", key, err)
	}
	return raw, out.Metadata
}

// checkArchive verifies that every segment from first up to (not
// including) end is in the bucket and equals the server's pg_wal copy byte
// for byte, with metadata. It returns how many it compared.
func (st *stack) checkArchive(first, end uint64) int {
	st.t.Helper()
	have := st.archivedSegments()
	n := 0
	for no := first; no < end; no++ {
		seg := pipeline.Segment{Timeline: 1, No: no}
		key, ok := have[no]
		if !ok {
			st.t.Errorf("segment %s missing from the bucket", seg.Name(segSize))
			continue
		}
		want, err := os.ReadFile(filepath.Join(st.pg.WALDir(), seg.Name(segSize)))
		if err != nil {
			st.t.Fatalf("read pg_wal: %v", err)
		}
		got, meta := st.object(key)
		if !bytes.Equal(got, want) {
			st.t.Errorf("segment %s: bucket copy differs from pg_wal (%d vs %d bytes)", seg.Name(segSize), len(got), len(want))
		}
		if meta["walship-sha256"] == "" || meta["walship-start-lsn"] != seg.StartLSN(segSize).String() ||
			meta["walship-end-lsn"] != seg.EndLSN(segSize).String() || meta["walship-timeline"] != "1" || meta["walship-codec"] == "" {
			st.t.Errorf("segment %s: metadata %v", seg.Name(segSize), meta)
		}
		n++
	}
	return n
}

// metric scrapes one unlabelled-or-server-labelled sample from /metrics.
func (st *stack) metric(name string) (float64, bool) {
	resp, err := http.Get("http://127.0.0.1:" + strconv.Itoa(st.metrics) + "/metrics")
	if err != nil {
		return 0, false
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if strings.HasPrefix(line, name+"{") || strings.HasPrefix(line, name+" ") {
			f := strings.Fields(line)
			v, err := strconv.ParseFloat(f[len(f)-1], 64)
			return v, err == nil
		}
	}
	return 0, false
}

func sortedKeys(m map[uint64]string) []uint64 {
	out := make([]uint64, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	sort.Slice(out, func(i, j int) bool { return out[i] < out[j] })
	return out
}

// runWalship runs walship to completion and returns its combined output.
func runWalship(t *testing.T, env []string, args ...string) (string, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, walshipBin, args...)
	cmd.Env = append(os.Environ(), env...)
	out, err := cmd.CombinedOutput()
	return string(out), err
}

func decompressFile(path string) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	codec, _ := compress.CodecForExt(filepath.Ext(path))
	r, err := compress.NewReader(codec, f)
	if err != nil {
		return nil, err
	}
	defer r.Close()
	return io.ReadAll(r)
}
