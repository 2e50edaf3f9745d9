package e2e

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"math"
	"net/http"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/nats-io/nats.go"

	"github.com/walship/walship/internal/testenv"
	"github.com/walship/walship/pipeline"
)

// BenchmarkTwentyServers measures one `walship receive --config` process
// streaming 20 PostgreSQL clusters (1 MB segments, shared_buffers 16MB),
// one NATS server (nats-server process), one archiver pool of two
// `walship archive` processes and versitygw, all on this machine. 19
// servers run light pgbench (-R 20 -c 1), one ("heavy") INSERTs narrow
// random-looking rows as fast as it goes. It samples the receiver's
// /metrics every second and reports the light servers' archive lag, the
// heavy server's archived MB/s, the processes' CPU and the receiver's peak
// RSS; at the end every server's segments up to its final switch are
// compared byte for byte with its pg_wal.
//
//	go test -v -run '^$' -bench TwentyServers -benchtime 1x -timeout 30m ./e2e/
//
// WALSHIP_BENCH_SERVERS (default 20), WALSHIP_BENCH_SECONDS (load time,
// default 60), WALSHIP_BENCH_LIGHT_TPS (pgbench -R, default 20) and
// WALSHIP_BENCH_ARCHIVE_TIMEOUT (the light servers' archive_timeout, e.g.
// 5s; default off) change the shape.
func BenchmarkTwentyServers(b *testing.B) {
	for i := 0; i < b.N; i++ {
		benchFleet(b, envInt("WALSHIP_BENCH_SERVERS", 20), envInt("WALSHIP_BENCH_SECONDS", 60))
	}
}

func envInt(name string, def int) int {
	if v, err := strconv.Atoi(os.Getenv(name)); err == nil && v > 0 {
		return v
	}
	return def
}

// fleetSample is one scrape of the receiver's per-server gauges.
type fleetSample struct {
	at                    time.Time
	lag, published, flush map[string]float64
	received              map[string]float64
	backlog               float64 // both archivers' walship_archiver_backlog (the same consumer: the max)
	recvRSS, recvHWM      float64 // MB
	archHWM               []float64
	archSegs              map[string]float64 // walship_archiver_segments_total of both archivers, by server
}

// scrapeFleet reads every sample of the named metrics from /metrics, keyed by
// metric name and then by the server label ("" when there is none).
func scrapeFleet(port int, names ...string) map[string]map[string]float64 {
	out := map[string]map[string]float64{}
	for _, n := range names {
		out[n] = map[string]float64{}
	}
	c := http.Client{Timeout: 2 * time.Second}
	resp, err := c.Get("http://127.0.0.1:" + strconv.Itoa(port) + "/metrics")
	if err != nil {
		return out
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if line == "" || line[0] == '#' {
			continue
		}
		name, labels := line, ""
		if i := strings.IndexAny(line, "{ "); i >= 0 {
			name = line[:i]
			if line[i] == '{' {
				labels = line[i:strings.IndexByte(line, '}')]
			}
		}
		m, ok := out[name]
		if !ok {
			continue
		}
		server := ""
		if i := strings.Index(labels, `server="`); i >= 0 {
			rest := labels[i+len(`server="`):]
			server = rest[:strings.IndexByte(rest, '"')]
		}
		f := strings.Fields(line)
		if v, err := strconv.ParseFloat(f[len(f)-1], 64); err == nil {
			m[server] += v
		}
	}
	return out
}

// procMem is a live process's VmRSS and VmHWM (peak) in MB, from
// /proc/<pid>/status.
func procMem(pid int) (rss, hwm float64) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/status")
	if err != nil {
		return 0, 0
	}
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) < 2 {
			continue
		}
		kb, _ := strconv.ParseFloat(f[1], 64)
		switch f[0] {
		case "VmRSS:":
			rss = kb / 1024
		case "VmHWM:":
			hwm = kb / 1024
		}
	}
	return rss, hwm
}

// quantile is the q-quantile (nearest rank) of v, which it sorts.
func quantile(v []float64, q float64) float64 {
	if len(v) == 0 {
		return 0
	}
	sort.Float64s(v)
	return v[int(q*float64(len(v)-1)+0.5)]
}

