package e2e

import (
	"bytes"
	"context"
	"flag"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/walship/walship/compress"
	"github.com/walship/walship/internal/testenv"
	"github.com/walship/walship/pipeline"
)

var (
	chaosFaults = flag.Int("chaos.faults", 0, "faults the chaos test injects (default 30, or $WALSHIP_CHAOS_FAULTS; make chaos: 200)")
	chaosSeed   = flag.Uint64("chaos.seed", 0, "seed of the chaos test's choices (or $WALSHIP_CHAOS_SEED; default: fixed for the short form, from the clock for longer runs; always printed)")
)

// The chaos timers shrink every timer walship has, so that outages of seconds
// outlast them all: a late confirmation is checked after 5s, an event held
// 5s without progress goes to another archiver, a conflict is retried
// every 5s. The defaults stay production-sized.
var (
	chaosRecvTimers = []string{"--republish-after", "5s", "--ack-wait", "5s", "--status-interval", "1s", "--partial-interval", "1s"}
	chaosArchTimers = []string{"--ack-wait", "5s", "--conflict-retry", "5s"}
)

// fault is one kind of trouble the chaos test injects.
type fault struct {
	name   string
	weight int
	do     func(rng *rand.Rand) // breaks something, waits, repairs it
}

// TestChaos runs the split shape (a receiver and two archivers, talking to
// NATS and S3 through loopback proxies that can be cut) under load, and
// injects faults chosen from a seed: processes killed, NATS and S3 down for
// longer than every timer, partitions, PostgreSQL restarted fast and
// immediately, the spool's disk full. A sampler checks the invariant the
// whole time, reading the bucket's files directly so that it keeps watching
// while S3 is down; at the end every segment is compared with pg_wal.
func TestChaos(t *testing.T) {
	n := *chaosFaults
	if n == 0 {
		n = 30
		if v, err := strconv.Atoi(os.Getenv("WALSHIP_CHAOS_FAULTS")); err == nil && v > 0 {
			n = v
		}
	}
	seed := *chaosSeed
	if v, err := strconv.ParseUint(os.Getenv("WALSHIP_CHAOS_SEED"), 10, 64); err == nil && seed == 0 {
		seed = v
	}
	if seed == 0 && n <= 30 {
		seed = 1129 // the short form in the test command: the same faults every run
	}
	if seed == 0 {
		seed = uint64(time.Now().UnixNano())
	}
	t.Logf("chaos seed %d; replay: go test ./e2e -run 'TestChaos$' -chaos.seed=%d -chaos.faults=%d -v", seed, seed, n)
	rng := rand.New(rand.NewPCG(seed, seed^0xC4A05))

	// pg_wal keeps every segment for the final comparison with the bucket.
	conf := []string{"wal_sender_timeout = '5s'", "wal_keep_size = '16GB'"}
	st := newStack(t, conf...)
	if err := st.pg.Pgbench(context.Background(), "-i", "-s", "1", "-q"); err != nil {
		t.Fatal(err)
	}
	st.pg.Exec(`CREATE TABLE bulk (id bigserial primary key, payload text)`)
	// walship streams from a standby, which the chaos may promote.
	primary := st.pg
	standby := primary.StartStandby(conf...)
	st.pg = standby
	var writer atomic.Pointer[testenv.Postgres] // where the load writes
	writer.Store(primary)
	// A real nats-server process, so that "NATS down" is a kill -9 and a
	// restart on the same store.
	natsd := testenv.StartNATSProc(t).Nodes[0]
	natsProxy := testenv.StartProxy(t, strings.TrimPrefix(natsd.URL(), "nats://"))
	s3Proxy := testenv.StartProxy(t, strings.TrimPrefix(st.s3.Endpoint(), "http://"))
	spool := t.TempDir()
	disk := mountSmallDisk(t, spool, 64<<20)

	dest := "s3://" + st.s3.Bucket + "/" + st.prefix
	common := []string{"--nats", natsProxy.URL("nats"), "--log-level", "debug"}
	recvPort := testenv.FreePort(t)
	recvData := t.TempDir()
	recvArgsFor := func(pg *testenv.Postgres) []string {
		return append(append([]string{"receive", "--pg", pg.URL("postgres"), "--server", st.server, "--create-slot",
			"--dest", dest, "--s3-endpoint", s3Proxy.URL("http"), "--spool-dir", spool, "--data-dir", recvData,
			"--metrics-addr", "127.0.0.1:" + strconv.Itoa(recvPort)}, common...), chaosRecvTimers...)
	}
	recvArgs := recvArgsFor(st.pg)
	archArgs := func() []string {
		return append(append([]string{"archive", "--dest", dest, "--s3-endpoint", s3Proxy.URL("http"), "--s3-path-style",
			"--workers", "2", "--data-dir", t.TempDir(), "--metrics-addr", ""}, common...), chaosArchTimers...)
	}
	recv := startWalship(t, st.env(), recvArgs...)
	archs := []*proc{startWalship(t, st.env(), archArgs()...), startWalship(t, st.env(), archArgs()...)}
	waitFor(t, 60*time.Second, "streaming", func() bool { return st.walsenderPID() != "" })
	initial := st.slotRestart()
	firstSeg := uint64(segSize.Start(initial)) / uint64(segSize)

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	smp := &chaosSampler{st: st, first: firstSeg, initial: initial}
	smp.source.Store(st.pg)
	var wg sync.WaitGroup
	defer func() { cancel(); wg.Wait() }()
	wg.Add(2)
	go func() { defer wg.Done(); smp.run(ctx, t) }()
	go func() { defer wg.Done(); chaosLoad(ctx, &writer) }()

	var switches []pipeline.LSN             // switches[i]: where timeline i+2 began
	writers := []*testenv.Postgres{primary} // writers[i]: the server that wrote timeline i+1
	restart := func(p **proc, args []string) {
		(*p).cmd.Process.Kill()
		<-(*p).done
		time.Sleep(time.Duration(rng.IntN(2000)) * time.Millisecond)
		*p = startWalship(t, st.env(), args...)
	}
	pause := func(lo, hi int) { time.Sleep(time.Duration(lo+rng.IntN(hi-lo)) * time.Millisecond) }
	faults := []fault{
		{"kill -9 receiver", 4, func(rng *rand.Rand) { restart(&recv, recvArgs) }},
		{"kill -9 archiver", 4, func(rng *rand.Rand) { i := rng.IntN(len(archs)); restart(&archs[i], archArgs()) }},
		{"kill -9 receiver and archivers", 2, func(rng *rand.Rand) {
			recv.cmd.Process.Kill()
			for _, a := range archs {
				a.cmd.Process.Kill()
			}
			<-recv.done
			for i := range archs {
				<-archs[i].done
				archs[i] = startWalship(t, st.env(), archArgs()...)
			}
			recv = startWalship(t, st.env(), recvArgs...)
		}},
		{"kill -9 NATS", 3, func(rng *rand.Rand) { natsd.Kill(); pause(1000, 7000); natsd.Start() }},
		{"S3 down past every timer", 3, func(rng *rand.Rand) { st.s3.Stop(); pause(6000, 12000); st.s3.Start() }},
		{"PostgreSQL fast restart", 2, func(rng *rand.Rand) { st.pg.Stop("fast"); st.pg.Start() }},
		{"PostgreSQL immediate restart", 2, func(rng *rand.Rand) { st.pg.Stop("immediate"); st.pg.Start() }},
		{"promotion of the standby walship streams from", 3, func(rng *rand.Rand) {
			// The writer stops, the standby walship streams from takes over
			// on a new timeline, a new standby is built from it for the next
			// round, and walship is moved there once the archive holds
			// everything before the new standby's slot (an operator who
			// moved it earlier would leave a gap that only the old server
			// holds).
			old, src := writer.Load(), st.pg
			old.Stop("fast")
			src.Promote()
			waitFor(t, 60*time.Second, "the promotion", func() bool { return src.QueryString(`SELECT pg_is_in_recovery()::text`) == "false" })
			writer.Store(src)
			tli := uint32(len(switches) + 2)
			raw, err := os.ReadFile(filepath.Join(src.WALDir(), fmt.Sprintf("%08X.history", tli)))
			if err != nil {
				t.Fatalf("promoted, but no history file for timeline %d: %v", tli, err)
			}
			hist, err := pipeline.ParseHistory(raw)
			if err != nil {
				t.Fatal(err)
			}
			_, at, _ := pipeline.SwitchPoint(hist)
			switches = append(switches, at)
			writers = append(writers, src)
			smp.setSwitches(switches)

			next := src.StartStandby(conf...)
			next.Exec(`SELECT pg_create_physical_replication_slot('walship', true)`)
			reserved, err := pipeline.ParseLSN(next.QueryString(`SELECT restart_lsn::text FROM pg_replication_slots WHERE slot_name = 'walship'`))
			if err != nil {
				t.Fatal(err)
			}
			waitFor(t, 180*time.Second, "the archive to reach the new standby's slot", func() bool { return st.slotRestart() >= reserved })
			recv.cmd.Process.Signal(syscall.SIGTERM)
			<-recv.done
			st.pg = next
			smp.source.Store(next)
			recvArgs = recvArgsFor(next)
			recv = startWalship(t, st.env(), recvArgs...)
			waitFor(t, 60*time.Second, "streaming from the new standby", func() bool { return st.walsenderPID() != "" })
		}},
		{"partition from NATS", 3, func(rng *rand.Rand) { natsProxy.Cut(rng.IntN(2) == 0); pause(2000, 8000); natsProxy.Heal() }},
		{"partition from S3", 3, func(rng *rand.Rand) { s3Proxy.Cut(rng.IntN(2) == 0); pause(2000, 8000); s3Proxy.Heal() }},
	}
	if disk != nil {
		faults = append(faults, fault{"spool disk full", 2, func(rng *rand.Rand) {
			disk.fill(t)
			pause(3000, 7000)
			disk.free()
		}})
	}
	total := 0
	for _, f := range faults {
		total += f.weight
	}
	done := map[string]int{}
	began := time.Now()
	for i := 0; i < n; i++ {
		r := rng.IntN(total)
		for _, f := range faults {
			if r -= f.weight; r < 0 {
				smp.mark(f.name)
				f.do(rng)
				smp.mark("")
				done[f.name]++
				break
			}
		}
		pause(500, 3000)
	}
	faultTime := time.Since(began)

	// Everything is back: the archive catches up and equals pg_wal.
	time.Sleep(2 * time.Second)
	waitFor(t, 60*time.Second, "PostgreSQL to accept connections", func() bool {
		c, err := pgx.Connect(context.Background(), writer.Load().URL("postgres"))
		if err == nil {
			c.Close(context.Background())
		}
		return err == nil
	})
	// walship streams from a standby of the writer: a switch on the
	// writer, replayed there, ends the last segment.
	w := writer.Load()
	w.Exec(`SELECT pg_switch_wal()`)
	at, _ := pipeline.ParseLSN(w.QueryString(`SELECT pg_current_wal_lsn()::text`))
	end := segSize.Start(at)
	waitFor(t, 60*time.Second, "the standby to replay the switch", func() bool { return st.lsn(`SELECT pg_last_wal_replay_lsn()::text`) >= end })
	waitFor(t, 240*time.Second, "archiving to catch up after the faults", func() bool { return st.replFlush() >= end })
	cancel()
	wg.Wait()
	if recv.exited() {
		t.Errorf("the receiver exited on its own: %v", recv.err)
	}
	if min := int(faultTime.Seconds()); smp.samples < min {
		t.Errorf("only %d invariant samples in %s of faults: the sampler was not watching", smp.samples, faultTime)
	}
	compared := st.checkChain(t, writers, switches, firstSeg, end)
	for i, at := range switches {
		t.Logf("timeline %d began at %s", i+2, at)
	}
	var kinds []string
	for k, v := range done {
		kinds = append(kinds, fmt.Sprintf("%s %d", k, v))
	}
	sort.Strings(kinds)
	t.Logf("%d faults in %s: %s", n, faultTime.Round(time.Second), strings.Join(kinds, ", "))
	if smp.mid == 0 {
		t.Errorf("no sample saw flush inside a segment: ranges (--partial-interval 1s) were not exercised")
	}
	t.Logf("%d invariant samples (%d while S3 was down, %d with flush inside a segment by ranges), 0 ahead of the bucket; %d segments compared byte for byte; longest flush stall %s (during: %s)",
		smp.samples, smp.blind, smp.mid, compared, smp.longest.Round(100*time.Millisecond), smp.longestDuring)
}

