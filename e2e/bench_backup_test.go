package e2e

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/walship/walship/internal/testenv"
)

// BenchmarkBackup measures a base backup of a ~2 GB database (pgbench
// scale 130; WALSHIP_BENCH_BACKUP_SCALE to change it) two ways in the same
// run: walship backup through the pipeline (walship run's archivers,
// zstd, into versitygw) and pg_basebackup -Ft -z to local disk. It reports
// throughput (database MB per second), CPU seconds per GB (walship: the
// backup process, walship run, NATS (in this process) and versitygw;
// pg_basebackup: its own process) and the peak RSS of walship backup.
// WALSHIP_BENCH_BACKUP_CHUNKS=4MiB,16MiB,64MiB compares chunk sizes.
//
//	go test -run '^$' -bench Backup -benchtime 1x ./e2e/
func BenchmarkBackup(b *testing.B) {
	scale := "130"
	if s := os.Getenv("WALSHIP_BENCH_BACKUP_SCALE"); s != "" {
		scale = s
	}
	for i := 0; i < b.N; i++ {
		pg := testenv.StartPostgres(b, testenv.PGOptions{SegSizeMB: 16, Conf: []string{"max_wal_size = '4GB'", "checkpoint_timeout = '30min'", "wal_keep_size = '4GB'"}})
		gw := testenv.StartS3(b)
		nats := testenv.StartNATS(b)
		if err := pg.Pgbench(b.Context(), "-i", "-s", scale, "-q"); err != nil {
			b.Fatal(err)
		}
		pg.Exec(`CHECKPOINT`)
		dbMB, _ := strconv.ParseFloat(pg.QueryString(`SELECT sum(pg_database_size(oid))::text FROM pg_database`), 64)
		dbMB /= 1 << 20
		dest := "s3://" + gw.Bucket + "/bench"
		common := []string{"--pg", pg.URL("postgres"), "--nats", nats.URL(), "--server", "bench", "--dest", dest,
			"--s3-endpoint", gw.Endpoint(), "--s3-path-style", "--data-dir", b.TempDir(), "--log-level", "warn"}
		run := exec.Command(walshipBin, append([]string{"run", "--create-slot", "--metrics-addr", ""}, common...)...)
		run.Env = append(os.Environ(), gw.Env()...)
		run.Stderr = os.Stderr
		if err := run.Start(); err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() { run.Process.Kill(); run.Wait() })
		time.Sleep(2 * time.Second) // the receiver connects; not measured

		// walship backup, once per chunk size.
		chunks := []string{"16MiB"}
		if c := os.Getenv("WALSHIP_BENCH_BACKUP_CHUNKS"); c != "" {
			chunks = strings.Split(c, ",")
		}
		gb := dbMB / 1024
		for _, chunk := range chunks {
			sfx := ""
			if len(chunks) > 1 {
				sfx = "-" + chunk
			}
			runCPU, gwCPU, natsCPU := cpuOf(run.Process.Pid), cpuOf(gw.PID()), selfCPU()
			began := time.Now()
			bk := exec.Command(walshipBin, append([]string{"backup", "--metrics-addr", "", "--chunk-size", chunk}, common...)...)
			bk.Env = append(os.Environ(), gw.Env()...)
			var out bytes.Buffer
			bk.Stdout, bk.Stderr = &out, os.Stderr
			if err := bk.Start(); err != nil {
				b.Fatal(err)
			}
			peak := watchPeakRSS(bk.Process.Pid)
			if err := bk.Wait(); err != nil {
				b.Fatalf("walship backup: %v", err)
			}
			took := time.Since(began)
			rss := peak()
			cpu := usage(bk.ProcessState) + cpuOf(run.Process.Pid) - runCPU + cpuOf(gw.PID()) - gwCPU + selfCPU() - natsCPU
			b.ReportMetric(dbMB/took.Seconds(), "walship"+sfx+"-MB/s")
			b.ReportMetric(cpu.Seconds()/gb, "walship"+sfx+"-CPU-s/GB")
			b.ReportMetric(usage(bk.ProcessState).Seconds()/gb, "walship"+sfx+"-backup-proc-CPU-s/GB")
			b.ReportMetric(rss, "walship"+sfx+"-backup-peak-RSS-MB")
			b.Logf("walship backup --chunk-size %s: %s, %.0f MB in %s", chunk, strings.TrimSpace(out.String()), dbMB, took.Round(time.Millisecond))
			time.Sleep(time.Second) // a new backup ID
		}

		// pg_basebackup -Ft -z to local disk.
		dir := filepath.Join(b.TempDir(), "pgbb")
		began := time.Now()
		pb := exec.Command(filepath.Join(pg.Bin, "pg_basebackup"), "-h", "127.0.0.1", "-p", strconv.Itoa(pg.Port), "-U", "postgres",
			"-D", dir, "-Ft", "-z", "-X", "none", "-c", "fast", "--no-sync")
		pb.Stderr = os.Stderr
		if err := pb.Run(); err != nil {
			b.Fatalf("pg_basebackup: %v", err)
		}
		took := time.Since(began)
		b.ReportMetric(dbMB/took.Seconds(), "pg_basebackup-MB/s")
		b.ReportMetric(usage(pb.ProcessState).Seconds()/gb, "pg_basebackup-CPU-s/GB")
		b.Logf("pg_basebackup -Ft -z of %.0f MB in %s", dbMB, took.Round(time.Millisecond))
	}
}
