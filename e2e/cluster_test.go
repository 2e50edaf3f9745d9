package e2e

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/walship/walship/internal/testenv"
	"github.com/walship/walship/pipeline"
)

// walship's JetStream resources as the cluster names its streams: the
// object store and key-value bucket are streams too.
var clusterStreams = []string{"WALSHIP_SEGMENTS", "WALSHIP_ARCHIVED", "OBJ_WALSHIP_SPOOL", "KV_WALSHIP_STATE"}

const archiverConsumer = "walship-archivers_main" // the archivers' consumer of server "main"

// positionTrack records when a position reported by PostgreSQL moved.
type positionTrack struct {
	mu      sync.Mutex
	changes []positionChange
}

type positionChange struct {
	at  time.Time
	lsn pipeline.LSN
}

func (p *positionTrack) observe(at time.Time, l pipeline.LSN) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if n := len(p.changes); n == 0 || l != p.changes[n-1].lsn {
		p.changes = append(p.changes, positionChange{at, l})
	}
}

// stallDuring is the longest time the position stood still in a window
// that starts at from, counting a standstill that began before it.
func (p *positionTrack) stallDuring(from, to time.Time) time.Duration {
	p.mu.Lock()
	start := from
	for _, c := range p.changes {
		if c.at.After(from) {
			break
		}
		start = c.at
	}
	p.mu.Unlock()
	d, _ := p.longestStall(start, to)
	return d
}

// longestStall is the longest time the position stood still between from
// and to.
func (p *positionTrack) longestStall(from, to time.Time) (time.Duration, time.Time) {
	p.mu.Lock()
	defer p.mu.Unlock()
	var longest time.Duration
	var at time.Time
	prev := from
	for _, c := range p.changes {
		if c.at.Before(from) {
			continue
		}
		if c.at.After(to) {
			break
		}
		if d := c.at.Sub(prev); d > longest {
			longest, at = d, prev
		}
		prev = c.at
	}
	if d := to.Sub(prev); d > longest {
		longest, at = d, prev
	}
	return longest, at
}

func (p *positionTrack) last() pipeline.LSN {
	p.mu.Lock()
	defer p.mu.Unlock()
	if len(p.changes) == 0 {
		return 0
	}
	return p.changes[len(p.changes)-1].lsn
}

// trackReplication samples walship's write and flush positions in
// pg_stat_replication every 100 ms until ctx is done.
func (st *stack) trackReplication(ctx context.Context) (write, flush *positionTrack, wait func()) {
	write, flush = &positionTrack{}, &positionTrack{}
	done := make(chan struct{})
	go func() {
		defer close(done)
		for ctx.Err() == nil {
			now := time.Now()
			s := st.pg.QueryString(`SELECT coalesce(write_lsn::text, '') || ' ' || coalesce(flush_lsn::text, '')
				FROM pg_stat_replication WHERE application_name = 'walship'`)
			if f := strings.Fields(s); len(f) == 2 {
				w, err1 := pipeline.ParseLSN(f[0])
				fl, err2 := pipeline.ParseLSN(f[1])
				if err1 == nil && err2 == nil {
					write.observe(now, w)
					flush.observe(now, fl)
				}
			}
			time.Sleep(100 * time.Millisecond)
		}
	}()
	return write, flush, func() { <-done }
}

// clusterAckWait is the archivers' --ack-wait in the cluster test, as the
// README advises for a cluster: a segment event delivered by a consumer
// leader that died before the archiver got it comes back only after it,
// and flush waits for that segment. 30 s is twice the archivers' progress
// signal.
const clusterAckWait = "30s"

// pacedLoad is pgbench (rate-limited) plus bulk inserts, paced so that
// the pipeline keeps up on the two shared cores of the reference machine:
// what the test measures is a node loss, not a backlog.
func (st *stack) pacedLoad(ctx context.Context, t *testing.T) *sync.WaitGroup {
	st.pg.Exec(`CREATE TABLE IF NOT EXISTS bulk (id bigserial primary key, payload text)`)
	var wg sync.WaitGroup
	wg.Add(2)
	go func() {
		defer wg.Done()
		for ctx.Err() == nil {
			if err := st.pg.Pgbench(ctx, "-c", "2", "-R", "500", "-T", "10", "-n"); err != nil {
				t.Errorf("pgbench: %v", err)
				return
			}
		}
	}()
	go func() {
		defer wg.Done()
		conn := st.pg.Conn(context.Background())
		defer conn.Close(context.Background())
		for ctx.Err() == nil {
			_, err := conn.Exec(ctx, `INSERT INTO bulk (payload) SELECT md5(random()::text) || repeat('x', 200) FROM generate_series(1, 2000)`)
			if err != nil && ctx.Err() == nil {
				t.Errorf("bulk insert: %v", err)
				return
			}
			select {
			case <-ctx.Done():
			case <-time.After(100 * time.Millisecond):
			}
		}
	}()
	return &wg
}