// chaosLoad writes WAL through restarts and a promotion, paced (a few
// MB/s) so that a long run fits in pg_wal for the final comparison:
// pgbench and bulk inserts on whichever server takes writes, errors
// ignored (the server may be restarting).
func chaosLoad(ctx context.Context, writer *atomic.Pointer[testenv.Postgres]) {
	for ctx.Err() == nil {
		pg := writer.Load()
		c, stop := context.WithTimeout(ctx, 3*time.Second)
		pg.Pgbench(c, "-c", "2", "-R", "400", "-T", "2", "-n")
		stop()
		if conn, err := pgx.Connect(ctx, pg.URL("postgres")); err == nil {
			conn.Exec(ctx, `INSERT INTO bulk (payload) SELECT md5(random()::text) || repeat('x', 200) FROM generate_series(1, 5000)`)
			conn.Close(context.Background())
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// chaosSampler checks, every 100 ms, that neither the slot's restart_lsn
// nor the reported flush is past the contiguous run of segments in the
// bucket. It reads the bucket's files on the gateway's disk, so it keeps
// sampling while S3 is down or partitioned, and PostgreSQL through its own
// connection, reconnecting through restarts.
type chaosSampler struct {
	st      *stack
	first   uint64
	initial pipeline.LSN
	source  atomic.Pointer[testenv.Postgres] // the server walship streams from

	mu            sync.Mutex
	switches      []pipeline.LSN // switches[i]: where timeline i+2 began
	during        string         // the fault being injected
	samples       int
	blind         int // samples taken while S3 was down or cut off
	mid           int // samples with flush inside a segment, beyond the whole segments (ranges)
	longest       time.Duration
	longestDuring string
}

func (s *chaosSampler) setSwitches(at []pipeline.LSN) {
	s.mu.Lock()
	s.switches = append([]pipeline.LSN(nil), at...)
	s.mu.Unlock()
}

func (s *chaosSampler) mark(fault string) {
	s.mu.Lock()
	s.during = fault
	s.mu.Unlock()
}

func (s *chaosSampler) run(ctx context.Context, t *testing.T) {
	var conn *pgx.Conn
	defer func() {
		if conn != nil {
			conn.Close(context.Background())
		}
	}()
	var lastFlush pipeline.LSN
	var connected *testenv.Postgres
	stallSince, stallDuring := time.Now(), ""
	for ctx.Err() == nil {
		time.Sleep(100 * time.Millisecond)
		if src := s.source.Load(); conn != nil && connected != src {
			conn.Close(context.Background())
			conn = nil
		}
		if conn == nil {
			src := s.source.Load()
			c, err := pgx.Connect(ctx, src.URL("postgres"))
			if err != nil {
				continue
			}
			conn, connected = c, src
		}
		var restart, flush, current string
		err := conn.QueryRow(ctx, `SELECT coalesce((SELECT restart_lsn::text FROM pg_replication_slots WHERE slot_name = 'walship'), ''),
			coalesce((SELECT flush_lsn::text FROM pg_stat_replication WHERE application_name = 'walship'), ''),
			coalesce(CASE WHEN pg_is_in_recovery() THEN pg_last_wal_receive_lsn() ELSE pg_current_wal_lsn() END::text, '0/0')`).Scan(&restart, &flush, &current)
		if err != nil {
			conn.Close(context.Background())
			conn = nil
			continue
		}
		ranges, err := rangesOnDisk(s.st) // before the whole segments: see rangesOnDisk
		if err != nil {
			continue
		}
		have, ended, err := bucketOnDisk(s.st)
		if err != nil {
			continue
		}
		s.mu.Lock()
		switches := s.switches
		s.mu.Unlock()
		whole := lineEnd(have, s.first, switches)
		end := max(extendByRanges(whole, ranges, ended, switches), s.initial)
		r, _ := pipeline.ParseLSN(restart)
		f, _ := pipeline.ParseLSN(flush)
		cur, _ := pipeline.ParseLSN(current)
		s.mu.Lock()
		s.samples++
		if strings.Contains(s.during, "S3") {
			s.blind++
		}
		if r > end || f > end {
			// The sampler may not know yet of a promotion that walship has
			// followed: an ended timeline's .partial, the WAL of its last
			// segment to where it ended, then counts as far as it holds WAL.
			end = max(end, endedReach(s.st, end, ended))
		}
		if r > end || f > end {
			t.Errorf("invariant broken during %q: restart_lsn %s, flush_lsn %s, bucket contiguous to %s", s.during, r, f, end)
		}
		if f > max(whole, s.initial) && segSize.Offset(f) != 0 {
			s.mid++
		}
		now := time.Now()
		switch {
		case f > lastFlush || cur <= f+pipeline.LSN(segSize):
			if d := now.Sub(stallSince); d > s.longest {
				s.longest, s.longestDuring = d, stallDuring
			}
			lastFlush, stallSince, stallDuring = max(f, lastFlush), now, ""
		case s.during != "" && !strings.Contains(stallDuring, s.during):
			stallDuring = strings.TrimPrefix(stallDuring+", "+s.during, ", ")
		}
		s.mu.Unlock()
	}
}

// lineEnd is the end of the WAL the bucket holds contiguously from
// segment first, each segment on the timeline that owns it after the
// switches (a switch's segment belongs to the new timeline, whose copy
// holds the old timeline's WAL before the switch).
func lineEnd(have map[pipeline.Segment]bool, first uint64, switches []pipeline.LSN) pipeline.LSN {
	for n := first; ; n++ {
		if !have[pipeline.Segment{Timeline: timelineOf(n, switches), No: n}] {
			return pipeline.LSN(n * uint64(segSize))
		}
	}
}

// timelineOf is the timeline that owns segment n after the switches.
func timelineOf(n uint64, switches []pipeline.LSN) uint32 {
	tli := uint32(1)
	for _, at := range switches {
		if n >= uint64(at)/uint64(segSize) {
			tli++
		}
	}
	return tli
}

// checkChain compares the archive after any number of promotions with the
// pg_wal of the servers that wrote each timeline (writers[i] wrote timeline
// i+1): every history file, each old timeline's last segment as .partial up
// to its switch, and every segment from first to end on the timeline that
// owns it. It returns how many segments it compared.
func (st *stack) checkChain(t *testing.T, writers []*testenv.Postgres, switches []pipeline.LSN, first uint64, end pipeline.LSN) int {
	t.Helper()
	files := st.archivedFiles()
	for i, at := range switches {
		promoted := writers[i+1]
		name := fmt.Sprintf("%08X.history", i+2)
		key, ok := files[name]
		if !ok {
			t.Errorf("%s not archived", name)
		} else if got, _ := st.object(key); !bytes.Equal(got, mustRead(t, filepath.Join(promoted.WALDir(), name))) {
			t.Errorf("archived %s differs from the server's", name)
		}
		if segSize.Offset(at) == 0 {
			continue
		}
		seg := pipeline.SegmentOf(uint32(i+1), at, segSize)
		key, ok = files[seg.Name(segSize)+".partial"]
		if !ok {
			t.Errorf("timeline %d's last segment %s.partial not archived", i+1, seg.Name(segSize))
			continue
		}
		got, _ := st.object(key)
		// PostgreSQL keeps the old timeline's last segment as .partial
		// when archiving is on, else under its own name.
		want, err := os.ReadFile(filepath.Join(promoted.WALDir(), seg.Name(segSize)+".partial"))
		if err != nil {
			want = mustRead(t, filepath.Join(promoted.WALDir(), seg.Name(segSize)))
		}
		n := segSize.Offset(at)
		if len(got) != int(segSize) || len(want) < int(n) || !bytes.Equal(got[:n], want[:n]) {
			t.Errorf("archived %s.partial differs from the server's up to the switch at %s", seg.Name(segSize), at)
		}
	}
	compared := 0
	for no := first; no < uint64(end)/uint64(segSize); no++ {
		tli := timelineOf(no, switches)
		name := pipeline.Segment{Timeline: tli, No: no}.Name(segSize)
		key, ok := files[name]
		if !ok {
			t.Errorf("segment %s missing from the bucket", name)
			continue
		}
		got, meta := st.object(key)
		if !bytes.Equal(got, mustRead(t, filepath.Join(writers[tli-1].WALDir(), name))) {
			t.Errorf("segment %s differs from the pg_wal of the server that wrote timeline %d", name, tli)
		}
		if meta["walship-timeline"] != strconv.Itoa(int(tli)) {
			t.Errorf("segment %s: metadata timeline %q, want %d", name, meta["walship-timeline"], tli)
		}
		compared++
	}
	return compared
}

func mustRead(t *testing.T, name string) []byte {
	t.Helper()
	b, err := os.ReadFile(name)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// bucketOnDisk lists the segments the gateway holds, from its posix
// store, without the gateway.
func bucketOnDisk(st *stack) (map[pipeline.Segment]bool, map[pipeline.Segment]bool, error) {
	dir := filepath.Join(st.s3.Root, st.s3.Bucket, st.prefix, st.server, "wals")
	out := map[pipeline.Segment]bool{}
	ended := map[pipeline.Segment]bool{} // <segment>.partial: an ended timeline's last segment
	err := filepath.WalkDir(dir, func(p string, d os.DirEntry, err error) error {
		if err != nil {
			if os.IsNotExist(err) {
				return nil
			}
			return err
		}
		name := strings.TrimSuffix(d.Name(), filepath.Ext(d.Name()))
		if seg, err := pipeline.ParseSegmentName(name, segSize); err == nil && !d.IsDir() {
			out[seg] = true
		}
		if base, ok := strings.CutSuffix(name, ".partial"); ok && !d.IsDir() {
			if seg, err := pipeline.ParseSegmentName(base, segSize); err == nil {
				ended[seg] = true
			}
		}
		return nil
	})
	return out, ended, err
}

// endedReach is how far into the segment starting at end an ended
// timeline's .partial in the bucket holds WAL (its last byte that is not
// zero), read from the gateway's disk; end when none does.
func endedReach(st *stack, end pipeline.LSN, ended map[pipeline.Segment]bool) pipeline.LSN {
	best := end
	n := uint64(end) / uint64(segSize)
	for seg := range ended {
		if seg.No != n || segSize.Offset(end) != 0 {
			continue
		}
		name := seg.Name(segSize)
		body, err := os.ReadFile(filepath.Join(st.s3.Root, st.s3.Bucket, st.prefix, st.server, "wals", name[:16], name+".partial.zst"))
		if err != nil {
			continue
		}
		raw, err := compress.Decode(compress.Zstd, body, int(segSize))
		if err != nil {
			continue
		}
		k := len(raw)
		for k > 0 && raw[k-1] == 0 {
			k--
		}
		best = max(best, end+pipeline.LSN(k))
	}
	return best
}

// smallDisk is a tmpfs mounted for the spool, which a ballast file fills.
type smallDisk struct {
	dir     string
	ballast string
}

// mountSmallDisk mounts a tmpfs of size bytes at dir (root only); nil when
// it cannot, and the disk-full fault is left out.
func mountSmallDisk(t *testing.T, dir string, size int) *smallDisk {
	if os.Geteuid() != 0 {
		t.Log("not root: no small disk for the spool; the disk-full fault is left out")
		return nil
	}
	if out, err := exec.Command("mount", "-t", "tmpfs", "-o", "size="+strconv.Itoa(size), "walship-chaos", dir).CombinedOutput(); err != nil {
		t.Logf("mount tmpfs: %v %s; the disk-full fault is left out", err, out)
		return nil
	}
	t.Cleanup(func() { exec.Command("umount", "-l", dir).Run() })
	return &smallDisk{dir: dir, ballast: filepath.Join(dir, ".ballast")}
}

// fill takes all the free space.
func (d *smallDisk) fill(t *testing.T) {
	var st syscall.Statfs_t
	if err := syscall.Statfs(d.dir, &st); err != nil {
		t.Fatal(err)
	}
	free := int64(st.Bavail) * st.Bsize
	f, err := os.Create(d.ballast)
	if err != nil {
		return // full already
	}
	defer f.Close()
	buf := make([]byte, 1<<20)
	for written := int64(0); written < free; written += int64(len(buf)) {
		if _, err := f.Write(buf); err != nil {
			break
		}
	}
}

func (d *smallDisk) free() { os.Remove(d.ballast) }
