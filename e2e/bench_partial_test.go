package e2e

import (
	"bufio"
	"context"
	"net/http"
	"strconv"
	"strings"
	"testing"
	"time"
)

// BenchmarkPartialRPO measures what ranges (issue 10) buy and cost, each
// case on its own PostgreSQL (1 MB segments), NATS and versitygw, with
// `walship run` at the default --partial-interval (5s) unless named:
//
//   - live RPO: walship_archive_lag_seconds sampled every 250 ms under 1,
//     10 and 100 small commits per second and under a bulk load, p50 and
//     p99; S3 PUTs per hour (range objects and whole segments);
//
//   - commit latency with walship as the synchronous standby
//     (synchronous_commit = on, --synchronous) at --partial-interval 200ms
//     and 1s, against remote_write (the spool only) in the same run.
//
//     go test -v -run '^$' -bench PartialRPO -benchtime 1x -timeout 30m ./e2e/
//
// WALSHIP_BENCH_SECONDS (default 30) is each load's length.
func BenchmarkPartialRPO(b *testing.B) {
	secs := time.Duration(envInt("WALSHIP_BENCH_SECONDS", 30)) * time.Second
	for _, rate := range []int{1, 10, 100, 0} {
		name := strconv.Itoa(rate) + "-commits-per-s"
		if rate == 0 {
			name = "bulk"
		}
		b.Run(name, func(b *testing.B) {
			for i := 0; i < b.N; i++ {
				benchLag(b, rate, secs)
			}
		})
	}
	for _, c := range []struct {
		name, interval, commit string
	}{{"sync-remote_write", "5s", "remote_write"}, {"sync-on-200ms", "200ms", "on"}, {"sync-on-1s", "1s", "on"}} {
		b.Run(c.name, func(b *testing.B) {
			for i := 0; i < b.N; i++ {
				benchCommitLatency(b, c.interval, c.commit, min(secs, 20*time.Second))
			}
		})
	}
}

// benchLag runs rate commits per second (0: a bulk load) for secs and
// samples the live RPO.
func benchLag(b *testing.B, rate int, secs time.Duration) {
	st := newStack(b)
	st.pg.Exec(`CREATE TABLE rpo (id serial primary key, phase text, at timestamptz default clock_timestamp())`)
	st.pg.Exec(`CREATE TABLE bulk (id bigserial primary key, payload text)`)
	startWalship(b, st.env(), st.args("run", "--create-slot", "--log-level", "info")...)
	waitFor(b, 30*time.Second, "streaming", func() bool { return st.walsenderPID() != "" })
	time.Sleep(2 * time.Second)
	rangesBefore := scrapeSum(st.metrics, "walship_partial_uploads_total")
	segsBefore := scrapeSum(st.metrics, "walship_archiver_segments_total")
	lsnBefore := st.currentLSN()

	ctx, cancel := context.WithTimeout(context.Background(), secs)
	defer cancel()
	done := make(chan struct{})
	go func() {
		defer close(done)
		conn := st.pg.Conn(context.Background())
		defer conn.Close(context.Background())
		tick := time.NewTicker(time.Second / time.Duration(max(rate, 1)))
		defer tick.Stop()
		for ctx.Err() == nil {
			if rate == 0 {
				conn.Exec(ctx, `INSERT INTO bulk (payload) SELECT md5(random()::text) || repeat('x', 200) FROM generate_series(1, 5000)`)
				continue
			}
			conn.Exec(ctx, `INSERT INTO rpo (phase) VALUES ('bench')`)
			select {
			case <-ctx.Done():
			case <-tick.C:
			}
		}
	}()
	var lags []float64
	began := time.Now()
	for ctx.Err() == nil {
		time.Sleep(250 * time.Millisecond)
		if time.Since(began) < 3*time.Second {
			continue // the first ranges need an interval to begin
		}
		lags = append(lags, scrapeSum(st.metrics, "walship_archive_lag_seconds"))
	}
	<-done
	took := time.Since(began)
	wal := float64(st.currentLSN() - lsnBefore)
	ranges := scrapeSum(st.metrics, "walship_partial_uploads_total") - rangesBefore
	segs := scrapeSum(st.metrics, "walship_archiver_segments_total") - segsBefore
	hour := time.Hour.Seconds() / took.Seconds()
	b.ReportMetric(quantile(lags, 0.5), "lag-p50-s")
	b.ReportMetric(quantile(lags, 0.99), "lag-p99-s")
	b.ReportMetric(ranges*hour, "range-PUTs/h")
	b.ReportMetric(segs*hour, "segment-PUTs/h")
	b.ReportMetric(wal/took.Seconds()/1e6, "WAL-MB/s")
	b.Logf("rate %d/s: %d lag samples, p50 %.2f s, p99 %.2f s, max %.2f s; %.0f range and %.0f segment uploads in %s (%.0f and %.0f PUTs/h); WAL %.2f MB/s",
		rate, len(lags), quantile(lags, 0.5), quantile(lags, 0.99), quantile(lags, 1), ranges, segs, took.Round(time.Second), ranges*hour, segs*hour, wal/took.Seconds()/1e6)
}

