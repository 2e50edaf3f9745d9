package e2e

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/walship/walship/compress"
	"github.com/walship/walship/internal/testenv"
	"github.com/walship/walship/pipeline"
)

// cpuOf is a process's user+system CPU time from /proc.
func cpuOf(pid int) time.Duration {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return 0
	}
	f := strings.Fields(string(b[strings.LastIndexByte(string(b), ')')+2:]))
	ut, _ := strconv.ParseInt(f[11], 10, 64)
	st, _ := strconv.ParseInt(f[12], 10, 64)
	return time.Duration(ut+st) * time.Second / 100 // USER_HZ
}

func selfCPU() time.Duration {
	var ru syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

func usage(ps *os.ProcessState) (cpu time.Duration) {
	return ps.UserTime() + ps.SystemTime()
}

// watchPeakRSS follows a running process's peak resident set (VmHWM in
// /proc) until peak is called, and returns it in MB. The rusage of a
// child is no use here: its peak counts the parent's memory at the fork,
// and this process holds the in-test NATS server's data.
func watchPeakRSS(pid int) (peak func() float64) {
	var kb atomic.Int64
	read := func() {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
		if err != nil {
			return
		}
		for _, line := range strings.Split(string(b), "\n") {
			if f := strings.Fields(line); len(f) >= 2 && f[0] == "VmHWM:" {
				if v, err := strconv.ParseInt(f[1], 10, 64); err == nil && v > kb.Load() {
					kb.Store(v)
				}
			}
		}
	}
	stop := make(chan struct{})
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			read()
			select {
			case <-stop:
				return
			case <-time.After(100 * time.Millisecond):
			}
		}
	}()
	return func() float64 {
		read()
		close(stop)
		<-done
		return float64(kb.Load()) / 1024
	}
}

// BenchmarkDrain measures walship draining a backlog of about 1 GB of WAL
// (16 MB segments) into versitygw with zstd, against pg_receivewal
// draining the same backlog into a local directory in the same run.
//
//	go test -run '^$' -bench Drain -benchtime 1x ./e2e/
//
// Two walship shapes are measured: "run" (one process, embedded NATS,
// archivers read the spool) and "split" (walship receive + walship archive
// as separate processes over an external NATS, bytes staged in the
// JetStream object store).
// The WAL profiles of BenchmarkDrain: the backlog is written by one of
// these. "repeat" is wide rows of a repeated pattern (compresses for free,
// the original bench); "narrow" is ~100-byte rows with 92 random hex
// characters each; "tpcb" is pgbench's TPC-B with a checkpoint every
// ~128 MB of WAL, so that a good share of it is full-page images.
var drainProfiles = []string{"repeat", "narrow", "tpcb"}

// BenchmarkDrain drains a backlog of WAL into versitygw with `walship run`
// and with `walship receive` + `walship archive` over NATS, against
// pg_receivewal writing to local disk on the same WAL in the same run, for
// each WAL profile (WALSHIP_BENCH_PROFILE picks one; WALSHIP_BENCH_MB sizes
// the backlog, default 1024). It also measures the compression ceiling:
// zstd at the archivers' level over the same segments on every core with
// nothing else running.
func BenchmarkDrain(b *testing.B) {
	for _, profile := range drainProfiles {
		if p := os.Getenv("WALSHIP_BENCH_PROFILE"); p != "" && p != profile {
			continue
		}
		b.Run(profile, func(b *testing.B) { benchDrain(b, profile) })
	}
}