func benchFleet(b *testing.B, n, loadSecs int) {
	if n < 2 {
		b.Fatal("WALSHIP_BENCH_SERVERS: at least 2 (one heavy, the others light)")
	}
	tps := strconv.Itoa(envInt("WALSHIP_BENCH_LIGHT_TPS", 20))
	archiveTimeout := os.Getenv("WALSHIP_BENCH_ARCHIVE_TIMEOUT")
	t0 := time.Now()
	s3 := testenv.StartS3(b)
	natsSrv := testenv.StartNATSProc(b)
	const prefix = "fleet"

	// The clusters: small, as many servers on one machine would be.
	var sts []*stack
	names := make([]string, n)
	for i := range names {
		name := fmt.Sprintf("light%02d", i)
		conf := []string{"shared_buffers = '16MB'", "max_connections = 20"}
		if i == 0 {
			// The heavy one keeps all its WAL for the byte-for-byte comparison.
			name = "heavy"
			conf = append(conf, "wal_keep_size = '32GB'", "max_wal_size = '2GB'")
		} else if archiveTimeout != "" {
			conf = append(conf, "archive_mode = on", "archive_command = '/bin/true'", "archive_timeout = '"+archiveTimeout+"'")
		}
		names[i] = name
		pg := testenv.StartPostgres(b, testenv.PGOptions{Conf: conf})
		sts = append(sts, &stack{t: b, pg: pg, s3: s3, prefix: prefix, server: name})
	}
	heavy, lights := sts[0], sts[1:]
	errs := make(chan error, n+1)
	var wg sync.WaitGroup
	sem := make(chan struct{}, 4)
	for _, st := range lights {
		wg.Add(1)
		go func() {
			defer wg.Done()
			sem <- struct{}{}
			defer func() { <-sem }()
			if err := st.pg.Pgbench(context.Background(), "-i", "-s", "1", "-q"); err != nil {
				errs <- fmt.Errorf("%s: %w", st.server, err)
			}
		}()
	}
	wg.Wait()
	select {
	case err := <-errs:
		b.Fatal(err)
	default:
	}
	heavy.pg.Exec(`CREATE TABLE narrow (id bigint, payload text)`)
	b.Logf("%d clusters started and initialised in %.0fs", n, time.Since(t0).Seconds())

	// One receiver for all of them, with a config file.
	dataDir, recvPort := b.TempDir(), testenv.FreePort(b)
	env := s3.Env()
	yml := "nats: " + natsSrv.URLs() + "\n" +
		"dest: s3://" + s3.Bucket + "/" + prefix + "\n" +
		"s3-endpoint: " + s3.Endpoint() + "\n" +
		"data-dir: " + dataDir + "\n" +
		"metrics-addr: 127.0.0.1:" + strconv.Itoa(recvPort) + "\n" +
		"create-slot: true\n" +
		"status-interval: 10s\n" +
		"servers:\n"
	for _, st := range sts {
		v := "PG_" + strings.ToUpper(st.server)
		env = append(env, v+"="+st.pg.URL("postgres"))
		yml += "  - server: " + st.server + "\n    pg: ${" + v + "}\n"
	}
	cfg := filepath.Join(b.TempDir(), "walship.yml")
	if err := os.WriteFile(cfg, []byte(yml), 0o600); err != nil {
		b.Fatal(err)
	}
	recv := startWalship(b, env, "receive", "--config", cfg)
	var archs []*proc
	archPorts := []int{testenv.FreePort(b), testenv.FreePort(b)}
	for _, port := range archPorts {
		archs = append(archs, startWalship(b, s3.Env(), "archive", "--nats", natsSrv.URLs(), "--dest", "s3://"+s3.Bucket+"/"+prefix,
			"--s3-endpoint", s3.Endpoint(), "--s3-path-style", "--data-dir", b.TempDir(),
			"--metrics-addr", "127.0.0.1:"+strconv.Itoa(port)))
	}
	first := make([]uint64, n)
	for i, st := range sts {
		waitFor(b, 60*time.Second, st.server+" streaming", func() bool { return st.walsenderPID() != "" })
		first[i] = uint64(segSize.Start(st.slotRestart())) / uint64(segSize)
	}
	// Caught up with what the servers had when streaming began, and every
	// gauge refreshed since: the first sample is the baseline.
	caughtUp := make([]pipeline.LSN, n)
	for i, st := range sts {
		caughtUp[i] = st.currentLSN()
	}
	waitFor(b, 60*time.Second, "the receiver to catch up with every server", func() bool {
		m := scrapeFleet(recvPort, "walship_received_lsn_bytes", "walship_flush_lsn_bytes")
		for i, st := range sts {
			if pipeline.LSN(m["walship_received_lsn_bytes"][st.server]) < caughtUp[i] || m["walship_flush_lsn_bytes"][st.server] == 0 {
				return false
			}
		}
		return true
	})
	b.Logf("receiver streaming all %d servers, caught up, %.0fs after the start", n, time.Since(t0).Seconds())

	// The load, and a sample of every gauge each second while it runs.
	recvPID, natsPID, s3PID := recv.cmd.Process.Pid, natsSrv.Nodes[0].PID(), s3.PID()
	archPIDs := []int{archs[0].cmd.Process.Pid, archs[1].cmd.Process.Pid}
	cpu0 := map[string]time.Duration{"receiver": cpuOf(recvPID), "archiver[0]": cpuOf(archPIDs[0]), "archiver[1]": cpuOf(archPIDs[1]),
		"nats-server": cpuOf(natsPID), "versitygw": cpuOf(s3PID)}
	clock := startEventClock(b, natsSrv.URLs())
	ctx, cancel := context.WithTimeout(context.Background(), time.Duration(loadSecs)*time.Second)
	defer cancel()
	loadStart := time.Now()
	for _, st := range lights {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := st.pg.Pgbench(context.Background(), "-n", "-c", "1", "-R", tps, "-T", strconv.Itoa(loadSecs)); err != nil {
				errs <- fmt.Errorf("%s: %w", st.server, err)
			}
		}()
	}
	var heavyRows int64
	wg.Add(1)
	go func() {
		defer wg.Done()
		conn, err := pgx.Connect(ctx, heavy.pg.URL("postgres"))
		if err != nil {
			errs <- fmt.Errorf("heavy: %w", err)
			return
		}
		defer conn.Close(context.Background())
		for ctx.Err() == nil {
			tag, err := conn.Exec(ctx, `INSERT INTO narrow SELECT g, md5(random()::text) || md5(random()::text) || left(md5(random()::text), 28) FROM generate_series(1, 20000) g`)
			if err != nil {
				if ctx.Err() == nil {
					errs <- fmt.Errorf("heavy: %w", err)
				}
				return
			}
			heavyRows += tag.RowsAffected()
		}
	}()
	var samples []fleetSample
	sample := func() fleetSample {
		m := scrapeFleet(recvPort, "walship_archive_lag_seconds", "walship_published_lsn_bytes", "walship_flush_lsn_bytes", "walship_received_lsn_bytes")
		s := fleetSample{at: time.Now(), lag: m["walship_archive_lag_seconds"], published: m["walship_published_lsn_bytes"],
			flush: m["walship_flush_lsn_bytes"], received: m["walship_received_lsn_bytes"]}
		s.archSegs = map[string]float64{}
		for _, port := range archPorts {
			m := scrapeFleet(port, "walship_archiver_backlog", "walship_archiver_segments_total")
			s.backlog = max(s.backlog, m["walship_archiver_backlog"][""])
			for k, v := range m["walship_archiver_segments_total"] {
				s.archSegs[k] += v
			}
		}
		s.recvRSS, s.recvHWM = procMem(recvPID)
		for _, pid := range archPIDs {
			_, hwm := procMem(pid)
			s.archHWM = append(s.archHWM, hwm)
		}
		return s
	}
	tick := time.NewTicker(time.Second)
	for ctx.Err() == nil {
		samples = append(samples, sample())
		select {
		case <-tick.C:
		case <-ctx.Done():
		}
	}
	tick.Stop()
	samples = append(samples, sample())
	loadEnd := time.Now()
	cpuLoad := map[string]time.Duration{}
	for k, pid := range map[string]int{"receiver": recvPID, "archiver[0]": archPIDs[0], "archiver[1]": archPIDs[1], "nats-server": natsPID, "versitygw": s3PID} {
		cpuLoad[k] = cpuOf(pid) - cpu0[k]
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		b.Error(err)
	}

	// Drain: end every server's segment and wait until the slot holds no
	// WAL that is not in the bucket.
	drainStart := time.Now()
	end := make([]pipeline.LSN, n)
	for i, st := range sts {
		end[i] = st.switchWAL()
	}
	for i, st := range sts {
		waitFor(b, 5*time.Minute, st.server+" flush to reach its final switch", func() bool { return st.replFlush() >= end[i] })
	}
	drainSecs := time.Since(drainStart).Seconds()
	last := sample()
	for _, p := range append([]*proc{recv}, archs...) {
		if err := p.stop(b); err != nil {
			b.Errorf("walship %s exit: %v", p.cmd.Args[1], err)
		}
	}

	// Nothing lost: every segment of every server, byte for byte.
	compared := 0
	for i, st := range sts {
		c := st.checkArchive(first[i], uint64(end[i])/uint64(segSize))
		if c < 1 {
			b.Errorf("%s: no segment compared", st.server)
		}
		compared += c
	}
	b.Logf("nothing lost: %d segments of %d servers compared byte for byte with pg_wal (heavy %d)",
		compared, n, uint64(end[0])/uint64(segSize)-first[0])

	if path := os.Getenv("WALSHIP_BENCH_SAMPLES"); path != "" {
		writeSamples(b, path, names, samples)
	}
	fleetReport(b, names, samples, last, clock, loadStart, loadEnd, drainSecs, cpuLoad, heavyRows)
}

