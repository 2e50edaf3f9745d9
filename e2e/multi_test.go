package e2e

import (
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

// serverMetric reads name{server="server"} from a process's /metrics.
func serverMetric(port int, name, server string) (float64, bool) {
	resp, err := http.Get("http://127.0.0.1:" + strconv.Itoa(port) + "/metrics")
	if err != nil {
		return 0, false
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	for _, line := range strings.Split(string(b), "\n") {
		if strings.HasPrefix(line, name+"{") && strings.Contains(line, `server="`+server+`"`) {
			f := strings.Fields(line)
			v, err := strconv.ParseFloat(f[len(f)-1], 64)
			return v, err == nil
		}
	}
	return 0, false
}

// TestManyServersOneReceiver: three PostgreSQL clusters streamed by ONE
// `walship receive --config` process, archived by one `walship archive`.
// The third cluster is down when the receiver starts (its receiver is
// started again with back-off: the restart path), and is stopped again
// mid-stream (the reconnect path); meanwhile the other two keep archiving.
// At the end every segment of every server is in the bucket byte for byte.
func TestManyServersOneReceiver(t *testing.T) {
	nats, s3 := testenv.StartNATS(t), testenv.StartS3(t)
	names := []string{"alpha", "bravo", "charlie"}
	dataDir, metrics := t.TempDir(), testenv.FreePort(t)
	var sts []*stack
	env := s3.Env()
	for _, name := range names {
		pg := testenv.StartPostgres(t, testenv.PGOptions{Conf: []string{"shared_buffers = '16MB'"}})
		sts = append(sts, &stack{t: t, pg: pg, nats: nats, s3: s3, dataDir: dataDir, metrics: metrics, prefix: "backups", server: name})
		env = append(env, "PG_"+strings.ToUpper(name)+"="+pg.URL("postgres"))
	}
	down := sts[2]
	down.pg.Stop("fast")

	cfg := filepath.Join(t.TempDir(), "walship.yml")
	yml := "nats: " + nats.URL() + "\n" +
		"dest: s3://" + s3.Bucket + "/backups\n" +
		"s3-endpoint: " + s3.Endpoint() + "\n" +
		"data-dir: " + dataDir + "\n" +
		"metrics-addr: 127.0.0.1:" + strconv.Itoa(metrics) + "\n" +
		"log-level: debug\n" +
		"create-slot: true\n" +
		"status-interval: 1s\n" +
		"servers:\n"
	for _, name := range names {
		yml += "  - server: " + name + "\n    pg: ${PG_" + strings.ToUpper(name) + "}\n"
	}
	if err := os.WriteFile(cfg, []byte(yml), 0o600); err != nil {
		t.Fatal(err)
	}
	recv := startWalship(t, env, "receive", "--config", cfg)
	archMetrics := testenv.FreePort(t)
	arch := startWalship(t, env, "archive", "--nats", nats.URL(), "--dest", "s3://"+s3.Bucket+"/backups",
		"--s3-endpoint", s3.Endpoint(), "--s3-path-style", "--workers", "2", "--metrics-addr", "127.0.0.1:"+strconv.Itoa(archMetrics))

	// Two stream; the third is reported, not streaming, and retried.
	for _, st := range sts[:2] {
		waitFor(t, 30*time.Second, st.server+" streaming", func() bool { return st.walsenderPID() != "" })
	}
	waitFor(t, 20*time.Second, "charlie to be retried and reported", func() bool {
		up, ok1 := serverMetric(metrics, "walship_receiver_up", "charlie")
		restarts, ok2 := serverMetric(metrics, "walship_receiver_restarts_total", "charlie")
		code, body := readyz(metrics)
		return ok1 && up == 0 && ok2 && restarts >= 1 && code == http.StatusServiceUnavailable && strings.Contains(body, "server charlie")
	})
	down.pg.Start()
	for _, st := range sts {
		waitFor(t, 45*time.Second, st.server+" slot active", func() bool {
			return st.pg.QueryString(`SELECT coalesce((SELECT active::text FROM pg_replication_slots WHERE slot_name='walship'), '')`) == "true"
		})
	}
	first := make([]uint64, len(sts))
	for i, st := range sts {
		first[i] = uint64(segSize.Start(st.slotRestart())) / uint64(segSize)
	}
	end := make([]pipeline.LSN, len(sts))
	for i, st := range sts {
		end[i] = st.writeSegments(2)
	}
	for i, st := range sts {
		waitFor(t, 45*time.Second, st.server+" flush to reach the written WAL", func() bool { return st.replFlush() >= end[i] })
	}
	code, body := readyz(metrics)
	if code != http.StatusOK {
		t.Errorf("/readyz %d with every server streaming: %s", code, body)
	}
	for _, name := range names {
		for _, m := range []string{"walship_received_lsn_bytes", "walship_flush_lsn_bytes", "walship_archive_lag_seconds", "walship_receiver_connected"} {
			if _, ok := serverMetric(metrics, m, name); !ok {
				t.Errorf("/metrics has no %s{server=%q}", m, name)
			}
		}
	}
	waitFor(t, 20*time.Second, "status to list three servers", func() bool {
		out, err := runWalship(t, nil, "status", "--nats", nats.URL())
		if err != nil {
			t.Fatalf("walship status: %v\n%s", err, out)
		}
		rows := 0
		for _, line := range strings.Split(out, "\n") {
			for _, name := range names {
				if strings.HasPrefix(line, name+" ") && strings.Contains(line, "streaming") {
					rows++
				}
			}
		}
		if rows == 3 {
			t.Logf("walship status:\n%s", out)
		}
		return rows == 3
	})

	// Charlie goes away mid-stream; alpha and bravo keep archiving.
	down.pg.Stop("fast")
	outageBegan := time.Now()
	for i, st := range sts[:2] {
		end[i] = st.writeSegments(2)
	}
	for i, st := range sts[:2] {
		waitFor(t, 45*time.Second, st.server+" flush to move while charlie is down", func() bool { return st.replFlush() >= end[i] })
	}
	waitFor(t, 20*time.Second, "/readyz to name charlie", func() bool {
		code, body := readyz(metrics)
		return code == http.StatusServiceUnavailable && strings.Contains(body, "server charlie") && !strings.Contains(body, "server alpha")
	})
	// Down for longer than the first reconnect delays.
	if d := 4*time.Second - time.Since(outageBegan); d > 0 {
		time.Sleep(d)
	}
	stillUp(t, recv, "walship receive")
	down.pg.Start()
	waitFor(t, 45*time.Second, "charlie streaming again", func() bool { return down.walsenderPID() != "" })
	end[2] = down.writeSegments(2)
	waitFor(t, 45*time.Second, "charlie's flush to reach its new WAL", func() bool { return down.replFlush() >= end[2] })
	stillUp(t, arch, "walship archive")

	if err := recv.stop(t); err != nil {
		t.Fatalf("walship receive exit: %v", err)
	}
	if err := arch.stop(t); err != nil {
		t.Fatalf("walship archive exit: %v", err)
	}
	for i, st := range sts {
		last := uint64(end[i]) / uint64(segSize)
		n := st.checkArchive(first[i], last)
		if n < 2 {
			t.Errorf("%s: only %d segments compared", st.server, n)
		}
		t.Logf("%s: %d segments compared byte for byte with pg_wal", st.server, n)
	}
}

// TestRunConfig: `walship run --config` streams two clusters and archives
// them with its one archiver pool, through its embedded NATS.
func TestRunConfig(t *testing.T) {
	s3 := testenv.StartS3(t)
	dataDir, metrics := t.TempDir(), testenv.FreePort(t)
	yml := "dest: s3://" + s3.Bucket + "/backups\ns3-endpoint: " + s3.Endpoint() + "\ns3-path-style: true\n" +
		"data-dir: " + dataDir + "\nmetrics-addr: 127.0.0.1:" + strconv.Itoa(metrics) + "\n" +
		"embedded-nats-listen: 127.0.0.1:" + strconv.Itoa(testenv.FreePort(t)) + "\nworkers: 2\nstatus-interval: 1s\ncreate-slot: true\nservers:\n"
	var sts []*stack
	for _, name := range []string{"one", "two"} {
		pg := testenv.StartPostgres(t, testenv.PGOptions{Conf: []string{"shared_buffers = '16MB'"}})
		sts = append(sts, &stack{t: t, pg: pg, s3: s3, dataDir: dataDir, metrics: metrics, prefix: "backups", server: name})
		yml += "  - server: " + name + "\n    pg: " + pg.URL("postgres") + "\n"
	}
	cfg := filepath.Join(t.TempDir(), "walship.yml")
	if err := os.WriteFile(cfg, []byte(yml), 0o600); err != nil {
		t.Fatal(err)
	}
	w := startWalship(t, s3.Env(), "run", "--config", cfg)
	first := make([]uint64, len(sts))
	end := make([]pipeline.LSN, len(sts))
	for i, st := range sts {
		waitFor(t, 30*time.Second, st.server+" streaming", func() bool { return st.walsenderPID() != "" })
		first[i] = uint64(segSize.Start(st.slotRestart())) / uint64(segSize)
		end[i] = st.writeSegments(2)
	}
	for i, st := range sts {
		waitFor(t, 45*time.Second, st.server+" flush", func() bool { return st.replFlush() >= end[i] })
	}
	if err := w.stop(t); err != nil {
		t.Fatalf("walship run exit: %v", err)
	}
	for i, st := range sts {
		if n := st.checkArchive(first[i], uint64(end[i])/uint64(segSize)); n < 2 {
			t.Errorf("%s: only %d segments compared", st.server, n)
		}
	}
}