// writeBacklog writes about sizeMB of WAL of the profile.
func writeBacklog(b *testing.B, pg *testenv.Postgres, profile string, sizeMB int) {
	lsn := func() pipeline.LSN {
		l, _ := pipeline.ParseLSN(pg.QueryString(`SELECT pg_current_wal_lsn()::text`))
		return l
	}
	from := lsn()
	target := from + pipeline.LSN(sizeMB)<<20
	switch profile {
	case "repeat":
		pg.Exec(`CREATE TABLE bulk (id bigint, payload text)`)
		rows := sizeMB * 1000
		for done := 0; done < rows; done += 100000 {
			pg.Exec(fmt.Sprintf(`INSERT INTO bulk SELECT g, lpad(md5(g::text), 1000, md5((g+1)::text)) FROM generate_series(%d, %d) g`, done, done+99999))
		}
	case "narrow":
		pg.Exec(`CREATE TABLE narrow (id bigint, payload text)`)
		for g := 0; lsn() < target; g += 200000 {
			pg.Exec(fmt.Sprintf(`INSERT INTO narrow SELECT g, md5(random()::text) || md5(random()::text) || left(md5(random()::text), 28) FROM generate_series(%d, %d) g`, g, g+199999))
		}
	case "tpcb":
		if err := pg.Pgbench(context.Background(), "-i", "-s", "20", "-q"); err != nil {
			b.Fatal(err)
		}
		next := lsn()
		for lsn() < target {
			if lsn() >= next {
				pg.Exec(`CHECKPOINT`) // the next change of every page is a full-page image
				next = lsn() + 128<<20
			}
			if err := pg.Pgbench(context.Background(), "-c", "4", "-j", "2", "-t", "2000", "-n"); err != nil {
				b.Fatal(err)
			}
		}
	default:
		b.Fatalf("WAL profile %q: use %v", profile, drainProfiles)
	}
}

// benchCodec is the archivers' codec in the drain benchmark:
// WALSHIP_BENCH_CODEC (zstd, snappy, gzip, none), default zstd.
func benchCodec(b *testing.B) compress.Codec {
	v := os.Getenv("WALSHIP_BENCH_CODEC")
	if v == "" {
		return compress.Zstd
	}
	c, err := compress.ParseCodec(v)
	if err != nil {
		b.Fatalf("WALSHIP_BENCH_CODEC: %v", err)
	}
	return c
}

// compressionCeiling compresses the segments from first to end, read from
// pg_wal, with zstd at the archivers' default level on every core, and
// returns the rate in MB/s of WAL and the ratio.
func compressionCeiling(b *testing.B, pg *testenv.Postgres, first, end pipeline.LSN, seg pipeline.SegmentSize) (float64, float64) {
	tli, _ := strconv.ParseUint(pg.QueryString(`SELECT timeline_id::text FROM pg_control_checkpoint()`), 10, 32)
	var names []string
	for x := first; x < end; x += pipeline.LSN(seg) {
		names = append(names, filepath.Join(pg.WALDir(), pipeline.SegmentOf(uint32(tli), x, seg).Name(seg)))
	}
	// Read them all first: the ceiling is the compressor's, not the disk's.
	data := make([][]byte, len(names))
	for i, n := range names {
		d, err := os.ReadFile(n)
		if err != nil {
			b.Fatalf("compression ceiling: %v", err)
		}
		data[i] = d
	}
	var next, in, out atomic.Int64
	var wg sync.WaitGroup
	t0 := time.Now()
	for w := 0; w < runtime.NumCPU(); w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			enc, err := compress.NewEncoder(benchCodec(b), 0)
			if err != nil {
				b.Error(err)
				return
			}
			for i := int(next.Add(1) - 1); i < len(data); i = int(next.Add(1) - 1) {
				z, err := enc.Encode(data[i])
				if err != nil {
					b.Error(err)
					return
				}
				in.Add(int64(len(data[i])))
				out.Add(int64(len(z)))
			}
		}()
	}
	wg.Wait()
	secs := time.Since(t0).Seconds()
	return float64(in.Load()) / (1 << 20) / secs, float64(in.Load()) / float64(max(out.Load(), 1))
}