// benchCommitLatency measures commits with walship as the synchronous
// standby, at synchronous_commit = commit (on: the bucket; remote_write:
// the spool).
func benchCommitLatency(b *testing.B, interval, commit string, secs time.Duration) {
	st := newStack(b)
	w := startWalship(b, st.env(), st.args("run", "--create-slot", "--synchronous", "--partial-interval", interval, "--log-level", "info")...)
	_ = w
	waitFor(b, 30*time.Second, "streaming", func() bool { return st.walsenderPID() != "" })
	st.pg.Exec(`ALTER SYSTEM SET synchronous_standby_names = 'walship'`)
	st.pg.Exec(`SELECT pg_reload_conf()`)
	waitFor(b, 30*time.Second, "walship to be the synchronous standby", func() bool {
		return st.pg.QueryString(`SELECT sync_state FROM pg_stat_replication WHERE application_name = 'walship'`) == "sync"
	})
	st.pg.Exec(`CREATE TABLE rpo (id serial primary key, phase text, at timestamptz default clock_timestamp())`)
	ctx := context.Background()
	conn := st.pg.Conn(ctx)
	defer conn.Close(ctx)
	if _, err := conn.Exec(ctx, `SET synchronous_commit = `+commit); err != nil {
		b.Fatal(err)
	}
	var lat []float64
	for end := time.Now().Add(secs); time.Now().Before(end); {
		t0 := time.Now()
		if _, err := conn.Exec(ctx, `INSERT INTO rpo (phase) VALUES ('sync')`); err != nil {
			b.Fatal(err)
		}
		lat = append(lat, time.Since(t0).Seconds()*1000)
		time.Sleep(50 * time.Millisecond)
	}
	b.ReportMetric(quantile(lat, 0.5), "commit-p50-ms")
	b.ReportMetric(quantile(lat, 0.99), "commit-p99-ms")
	b.Logf("synchronous_commit=%s, --partial-interval %s: %d commits, p50 %.1f ms, p99 %.1f ms, max %.1f ms",
		commit, interval, len(lat), quantile(lat, 0.5), quantile(lat, 0.99), quantile(lat, 1))
}

// scrapeSum sums every sample of a metric whose labels contain all of
// match (e.g. `stage="archived"`).
func scrapeSum(port int, name string, match ...string) float64 {
	c := http.Client{Timeout: 2 * time.Second}
	resp, err := c.Get("http://127.0.0.1:" + strconv.Itoa(port) + "/metrics")
	if err != nil {
		return 0
	}
	defer resp.Body.Close()
	var sum float64
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if !strings.HasPrefix(line, name+"{") && !strings.HasPrefix(line, name+" ") {
			continue
		}
		ok := true
		for _, m := range match {
			ok = ok && strings.Contains(line, m)
		}
		if f := strings.Fields(line); ok {
			v, _ := strconv.ParseFloat(f[len(f)-1], 64)
			sum += v
		}
	}
	return sum
}
