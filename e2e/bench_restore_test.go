package e2e

import (
	"context"
	"crypto/sha256"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/walship/walship/compress"
	"github.com/walship/walship/internal/testenv"
	"github.com/walship/walship/pipeline"
	"github.com/walship/walship/sinks"
	s3sink "github.com/walship/walship/sinks/s3"
)

// BenchmarkRestore measures restore throughput the way PostgreSQL drives
// it: one restore_command process per segment, in order, each segment
// consumed (removed) before the next call. 200 segments of 16 MB (real WAL
// from a bulk insert), archived by walship with zstd; walship fetch with
// --prefetch 0 and with the default, and barman-cloud-wal-restore on the
// same segments stored with gzip, in the same run.
//
//	go test -run '^$' -bench Restore -benchtime 1x ./e2e/
func BenchmarkRestore(b *testing.B) {
	const seg = pipeline.SegmentSize(16 << 20)
	nseg := 200
	if s := os.Getenv("WALSHIP_BENCH_SEGMENTS"); s != "" {
		nseg, _ = strconv.Atoi(s)
	}
	for i := 0; i < b.N; i++ {
		pg := testenv.StartPostgres(b, testenv.PGOptions{SegSizeMB: 16, Conf: []string{"max_wal_size = '8GB'", "checkpoint_timeout = '30min'", "wal_keep_size = '8GB'"}})
		gw := testenv.StartS3(b)
		nats := testenv.StartNATS(b)
		pg.Exec(`SELECT pg_create_physical_replication_slot('walship', true)`)
		pg.Exec(`CREATE TABLE bulk (id bigint, payload text)`)
		startL, _ := pipeline.ParseLSN(pg.QueryString(`SELECT restart_lsn::text FROM pg_replication_slots WHERE slot_name = 'walship'`))
		first := pipeline.SegmentOf(1, startL, seg)
		for g := 0; ; g += 100000 {
			cur, _ := pipeline.ParseLSN(pg.QueryString(`SELECT pg_current_wal_lsn()::text`))
			if uint64(cur)/uint64(seg) >= first.No+uint64(nseg)+1 {
				break
			}
			pg.Exec(fmt.Sprintf(`INSERT INTO bulk SELECT g, lpad(md5(g::text), 1000, md5((g+1)::text)) FROM generate_series(%d, %d) g`, g, g+99999))
		}
		pg.Exec(`SELECT pg_switch_wal()`)
		names := make([]string, nseg)
		for k := range names {
			names[k] = pipeline.Segment{Timeline: 1, No: first.No + uint64(k)}.Name(seg)
		}
		end := pipeline.Segment{Timeline: 1, No: first.No + uint64(nseg)}.StartLSN(seg)

		// Archive with walship (zstd).
		w := exec.Command(walshipBin, "run", "--pg", pg.URL("postgres"), "--nats", nats.URL(), "--server", "bench",
			"--dest", "s3://"+gw.Bucket+"/z", "--s3-endpoint", gw.Endpoint(), "--s3-path-style", "--data-dir", b.TempDir(),
			"--metrics-addr", "", "--log-level", "warn")
		w.Env = append(os.Environ(), gw.Env()...)
		w.Stderr = os.Stderr
		if err := w.Start(); err != nil {
			b.Fatal(err)
		}
		for deadline := time.Now().Add(10 * time.Minute); time.Now().Before(deadline); time.Sleep(200 * time.Millisecond) {
			l, _ := pipeline.ParseLSN(pg.QueryString(`SELECT restart_lsn::text FROM pg_replication_slots WHERE slot_name = 'walship'`))
			if l >= end {
				break
			}
		}
		w.Process.Signal(os.Interrupt)
		w.Wait()

		// The same segments with gzip in barman-cloud's layout, for barman.
		ctx := context.Background()
		for _, kv := range gw.Env() {
			k, v, _ := cut(kv)
			b.Setenv(k, v)
		}
		sink, err := s3sink.New(ctx, s3sink.Options{Bucket: gw.Bucket, Endpoint: gw.Endpoint(), PathStyle: true})
		if err != nil {
			b.Fatal(err)
		}
		gz, _ := compress.NewEncoder(compress.Gzip, 0)
		layout := sinks.BarmanCloud{Prefix: "g", Server: "bench"}
		for _, n := range names {
			raw, err := os.ReadFile(filepath.Join(pg.WALDir(), n))
			if err != nil {
				b.Fatal(err)
			}
			body, _ := gz.Encode(raw)
			sum := sha256.Sum256(raw)
			if err := sink.Put(ctx, layout.Key(n, ".gz"), body, sinks.Metadata{SHA256: pipeline.SHA256Hex(sum[:]), Codec: "gzip", RawSize: int64(len(raw))}); err != nil {
				b.Fatal(err)
			}
		}

		mb := float64(nseg) * float64(seg) / (1 << 20)
		// replay calls restore for each segment in order, like the startup
		// process, and removes each file once "replayed".
		replay := func(label string, argv func(name, dest string) []string) float64 {
			dir := filepath.Join(b.TempDir(), "pg_wal")
			os.MkdirAll(dir, 0o700)
			dest := filepath.Join(dir, "RECOVERYXLOG")
			syncAndDrop()
			t0 := time.Now()
			for _, n := range names {
				a := argv(n, dest)
				cmd := exec.Command(a[0], a[1:]...)
				cmd.Env = append(os.Environ(), gw.Env()...)
				if out, err := cmd.CombinedOutput(); err != nil {
					b.Fatalf("%s %s: %v\n%s", label, n, err, out)
				}
				if fi, err := os.Stat(dest); err != nil || fi.Size() != int64(seg) {
					b.Fatalf("%s %s: restored file missing or short", label, n)
				}
				os.Remove(dest)
			}
			secs := time.Since(t0).Seconds()
			b.Logf("%s: %.1f MB/s (%d segments in %.1fs, %.1f ms per call)", label, mb/secs, nseg, secs, secs*1000/float64(nseg))
			b.ReportMetric(mb/secs, label+"-MB/s")
			return mb / secs
		}
		fetch := func(prefetch int) func(name, dest string) []string {
			return func(name, dest string) []string {
				return []string{walshipBin, "fetch", name, dest, "--dest", "s3://" + gw.Bucket + "/z", "--s3-endpoint", gw.Endpoint(),
					"--s3-path-style", "--server", "bench", "--prefetch", strconv.Itoa(prefetch)}
			}
		}
		replay("walship-fetch-prefetch-0", fetch(0))
		replay("walship-fetch-prefetch-8", fetch(8))
		if bin, err := exec.LookPath("barman-cloud-wal-restore"); err == nil {
			replay("barman-cloud-wal-restore-gzip", func(name, dest string) []string {
				return []string{"/usr/bin/python3", bin, "--endpoint-url", gw.Endpoint(), "--cloud-provider", "aws-s3",
					"s3://" + gw.Bucket + "/g", "bench", name, dest}
			})
		} else {
			b.Log("barman-cloud-wal-restore not installed; skipped")
		}
	}
}

func cut(kv string) (string, string, bool) {
	for i := 0; i < len(kv); i++ {
		if kv[i] == '=' {
			return kv[:i], kv[i+1:], true
		}
	}
	return kv, "", false
}

// syncAndDrop flushes dirty pages so one measurement does not pay for the
// previous one's writeback.
func syncAndDrop() {
	exec.Command("sync").Run()
}