// writeSamples writes the samples as CSV (one row per second and server)
// for a closer look: WALSHIP_BENCH_SAMPLES=/path/to/file.csv.
func writeSamples(b *testing.B, path string, names []string, samples []fleetSample) {
	var sb strings.Builder
	sb.WriteString("second,server,lag_seconds,received,published,flush,archiver_backlog\n")
	for _, s := range samples {
		for _, name := range names {
			fmt.Fprintf(&sb, "%.1f,%s,%.0f,%.0f,%.0f,%.0f,%.0f\n", s.at.Sub(samples[0].at).Seconds(), name,
				s.lag[name], s.received[name], s.published[name], s.flush[name], s.backlog)
		}
	}
	if err := os.WriteFile(path, []byte(sb.String()), 0o644); err != nil {
		b.Error(err)
	}
}

// fleetReport logs and reports the figures of a BenchmarkTwentyServers run.
func fleetReport(b *testing.B, names []string, samples []fleetSample, last fleetSample, clock *eventClock, loadStart, loadEnd time.Time,
	drainSecs float64, cpu map[string]time.Duration, heavyRows int64) {
	secs := loadEnd.Sub(loadStart).Seconds()
	n := len(names)
	firstS, lastS := samples[0], samples[len(samples)-1]
	mb := func(v float64) float64 { return v / (1 << 20) }

	// Per light server: the lag over the run, and how it splits into the
	// time a segment takes to fill and the time from its publication to its
	// archiving (the archiver pool's queue plus the work).
	var worst string
	var worstMax, allP99 float64
	var fills, queues, uploads, fillEst []float64
	var lightWAL float64
	for _, name := range names[1:] {
		var lags []float64
		for _, s := range samples {
			lags = append(lags, s.lag[name])
		}
		p50, p99, mx := quantile(lags, 0.5), quantile(lags, 0.99), quantile(lags, 1)
		q, u, f := clock.delays(name, loadStart, loadEnd)
		queues = append(queues, q...)
		uploads = append(uploads, u...)
		fills = append(fills, f...)
		wal := mb(lastS.received[name] - firstS.received[name])
		lightWAL += wal
		fill := float64(segSize) / (1 << 20) / (wal / secs) // seconds per segment at this server's WAL rate
		fillEst = append(fillEst, fill)
		b.Logf("%s: archive lag p50 %.1fs p99 %.1fs max %.1fs; WAL %.2f MB (%.0f KB/s: a segment fills in %.0fs); %d segments published, publish→archived p50 %.2fs max %.2fs",
			name, p50, p99, mx, wal, wal*1024/secs, fill, len(q), quantile(q, 0.5), quantile(q, 1))
		if mx > worstMax || worst == "" {
			worst, worstMax = name, mx
		}
		allP99 = max(allP99, p99)
	}
	b.Logf("light servers (%d): worst max lag %.1fs (%s), worst p99 %.1fs; segment fill time at their WAL rates p50 %.0fs min %.0fs (observed between publications: p50 %.1fs, %d intervals); publish→archived p50 %.2fs p99 %.2fs max %.2fs (%d segments; upload p50 %.2fs max %.2fs)",
		n-1, worstMax, worst, allP99, quantile(fillEst, 0.5), quantile(fillEst, 0), quantile(fills, 0.5), len(fills),
		quantile(queues, 0.5), quantile(queues, 0.99), quantile(queues, 1), len(queues), quantile(uploads, 0.5), quantile(uploads, 1))
	b.ReportMetric(worstMax, "light-max-lag-s")
	b.ReportMetric(allP99, "light-p99-lag-s")
	b.ReportMetric(quantile(queues, 0.99), "light-publish-to-archived-p99-s")

	// The heavy server.
	const h = "heavy"
	var hl []float64
	for _, s := range samples {
		hl = append(hl, s.lag[h])
	}
	hq, hu, _ := clock.delays(h, loadStart, loadEnd)
	genMBs := mb(lastS.received[h]-firstS.received[h]) / secs
	archMBs := mb(lastS.flush[h]-firstS.flush[h]) / secs
	b.Logf("heavy: WAL written %.1f MB/s (%d rows), archived %.1f MB/s during the load; lag p50 %.1fs max %.1fs; publish→archived p50 %.2fs max %.2fs (upload p50 %.2fs); backlog at the end of the load %.0f MB, drained (all servers) in %.0fs",
		genMBs, heavyRows, archMBs, quantile(hl, 0.5), quantile(hl, 1), quantile(hq, 0.5), quantile(hq, 1), quantile(hu, 0.5),
		mb(lastS.received[h]-lastS.flush[h]), drainSecs)
	b.ReportMetric(archMBs, "heavy-archived-MB/s")
	b.ReportMetric(genMBs, "heavy-written-MB/s")

	var backlogs []float64
	for _, s := range samples {
		backlogs = append(backlogs, s.backlog)
	}
	var lightSegs float64
	for _, name := range names[1:] {
		lightSegs += lastS.archSegs[name] - firstS.archSegs[name]
	}
	heavySegs := lastS.archSegs[h] - firstS.archSegs[h]
	b.Logf("archiver pool: %.0f segments archived during the load (%.1f/s): heavy %.0f, light servers %.0f; backlog (events pending or held, the gauge refreshes every 10s) p50 %.0f max %.0f",
		heavySegs+lightSegs, (heavySegs+lightSegs)/secs, heavySegs, lightSegs, quantile(backlogs, 0.5), quantile(backlogs, 1))

	// Processes.
	recvCPU := cpu["receiver"].Seconds()
	perServerMin := recvCPU / float64(n) / (secs / 60)
	b.Logf("receiver: peak RSS (VmHWM) %.0f MB for %d servers, RSS at the end %.0f MB; CPU %.1fs in %.0fs = %.2f CPU-s per server per minute",
		last.recvHWM, n, last.recvRSS, recvCPU, secs, perServerMin)
	b.ReportMetric(last.recvHWM, "receiver-peak-RSS-MB")
	b.ReportMetric(perServerMin, "receiver-CPU-s/server/min")
	archCPU := cpu["archiver[0]"].Seconds() + cpu["archiver[1]"].Seconds()
	walMB := mb(lastS.received[h]-firstS.received[h]) + lightWAL
	b.Logf("archivers: CPU %.1fs + %.1fs in %.0fs, peak RSS %.0f / %.0f MB; nats-server CPU %.1fs; versitygw CPU %.1fs; all WAL received %.0f MB",
		cpu["archiver[0]"].Seconds(), cpu["archiver[1]"].Seconds(), secs, last.archHWM[0], last.archHWM[1],
		cpu["nats-server"].Seconds(), cpu["versitygw"].Seconds(), walMB)
	b.ReportMetric(archCPU, "archivers-CPU-s")
	b.ReportMetric(max(last.archHWM[0], last.archHWM[1]), "archiver-peak-RSS-MB")
	b.ReportMetric(cpu["nats-server"].Seconds(), "nats-CPU-s")
}

