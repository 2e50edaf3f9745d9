package e2e

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
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

// walgDrain is BenchmarkDrain's "walg" shape: WAL-G's `wal-g wal-receive`
// (the binary named by WALSHIP_WALG, which scripts/walg.sh builds) drains
// the same backlog from a copy of the slot fromSlot into the same
// versitygw, zstd at the level walship's archivers use (fastest; set
// WALSHIP_BENCH_WALG_ZSTD_LEVEL to another WALG_ZSTD_LEVEL to compare).
//
// wal-receive streams one segment, uploads it, and only then reports the
// segment's end as its write (and so flush) position, so the slot moves
// after the upload, as walship's does. The shape is timed the way the
// others are: from the start of the process until the slot's restart_lsn
// reaches end. Afterwards the bucket must hold every segment of the
// backlog, and each object must decompress to the bytes of pg_wal's file.
//
// It returns WAL-G's MB/s, or 0 when WALSHIP_WALG is unset (the shape is
// skipped with a log line).
func walgDrain(b *testing.B, pg *testenv.Postgres, s3srv *testenv.S3, fromSlot string, first, end pipeline.LSN, seg pipeline.SegmentSize, settle func()) float64 {
	b.Helper()
	bin := os.Getenv("WALSHIP_WALG")
	if bin == "" {
		b.Log("walg: skipped: WALSHIP_WALG is not set (scripts/bench.sh sets it from scripts/walg.sh)")
		return 0
	}
	if _, err := os.Stat(bin); err != nil {
		b.Logf("walg: skipped: WALSHIP_WALG=%s: %v", bin, err)
		return 0
	}
	const slot, prefix = "bench_walg", "walg"
	pg.Exec(fmt.Sprintf(`SELECT pg_copy_physical_replication_slot('%s', '%s')`, fromSlot, slot))
	defer pg.Exec(fmt.Sprintf(`SELECT pg_drop_replication_slot('%s')`, slot))
	level := os.Getenv("WALSHIP_BENCH_WALG_ZSTD_LEVEL")
	if level == "" {
		level = "fastest"
	}
	mb := float64(end-first) / (1 << 20)

	settle()
	logPath := filepath.Join(b.TempDir(), "wal-g.log")
	logFile, err := os.Create(logPath)
	if err != nil {
		b.Fatal(err)
	}
	defer logFile.Close()
	cmd := exec.Command(bin, "wal-receive")
	cmd.Dir = b.TempDir()
	cmd.Env = append(os.Environ(), s3srv.Env()...)
	cmd.Env = append(cmd.Env,
		"HOME="+cmd.Dir, // no ~/.walg.json of the machine's
		"PGHOST=127.0.0.1", "PGPORT="+strconv.Itoa(pg.Port), "PGUSER=postgres", "PGDATABASE=postgres", "PGSSLMODE=disable",
		"WALG_SLOTNAME="+slot,
		"WALG_S3_PREFIX=s3://"+s3srv.Bucket+"/"+prefix,
		"AWS_ENDPOINT="+s3srv.Endpoint(), "AWS_S3_FORCE_PATH_STYLE=true",
		"WALG_COMPRESSION_METHOD=zstd", "WALG_ZSTD_LEVEL="+level)
	cmd.Stdout, cmd.Stderr = logFile, logFile
	load0 := loadAvg()
	s3cpu0 := cpuOf(s3srv.PID())
	t0 := time.Now()
	if err := cmd.Start(); err != nil {
		b.Fatalf("walg: start %s: %v", bin, err)
	}
	peak := watchPeakRSS(cmd.Process.Pid)
	exited := make(chan struct{})
	go func() { cmd.Wait(); close(exited) }()
	restart := func() pipeline.LSN {
		l, _ := pipeline.ParseLSN(pg.QueryString(`SELECT restart_lsn::text FROM pg_replication_slots WHERE slot_name = $1`, slot))
		return l
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Minute)
	defer cancel()
	for restart() < end && ctx.Err() == nil {
		select {
		case <-exited:
			b.Fatalf("walg: wal-g wal-receive exited (%v) before draining the backlog; its log:\n%s", cmd.ProcessState, fileTail(logPath, 2000))
		case <-time.After(100 * time.Millisecond):
		}
	}
	secs := time.Since(t0).Seconds()
	s3cpu := cpuOf(s3srv.PID()) - s3cpu0
	rss := peak()
	load1 := loadAvg()
	cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-exited:
	case <-time.After(10 * time.Second):
		cmd.Process.Kill()
		<-exited
	}
	if restart() < end {
		b.Fatalf("walg: the slot is at %s after %.0f s, short of %s; wal-g's log:\n%s", restart(), secs, end, fileTail(logPath, 2000))
	}
	cpu := usage(cmd.ProcessState)
	raw, packed := checkWalgBucket(b, pg, s3srv, prefix+"/wal_005/", first, end, seg)

	mbs := mb / secs
	perGB := func(d time.Duration) float64 { return d.Seconds() / mb * 1024 }
	b.Logf("walg (wal-g wal-receive, zstd %s): %.1f MB/s; wal-g %.2f CPU-s/GB RSS %.0f MB; S3 %.2f CPU-s/GB; total %.2f CPU-s/GB; ratio %.2f:1; all %d segments in the bucket match pg_wal; load average %s before, %s after",
		level, mbs, perGB(cpu), rss, perGB(s3cpu), perGB(cpu+s3cpu), float64(raw)/float64(max(packed, 1)), int((end-first)/pipeline.LSN(seg)), load0, load1)
	b.ReportMetric(mbs, "walg-MB/s")
	b.ReportMetric(perGB(cpu+s3cpu), "walg-CPU-s/GB")
	b.ReportMetric(rss, "walg-RSS-MB")
	return mbs
}