func (st *stack) clusterReceiverArgs(urls string, metricsPort int) []string {
	return []string{"receive", "--pg", st.pg.URL("postgres"), "--nats", urls, "--nats-replicas", "3", "--ack-wait", clusterAckWait, "--server", st.server,
		"--create-slot", "--dest", "s3://" + st.s3.Bucket + "/" + st.prefix, "--s3-endpoint", st.s3.Endpoint(),
		"--data-dir", st.dataDir, "--metrics-addr", "127.0.0.1:" + strconv.Itoa(metricsPort), "--status-interval", "1s",
		"--log-level", "debug"}
}

func (st *stack) clusterArchiverArgs(urls string, metricsPort int) []string {
	return []string{"archive", "--nats", urls, "--nats-replicas", "3", "--ack-wait", clusterAckWait, "--dest", "s3://" + st.s3.Bucket + "/" + st.prefix,
		"--s3-endpoint", st.s3.Endpoint(), "--s3-path-style", "--workers", "2", "--data-dir", st.t.TempDir(),
		"--metrics-addr", "127.0.0.1:" + strconv.Itoa(metricsPort), "--log-level", "debug"}
}

// leaders names the node leading each of walship's streams and the
// archivers' consumer (nil while there is none or it does not answer).
func leaders(ctx context.Context, nc *testenv.NATSCluster) map[string]*testenv.NATSProc {
	out := map[string]*testenv.NATSProc{}
	for _, r := range clusterResources {
		out[r], _ = leaderOf(ctx, nc, r)
	}
	return out
}

var clusterResources = append(append([]string{}, clusterStreams...), archiverConsumer)

func leaderOf(ctx context.Context, nc *testenv.NATSCluster, resource string) (*testenv.NATSProc, error) {
	qctx, stop := context.WithTimeout(ctx, 500*time.Millisecond)
	defer stop()
	if resource == archiverConsumer {
		return nc.ConsumerLeader(qctx, "WALSHIP_SEGMENTS", archiverConsumer)
	}
	return nc.StreamLeader(qctx, resource)
}

// electionTimes polls every resource until it has a leader other than
// victim and returns how long after since each had one.
func electionTimes(ctx context.Context, t *testing.T, nc *testenv.NATSCluster, victim *testenv.NATSProc, since time.Time) map[string]time.Duration {
	out := map[string]time.Duration{}
	for deadline := since.Add(60 * time.Second); len(out) < len(clusterResources); time.Sleep(50 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("no leaders after killing %s: only %v", victim.Name, out)
		}
		for _, r := range clusterResources {
			if _, ok := out[r]; ok {
				continue
			}
			if p, err := leaderOf(ctx, nc, r); err == nil && p != victim {
				out[r] = time.Since(since)
			}
		}
	}
	return out
}

func leaderNames(l map[string]*testenv.NATSProc) string {
	var b strings.Builder
	for _, k := range clusterResources {
		name := "-"
		if l[k] != nil {
			name = l[k].Name
		}
		fmt.Fprintf(&b, " %s=%s", k, name)
	}
	return strings.TrimSpace(b.String())
}