// eventClock timestamps every segment event and every confirmation the
// moment this process sees it on NATS (a plain subscription beside the
// archivers' JetStream consumer), so the time a segment spends between its
// publication and its confirmation is measured per segment, not sampled.
type eventClock struct {
	mu        sync.Mutex
	published map[string]time.Time // server/file -> first publication
	archived  map[string]time.Time // server/file -> first confirmation
	upload    map[string]float64   // server/file -> the archiver's upload seconds
	sub       []*nats.Subscription
	nc        *nats.Conn
}

func startEventClock(b *testing.B, url string) *eventClock {
	nc, err := nats.Connect(url)
	if err != nil {
		b.Fatal(err)
	}
	c := &eventClock{published: map[string]time.Time{}, archived: map[string]time.Time{}, upload: map[string]float64{}, nc: nc}
	on := func(subject string, f func(data []byte, at time.Time)) {
		sub, err := nc.Subscribe(subject, func(m *nats.Msg) { f(m.Data, time.Now()) })
		if err != nil {
			b.Fatal(err)
		}
		sub.SetPendingLimits(-1, -1)
		c.sub = append(c.sub, sub)
	}
	on("walship.*.segment", func(data []byte, at time.Time) {
		var ev pipeline.SegmentEvent
		if json.Unmarshal(data, &ev) != nil || ev.Kind != pipeline.KindSegment {
			return
		}
		c.mu.Lock()
		defer c.mu.Unlock()
		if _, ok := c.published[ev.Server+"/"+ev.File]; !ok {
			c.published[ev.Server+"/"+ev.File] = at
		}
	})
	on("walship.*.archived", func(data []byte, at time.Time) {
		var ev pipeline.ArchivedEvent
		if json.Unmarshal(data, &ev) != nil || ev.Kind != pipeline.KindSegment {
			return
		}
		c.mu.Lock()
		defer c.mu.Unlock()
		if _, ok := c.archived[ev.Server+"/"+ev.File]; !ok {
			c.archived[ev.Server+"/"+ev.File] = at
			c.upload[ev.Server+"/"+ev.File] = ev.UploadSeconds
		}
	})
	if err := nc.Flush(); err != nil {
		b.Fatal(err)
	}
	b.Cleanup(nc.Close)
	return c
}

// delays returns, for server's segments published from..to: the seconds
// from publication to confirmation, the upload seconds within them, and
// the seconds between consecutive publications (how long a segment took
// to fill).
func (c *eventClock) delays(server string, from, to time.Time) (queue, upload, fill []float64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	var pubs []time.Time
	for k, at := range c.published {
		if !strings.HasPrefix(k, server+"/") || at.Before(from) || at.After(to) {
			continue
		}
		pubs = append(pubs, at)
		if done, ok := c.archived[k]; ok {
			queue = append(queue, done.Sub(at).Seconds())
			upload = append(upload, c.upload[k])
		} else {
			queue = append(queue, math.Inf(1)) // never confirmed: shows as +Inf
		}
	}
	sort.Slice(pubs, func(i, j int) bool { return pubs[i].Before(pubs[j]) })
	for i := 1; i < len(pubs); i++ {
		fill = append(fill, pubs[i].Sub(pubs[i-1]).Seconds())
	}
	return queue, upload, fill
}