// checkWalgBucket checks that the bucket holds, under prefix, one object
// per segment from first to end and that each decompresses to the bytes
// of the segment in pg_wal. It returns the raw and the stored bytes.
func checkWalgBucket(b *testing.B, pg *testenv.Postgres, s3srv *testenv.S3, prefix string, first, end pipeline.LSN, seg pipeline.SegmentSize) (raw, packed int64) {
	b.Helper()
	ctx := context.Background()
	client := s3srv.Client()
	keys := map[string]string{} // segment name -> key
	p := s3.NewListObjectsV2Paginator(client, &s3.ListObjectsV2Input{Bucket: aws.String(s3srv.Bucket), Prefix: aws.String(prefix)})
	for p.HasMorePages() {
		page, err := p.NextPage(ctx)
		if err != nil {
			b.Fatalf("walg: list the bucket: %v", err)
		}
		for _, o := range page.Contents {
			name, _ := compress.SplitExt(strings.TrimPrefix(aws.ToString(o.Key), prefix))
			keys[name] = aws.ToString(o.Key)
		}
	}
	tli, _ := strconv.ParseUint(pg.QueryString(`SELECT timeline_id::text FROM pg_control_checkpoint()`), 10, 32)
	for x := first; x < end; x += pipeline.LSN(seg) {
		name := pipeline.SegmentOf(uint32(tli), x, seg).Name(seg)
		key, ok := keys[name]
		if !ok {
			b.Fatalf("walg: the slot passed %s but the bucket has no %s (it holds %d objects under %s)", end, name, len(keys), prefix)
		}
		obj, err := client.GetObject(ctx, &s3.GetObjectInput{Bucket: aws.String(s3srv.Bucket), Key: aws.String(key)})
		if err != nil {
			b.Fatalf("walg: get %s: %v", key, err)
		}
		z, err := io.ReadAll(obj.Body)
		obj.Body.Close()
		if err != nil {
			b.Fatalf("walg: read %s: %v", key, err)
		}
		_, codec := compress.SplitExt(key)
		got, err := compress.Decode(codec, z, int(seg))
		if err != nil {
			b.Fatalf("walg: decompress %s: %v", key, err)
		}
		want, err := os.ReadFile(filepath.Join(pg.WALDir(), name))
		if err != nil {
			b.Fatalf("walg: %v", err)
		}
		if !bytes.Equal(got, want) {
			b.Fatalf("walg: %s holds %d bytes that differ from pg_wal's %s", key, len(got), name)
		}
		raw += int64(len(got))
		packed += int64(len(z))
	}
	return raw, packed
}

// loadAvg is the machine's one-minute load average, for reading a
// figure on a shared machine.
func loadAvg() string {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return "?"
	}
	return strings.Fields(string(b))[0]
}

// fileTail is the last n bytes of a file, for error messages.
func fileTail(path string, n int) string {
	b, _ := os.ReadFile(path)
	return tail(string(b), n)
}