func benchDrain(b *testing.B, profile string) {
	const seg = 16 << 20
	sizeMB := 1024
	if s := os.Getenv("WALSHIP_BENCH_MB"); s != "" {
		sizeMB, _ = strconv.Atoi(s)
	}
	for i := 0; i < b.N; i++ {
		pg := testenv.StartPostgres(b, testenv.PGOptions{SegSizeMB: 16, Conf: []string{"max_wal_size = '4GB'", "checkpoint_timeout = '30min'"}})
		s3 := testenv.StartS3(b)
		nats := testenv.StartNATS(b)
		pg.Exec(`SELECT pg_create_physical_replication_slot('walship', true), pg_create_physical_replication_slot('bench_rw', true)`)
		start, _ := pipeline.ParseLSN(pg.QueryString(`SELECT restart_lsn::text FROM pg_replication_slots WHERE slot_name = 'walship'`))
		writeBacklog(b, pg, profile, sizeMB)
		endRaw, _ := pipeline.ParseLSN(pg.QueryString(`SELECT pg_switch_wal()::text`))
		end := pipeline.SegmentSize(seg).Start(endRaw) + seg
		first := pipeline.SegmentSize(seg).Start(start)
		mb := float64(end-first) / (1 << 20)
		b.Logf("%s backlog: %.0f MB of WAL from %s to %s", profile, mb, first, end)

		// Nobody pays for the load's writeback: flush it before each drain.
		settle := func() { pg.Exec(`CHECKPOINT`); syscall.Sync() }
		settle()
		// Baseline: pg_receivewal into a local directory, stopping at the end.
		// It runs before and after walship (from a copy of its slot) and the
		// ratio is taken against the faster of the two, since disk writeback
		// makes single runs noisy.
		pg.Exec(`SELECT pg_copy_physical_replication_slot('bench_rw', 'bench_rw2')`)
		baseline := func(slot string) float64 {
			settle()
			dir := b.TempDir()
			rw := exec.Command(filepath.Join(pg.Bin, "pg_receivewal"), "-h", "127.0.0.1", "-p", strconv.Itoa(pg.Port), "-U", "postgres",
				"-S", slot, "-D", dir, "-E", end.String(), "--no-loop")
			var out strings.Builder
			rw.Stdout, rw.Stderr = &out, &out
			t0 := time.Now()
			if err := rw.Start(); err != nil {
				b.Fatal(err)
			}
			peak := watchPeakRSS(rw.Process.Pid)
			err := rw.Wait()
			secs := time.Since(t0).Seconds()
			rss := peak()
			if err != nil {
				b.Fatalf("pg_receivewal: %v\n%s", err, out.String())
			}
			cpu := usage(rw.ProcessState)
			b.Logf("pg_receivewal (%s): %.1f MB/s, %.2f CPU-s/GB, peak RSS %.0f MB", slot, mb/secs, cpu.Seconds()/mb*1024, rss)
			os.RemoveAll(dir)
			return mb / secs
		}
		rwFirst := baseline("bench_rw")

		flush := func() pipeline.LSN {
			l, _ := pipeline.ParseLSN(pg.QueryString(`SELECT restart_lsn::text FROM pg_replication_slots WHERE slot_name = 'walship'`))
			return l
		}
		common := func(dataDir string) []string {
			return []string{"--pg", pg.URL("postgres"), "--data-dir", dataDir, "--metrics-addr", os.Getenv("WALSHIP_BENCH_METRICS"), "--status-interval", "1s",
				"--log-level", "warn"}
		}
		sinkArgs := []string{"--dest", "s3://" + s3.Bucket + "/bench", "--s3-endpoint", s3.Endpoint(), "--s3-path-style", "--compression", string(benchCodec(b))}
		if w := os.Getenv("WALSHIP_BENCH_WORKERS"); w != "" {
			sinkArgs = append(sinkArgs, "--workers", w)
		}
		startProc := func(args ...string) *exec.Cmd {
			cmd := exec.Command(walshipBin, args...)
			cmd.Env = append(os.Environ(), s3.Env()...)
			if g := os.Getenv("WALSHIP_BENCH_GOGC"); g != "" {
				cmd.Env = append(cmd.Env, "GOGC="+g)
			}
			cmd.Stderr = os.Stderr
			if err := cmd.Start(); err != nil {
				b.Fatal(err)
			}
			return cmd
		}
		stopProc := func(cmd *exec.Cmd) {
			cmd.Process.Signal(syscall.SIGTERM)
			cmd.Wait()
		}
		drain := func(name string, procs func() []*exec.Cmd) float64 {
			settle()
			s3cpu0, nats0 := cpuOf(s3.PID()), selfCPU()
			t0 := time.Now()
			ps := procs()
			var peaks []func() float64
			for _, p := range ps {
				peaks = append(peaks, watchPeakRSS(p.Process.Pid))
			}
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Minute)
			for flush() < end && ctx.Err() == nil {
				time.Sleep(100 * time.Millisecond)
			}
			cancel()
			secs := time.Since(t0).Seconds()
			s3cpu, natsCPU := cpuOf(s3.PID())-s3cpu0, selfCPU()-nats0
			var total time.Duration
			var parts []string
			for j, p := range ps {
				rss := peaks[j]()
				stopProc(p)
				cpu := usage(p.ProcessState)
				total += cpu
				parts = append(parts, fmt.Sprintf("%s[%d] %.2f CPU-s/GB RSS %.0f MB", p.Args[1], j, cpu.Seconds()/mb*1024, rss))
				b.ReportMetric(rss, name+"-"+p.Args[1]+"-RSS-MB")
			}
			if flush() < end {
				b.Fatalf("%s: walship did not drain the backlog in time", name)
			}
			mbs := mb / secs
			perGB := func(d time.Duration) float64 { return d.Seconds() / mb * 1024 }
			b.Logf("walship %s: %.1f MB/s; %s; S3 %.2f CPU-s/GB; in-test NATS %.2f CPU-s/GB; pipeline total %.2f CPU-s/GB",
				name, mbs, strings.Join(parts, ", "), perGB(s3cpu), perGB(natsCPU), perGB(total+s3cpu+natsCPU))
			b.ReportMetric(mbs, name+"-MB/s")
			b.ReportMetric(perGB(total+s3cpu+natsCPU), name+"-CPU-s/GB")
			return mbs
		}
		pg.Exec(`SELECT pg_copy_physical_replication_slot('walship', 'walship_split')`)
		pg.Exec(`SELECT pg_copy_physical_replication_slot('walship', 'walship_http')`) // bench_stage_test.go

		runMBs := drain("run", func() []*exec.Cmd {
			return []*exec.Cmd{startProc(append(append([]string{"run", "--embedded-nats-listen", "127.0.0.1:" + strconv.Itoa(testenv.FreePort(b)),
				"--server", "benchrun"}, common(b.TempDir())...), sinkArgs...)...)}
		})

		// The split shape streams from a copy of the slot taken before the run.
		pg.Exec(`SELECT pg_drop_replication_slot('walship')`)
		pg.Exec(`SELECT pg_copy_physical_replication_slot('walship_split', 'walship')`)
		splitMBs := drain("split", func() []*exec.Cmd {
			dd := b.TempDir()
			recv := startProc(append([]string{"receive", "--nats", nats.URL(), "--server", "benchsplit",
				"--dest", "s3://" + s3.Bucket + "/bench", "--s3-endpoint", s3.Endpoint()}, common(dd)...)...)
			arch := startProc(append([]string{"archive", "--nats", nats.URL(), "--data-dir", dd, "--metrics-addr", "", "--log-level", "warn"}, sinkArgs...)...)
			return []*exec.Cmd{recv, arch}
		})
		httpMBs := benchSplitHTTP(b, pg, drain, startProc, common, sinkArgs, nats.URL(), s3) // bench_stage_test.go
		// WAL-G's wal-receive from a copy of the slot the split shape copied.
		walgMBs := walgDrain(b, pg, s3, "walship_split", first, end, seg, settle)
		rw := max(rwFirst, baseline("bench_rw2"))
		// Last: it reads every segment into this process, and a child's
		// peak RSS counts the parent's at the time of the fork.
		ceiling, ratio := compressionCeiling(b, pg, first, end, seg)
		b.Logf("compression ceiling (%s at the archivers' level on %d cores, nothing else running): %.1f MB/s, ratio %.2f:1", benchCodec(b), runtime.NumCPU(), ceiling, ratio)
		b.ReportMetric(ceiling, "ceiling-MB/s")
		b.Logf("%s: ratio to the faster pg_receivewal run (%.1f MB/s): run %.2f, split %.2f; share of the compression ceiling (%.1f MB/s): run %.2f, split %.2f",
			profile, rw, runMBs/rw, splitMBs/rw, ceiling, runMBs/ceiling, splitMBs/ceiling)
		b.ReportMetric(rw, "pg_receivewal-MB/s")
		b.ReportMetric(runMBs/rw, "run-ratio")
		b.ReportMetric(splitMBs/rw, "split-ratio")
		b.Logf("%s: split-http (--stage http): ratio to pg_receivewal %.2f, share of the compression ceiling %.2f", profile, httpMBs/rw, httpMBs/ceiling)
		b.ReportMetric(httpMBs/rw, "split-http-ratio")
		if walgMBs > 0 {
			b.Logf("%s: walg %.2f of pg_receivewal, %.2f of the ceiling; split is %.2fx walg, split-http %.2fx walg, run %.2fx walg", profile, walgMBs/rw, walgMBs/ceiling, splitMBs/walgMBs, httpMBs/walgMBs, runMBs/walgMBs)
			b.ReportMetric(walgMBs/rw, "walg-ratio")
		}
	}
}