// A receiver and two archivers on a 3-node JetStream cluster with every
// resource at three replicas, under load: the segment stream's leader is
// killed with SIGKILL and restarted on its store, then another node. The
// replication stream never stops, archiving resumes after each election,
// the slot never passes the bucket, and every segment equals pg_wal.
func TestClusterNodeLoss(t *testing.T) {
	nc := testenv.StartNATSCluster(t, 3)
	st := &stack{t: t, pg: testenv.StartPostgres(t, testenv.PGOptions{}), s3: testenv.StartS3(t), dataDir: t.TempDir(),
		metrics: testenv.FreePort(t), prefix: "backups", server: "main"}
	if err := st.pg.Pgbench(context.Background(), "-i", "-s", "2", "-q"); err != nil {
		t.Fatal(err)
	}
	urls := nc.URLs()
	archPorts := []int{testenv.FreePort(t), testenv.FreePort(t)}
	// Profiles (for the goroutine dumps below) are served only on --debug-addr.
	debugPorts := []int{testenv.FreePort(t), testenv.FreePort(t), testenv.FreePort(t)}
	debug := func(i int) []string { return []string{"--debug-addr", "127.0.0.1:" + strconv.Itoa(debugPorts[i])} }
	procs := []*proc{
		startWalship(t, st.env(), append(st.clusterArchiverArgs(urls, archPorts[0]), debug(0)...)...),
		startWalship(t, st.env(), append(st.clusterArchiverArgs(urls, archPorts[1]), debug(1)...)...),
		startWalship(t, st.env(), append(st.clusterReceiverArgs(urls, st.metrics), debug(2)...)...),
	}
	// WALSHIP_KEEP_LOGS=<dir> keeps every process's log there (and, when
	// the test fails, walship's goroutines) for a post-mortem.
	t.Cleanup(func() {
		if dir := os.Getenv("WALSHIP_KEEP_LOGS"); dir != "" {
			if t.Failed() {
				for i, port := range debugPorts {
					if resp, err := http.Get("http://127.0.0.1:" + strconv.Itoa(port) + "/debug/pprof/goroutine?debug=2"); err == nil {
						b, _ := io.ReadAll(resp.Body)
						resp.Body.Close()
						os.WriteFile(filepath.Join(dir, fmt.Sprintf("walship-%d.goroutines", i)), b, 0o644)
					}
				}
			}
			for i, p := range procs {
				b, _ := os.ReadFile(p.logPath)
				os.WriteFile(filepath.Join(dir, fmt.Sprintf("walship-%d.log", i)), b, 0o644)
			}
			for _, n := range nc.Nodes {
				b, _ := os.ReadFile(n.LogPath)
				os.WriteFile(filepath.Join(dir, n.Name+".log"), b, 0o644)
			}
		}
	})
	waitFor(t, 60*time.Second, "the receiver to stream", func() bool { return st.walsenderPID() != "" })
	firstSeg := uint64(segSize.Start(st.slotRestart())) / uint64(segSize)

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	// Every resource walship created has three replicas, on three nodes.
	for _, s := range clusterStreams {
		info, err := nc.StreamInfo(ctx, s)
		if err != nil {
			t.Fatalf("stream %s: %v", s, err)
		}
		if info.Config.Replicas != 3 || info.Cluster == nil || len(info.Cluster.Replicas) != 2 {
			t.Fatalf("stream %s: %d replicas configured, cluster %+v; want 3 on three nodes", s, info.Config.Replicas, info.Cluster)
		}
	}

	samples, _, waitSampler := st.invariantSampler(ctx, t, firstSeg)
	write, flush, waitTrack := st.trackReplication(ctx)
	defer func() { cancel(); waitSampler(); waitTrack() }() // however the test ends
	loadCtx, stopLoad := context.WithCancel(ctx)
	defer stopLoad()
	loadStart := time.Now()
	load := st.pacedLoad(loadCtx, t)
	loadFrom := st.currentLSN()

	startFlush := st.replFlush()
	waitFor(t, 60*time.Second, "archiving under load", func() bool {
		return flush.last() >= startFlush+8*pipeline.LSN(segSize)
	})

	type kill struct {
		node                      string
		at                        time.Time
		election                  time.Duration // until every stream and the consumer had a live leader
		elections                 map[string]time.Duration
		writeStall, flushStall    time.Duration
		archivedWhileDown         pipeline.LSN
		resumed                   time.Duration // until flush moved two segments after the elections
		caughtUp                  time.Duration // from the restart to every replica current
		leadersBefore, leadersNow string
	}
	var kills []kill
	// down kills victim, waits for new leaders, lets the load run on two
	// nodes, restarts the victim on its store and waits until it is current.
	down := func(victim *testenv.NATSProc, why string) {
		before := leaders(ctx, nc)
		k := kill{node: victim.Name, leadersBefore: leaderNames(before)}
		t.Logf("%s kill -9 %s (%s); leaders: %s", stamp(), victim.Name, why, k.leadersBefore)
		flushAtKill := flush.last()
		victim.Kill()
		k.at = time.Now()
		k.elections = electionTimes(ctx, t, nc, victim, k.at)
		for _, d := range k.elections {
			k.election = max(k.election, d)
		}
		k.leadersNow = leaderNames(leaders(ctx, nc))
		// Archiving goes on with the node down: flush moves two segments
		// past where it was once the new leaders were elected (confirmations
		// in flight at the kill may have moved it before).
		elected := flush.last()
		waitFor(t, 90*time.Second, "archiving to go on with "+victim.Name+" down", func() bool {
			return flush.last() >= elected+2*pipeline.LSN(segSize)
		})
		k.resumed = time.Since(k.at)
		time.Sleep(3 * time.Second) // more load on two nodes
		k.archivedWhileDown = flush.last() - flushAtKill
		restarted := time.Now()
		k.writeStall, k.flushStall = write.stallDuring(k.at, restarted), flush.stallDuring(k.at, restarted)
		victim.Start()
		for _, s := range clusterStreams {
			cctx, stop := context.WithTimeout(ctx, 60*time.Second)
			err := nc.WaitStreamCurrent(cctx, s)
			stop()
			if err != nil {
				t.Fatalf("%s restarted: %v", victim.Name, err)
			}
		}
		k.caughtUp = time.Since(restarted)
		t.Logf("%s %s: new leaders after %.1fs (%s; %s); flush two segments further %.1fs after the kill; while it was down write stood still at most %.1fs, flush %.1fs; "+
			"%d MB archived while it was down; current again %.1fs after its restart",
			stamp(), victim.Name, k.election.Seconds(), k.leadersNow, fmtElections(k.elections), k.resumed.Seconds(), k.writeStall.Seconds(), k.flushStall.Seconds(),
			k.archivedWhileDown>>20, k.caughtUp.Seconds())
		kills = append(kills, k)
	}

	// First the segment stream's leader.
	lctx, stop := context.WithTimeout(ctx, 10*time.Second)
	first, err := nc.StreamLeader(lctx, "WALSHIP_SEGMENTS")
	stop()
	if err != nil {
		t.Fatal(err)
	}
	down(first, "leader of WALSHIP_SEGMENTS")
	time.Sleep(3 * time.Second)

	// Then another node: whichever now leads the segment stream, the
	// archivers' consumer or the object store, if not the first victim.
	var second *testenv.NATSProc
	why := ""
	l := leaders(ctx, nc)
	for _, k := range []string{"WALSHIP_SEGMENTS", archiverConsumer, "OBJ_WALSHIP_SPOOL", "WALSHIP_ARCHIVED"} {
		if p := l[k]; p != nil && p != first {
			second, why = p, "leader of "+k
			break
		}
	}
	if second == nil {
		for _, p := range nc.Nodes {
			if p != first {
				second, why = p, "a follower"
				break
			}
		}
	}
	down(second, why)
	time.Sleep(3 * time.Second)
	stopLoad()
	load.Wait()
	loadEnd := time.Now()
	walRate := float64(st.currentLSN()-loadFrom) / loadEnd.Sub(loadStart).Seconds() / (1 << 20)

	end := st.switchWAL()
	waitFor(t, 90*time.Second, "flush to reach the switched segment", func() bool { return st.replFlush() >= end })
	cancel()
	waitSampler()
	waitTrack()
	for i, p := range procs {
		if p.exited() {
			t.Errorf("walship process %d exited during the test: %v", i, p.err)
		}
	}
	endSeg := uint64(end) / uint64(segSize)
	n := st.checkArchive(firstSeg, endSeg)
	for i, port := range archPorts {
		if v, ok := metricAt(port, `walship_archiver_segments_total`); !ok || v == 0 {
			t.Errorf("archiver %d archived nothing (%v, %v)", i+1, v, ok)
		}
	}
	writeStall, writeAt := write.longestStall(loadStart, loadEnd)
	flushStall, flushAt := flush.longestStall(loadStart, loadEnd)
	for _, k := range kills {
		if k.writeStall > 10*time.Second {
			t.Errorf("streaming stood still %.1fs when %s was killed: the receiver must not wait for NATS", k.writeStall.Seconds(), k.node)
		}
		if k.archivedWhileDown < 2*pipeline.LSN(segSize) {
			t.Errorf("only %d bytes archived while %s was down", k.archivedWhileDown, k.node)
		}
	}
	if *samples < 100 {
		t.Errorf("only %d invariant samples", *samples)
	}
	if n < 30 {
		t.Errorf("only %d segments written under load; the test proves little", n)
	}
	t.Logf("%d segments compared byte for byte, %d invariant samples; under load (%.0fs, %.1f MB/s of WAL) write stood still at most %.1fs (from %.0fs), flush %.1fs (from %.0fs)",
		n, *samples, loadEnd.Sub(loadStart).Seconds(), walRate, writeStall.Seconds(), writeAt.Sub(loadStart).Seconds(),
		flushStall.Seconds(), flushAt.Sub(loadStart).Seconds())
}

func stamp() string { return time.Now().Format("15:04:05.000") }

func fmtElections(e map[string]time.Duration) string {
	var b []string
	for _, r := range clusterResources {
		b = append(b, fmt.Sprintf("%s %.1fs", r, e[r].Seconds()))
	}
	return strings.Join(b, ", ")
}
