package e2e

import (
	"context"

	"encoding/json"
	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/s3"
	"io"
	"net/http"
	"os"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"gopkg.in/yaml.v3"

	"github.com/walship/walship/internal/testenv"
)

// scrape returns every sample name a walship process exposes.
func scrape(t *testing.T, port int) map[string]bool {
	resp, err := http.Get("http://127.0.0.1:" + strconv.Itoa(port) + "/metrics")
	if err != nil {
		t.Fatalf("scrape: %v", err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	names := map[string]bool{}
	for _, line := range strings.Split(string(b), "\n") {
		if line == "" || line[0] == '#' {
			continue
		}
		names[regexp.MustCompile(`^[a-zA-Z_:][a-zA-Z0-9_:]*`).FindString(line)] = true
	}
	return names
}

var metricRE = regexp.MustCompile(`walship_[a-z0-9_]+`)

// usedMetrics lists the walship metric names in the alert rules and the
// dashboard's queries.
func usedMetrics(t *testing.T) map[string]string {
	used := map[string]string{}
	b, err := os.ReadFile("../deploy/alerts.yml")
	if err != nil {
		t.Fatal(err)
	}
	var rules struct {
		Groups []struct {
			Rules []struct {
				Alert string `yaml:"alert"`
				Expr  string `yaml:"expr"`
			} `yaml:"rules"`
		} `yaml:"groups"`
	}
	if err := yaml.Unmarshal(b, &rules); err != nil {
		t.Fatal(err)
	}
	for _, g := range rules.Groups {
		for _, r := range g.Rules {
			for _, m := range metricRE.FindAllString(r.Expr, -1) {
				used[m] = "alert " + r.Alert
			}
		}
	}
	b, err = os.ReadFile("../deploy/grafana/dashboards/walship.json")
	if err != nil {
		t.Fatal(err)
	}
	var dash struct {
		Panels []struct {
			Title   string `json:"title"`
			Targets []struct {
				Expr string `json:"expr"`
			} `json:"targets"`
		} `json:"panels"`
	}
	json.Unmarshal(b, &dash)
	for _, p := range dash.Panels {
		for _, tg := range p.Targets {
			for _, m := range metricRE.FindAllString(tg.Expr, -1) {
				used[m] = "panel " + p.Title
			}
		}
	}
	return used
}

// The real pipeline, as separate receiver and archiver processes, exposes
// every metric the alerts and the dashboard use; archive lag rises while
// the archivers are stopped and falls back after; status agrees with
// pg_stat_replication.
func TestMetricsAndStatus(t *testing.T) {
	st := newStack(t, "max_slot_wal_keep_size = '1GB'")
	recvPort, archPort := testenv.FreePort(t), testenv.FreePort(t)
	base := []string{"--nats", st.nats.URL(), "--data-dir", st.dataDir, "--log-level", "debug"}
	recvArgs := append([]string{"receive", "--pg", st.pg.URL("postgres"), "--server", st.server, "--create-slot",
		"--dest", "s3://" + st.s3.Bucket + "/" + st.prefix, "--s3-endpoint", st.s3.Endpoint(), "--status-interval", "1s", "--metrics-addr", "127.0.0.1:" + strconv.Itoa(recvPort)}, base...)
	archArgs := append([]string{"archive", "--dest", "s3://" + st.s3.Bucket + "/" + st.prefix, "--s3-endpoint", st.s3.Endpoint(),
		"--s3-path-style", "--metrics-addr", "127.0.0.1:" + strconv.Itoa(archPort)}, base...)
	startWalship(t, st.env(), recvArgs...)
	arch := startWalship(t, st.env(), archArgs...)
	waitFor(t, 30*time.Second, "streaming", func() bool { return st.walsenderPID() != "" })
	end := st.writeSegments(3)
	waitFor(t, 60*time.Second, "archiving", func() bool { return st.replFlush() >= end })
	time.Sleep(6 * time.Second) // one slot poll and one backlog poll

	have := scrape(t, recvPort)
	for k := range scrape(t, archPort) {
		have[k] = true
	}
	// Exposed only by a process that streams several servers (--config),
	// where TestManyServersOneReceiver checks them.
	fleetOnly := map[string]bool{"walship_receiver_up": true, "walship_receiver_restarts_total": true,
		// Exposed once the archiver's catalogue scan has found the
		// server's archive (and the age once a backup exists), where
		// TestRetention checks them.
		"walship_backups": true, "walship_backup_latest_age_seconds": true, "walship_recovery_window_gap": true, "walship_prune_errors_total": true}
	for name, where := range usedMetrics(t) {
		if !have[name] && !have[name+"_bucket"] && !fleetOnly[name] {
			t.Errorf("%s uses %s, which no walship process exposes", where, name)
		}
	}

	st.metrics = recvPort
	if err := arch.stop(t); err != nil {
		t.Fatalf("archiver exit: %v", err)
	}
	st.writeSegments(6)
	waitFor(t, 30*time.Second, "archive lag to rise past 5 segments", func() bool {
		v, _ := st.metric("walship_archive_lag_bytes")
		return v > float64(5*segSize)
	})
	startWalship(t, st.env(), archArgs...)
	waitFor(t, 60*time.Second, "archive lag to fall back under one segment", func() bool {
		v, ok := st.metric("walship_archive_lag_bytes")
		return ok && v < float64(segSize)
	})

	// status --json from "another host": NATS and PostgreSQL only.
	var last string
	waitFor(t, 30*time.Second, "status to agree with pg_stat_replication", func() bool {
		out, err := runWalship(t, nil, "status", "--json", "--nats", st.nats.URL(), "--pg", st.pg.URL("postgres"))
		if err != nil {
			last = out
			return false
		}
		var ss []struct {
			Server    string `json:"server"`
			Receiver  string `json:"receiver"`
			FlushLSN  string `json:"flush_lsn"`
			WriteLSN  string `json:"written_lsn"`
			SlotState struct {
				RestartLSN string `json:"restart_lsn"`
				ReplWrite  string `json:"replication_write_lsn"`
				ReplFlush  string `json:"replication_flush_lsn"`
			} `json:"slot_state"`
		}
		if err := json.Unmarshal([]byte(out), &ss); err != nil || len(ss) != 1 {
			last = out
			return false
		}
		s := ss[0]
		last = out
		return s.Server == st.server && s.Receiver == "streaming" && s.FlushLSN == s.SlotState.ReplFlush &&
			s.FlushLSN == s.SlotState.RestartLSN && s.WriteLSN == s.SlotState.ReplWrite &&
			s.FlushLSN == st.replFlush().String()
	})
	t.Logf("status: %s", last)
}

// check reports each broken precondition on its own FAIL line, and passes
// on a correct setup.
func TestCheck(t *testing.T) {
	st := newStack(t, "wal_level = logical")
	base := func(extra ...string) []string {
		a := []string{"check", "--pg", st.pg.URL("postgres"), "--nats", st.nats.URL(), "--dest", "s3://" + st.s3.Bucket + "/" + st.prefix,
			"--s3-endpoint", st.s3.Endpoint(), "--s3-path-style", "--data-dir", st.dataDir, "--server", st.server}
		return append(a, extra...)
	}
	expectFail := func(name string, args []string, check, phrase string) {
		t.Helper()
		out, err := runWalship(t, st.env(), args...)
		if err == nil {
			t.Errorf("%s: check passed\n%s", name, out)
			return
		}
		found := false
		for _, line := range strings.Split(out, "\n") {
			if strings.HasPrefix(line, "FAIL") && strings.Contains(line, check) && strings.Contains(line, phrase) {
				found = true
			}
		}
		if !found {
			t.Errorf("%s: no FAIL line for %s with %q:\n%s", name, check, phrase, out)
		}
	}
	expectFail("slot missing", base(), "slot", "--create-slot")
	st.pg.Exec(`CREATE ROLE pwuser LOGIN REPLICATION PASSWORD 'right-secret-1'`)
	expectFail("wrong password", base("--pg", "postgres://pwuser:nope@127.0.0.1:"+strconv.Itoa(st.pg.Port)+"/postgres"), "postgres replication", "password authentication failed")
	st.pg.Exec(`CREATE ROLE norep LOGIN`)
	expectFail("no replication", base("--pg", st.pg.URL("norep")), "postgres replication", "ALTER ROLE norep REPLICATION")
	expectFail("nats", base("--nats", "nats://127.0.0.1:"+strconv.Itoa(testenv.FreePort(t))), "nats", "cannot reach NATS")
	expectFail("bucket", base("--dest", "s3://no-such-bucket/x"), "bucket", "does not exist")
	ro := st.s3.ReadOnly(t)
	expectFail("read-only bucket", base("--s3-endpoint", ro.Endpoint()), "bucket", "cannot write to the destination")
	st.pg.Exec(`SELECT pg_create_logical_replication_slot('walship', 'test_decoding')`)
	expectFail("logical", base(), "slot", "logical slot")
	st.pg.Exec(`SELECT pg_drop_replication_slot('walship')`)

	out, err := runWalship(t, st.env(), base("--create-slot")...)
	if err != nil || strings.Contains(out, "FAIL") {
		t.Errorf("check on a correct setup: %v\n%s", err, out)
	}
	// The probe object is gone again: the bucket is empty.
	out2, err := st.s3.Client().ListObjectsV2(context.Background(), &s3.ListObjectsV2Input{Bucket: aws.String(st.s3.Bucket)})
	if err != nil {
		t.Fatal(err)
	}
	if len(out2.Contents) != 0 {
		t.Errorf("check left %d objects behind, first %s", len(out2.Contents), aws.ToString(out2.Contents[0].Key))
	}
}
