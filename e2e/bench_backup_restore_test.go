package e2e

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/walship/walship/internal/testenv"
)

// BenchmarkRestoreBackup measures `walship restore` of a base backup of
// about 2 GB (pgbench, scale WALSHIP_BENCH_BACKUP_SCALE, default 130) from
// versitygw on loopback (16 MiB chunks, zstd, put by the fixture) into
// local disk, against `tar -xzf` of `pg_basebackup -Ft -z` output on local
// disk, in the same run: MB/s of raw data directory bytes, CPU seconds per
// GB and peak RSS of the restoring process (walship's own; versitygw's CPU
// is not counted, as the bucket's server is not on the restoring host in
// production).
//
//	go test -run '^$' -bench RestoreBackup -benchtime 1x ./e2e/
func BenchmarkRestoreBackup(b *testing.B) {
	scale := 130
	if s := os.Getenv("WALSHIP_BENCH_BACKUP_SCALE"); s != "" {
		scale, _ = strconv.Atoi(s)
	}
	for i := 0; i < b.N; i++ {
		st := &stack{t: b, pg: testenv.StartPostgres(b, testenv.PGOptions{Conf: []string{"max_wal_size = '4GB'", "checkpoint_timeout = '30min'"}}),
			s3: testenv.StartS3(b), dataDir: b.TempDir(), prefix: "bench", server: "bench"}
		if err := st.pg.Pgbench(context.Background(), "-i", "-s", strconv.Itoa(scale), "-q"); err != nil {
			b.Fatal(err)
		}
		st.pg.Exec(`CHECKPOINT`)
		size, _ := strconv.ParseInt(st.pg.QueryString(`SELECT sum(pg_database_size(oid))::text FROM pg_database`), 10, 64)
		b.Logf("database: %.0f MB", float64(size)/1e6)

		t0 := time.Now()
		cat := putFixtureBackup(b, st, fixtureOpts{ChunkSize: 16 << 20, NoWALWait: true})
		b.Logf("fixture backup %s: %d raw bytes, %d stored (zstd), %d chunks in %.0f s", cat.ID, cat.Size, cat.StoredSize, len(cat.Archives[0].Chunks), time.Since(t0).Seconds())

		restoreCmd := func(target string, extra ...string) *exec.Cmd {
			return exec.Command(walshipBin, append([]string{"restore", "--dest", "s3://" + st.s3.Bucket + "/" + st.prefix, "--s3-endpoint", st.s3.Endpoint(),
				"--s3-path-style", "--server", st.server, "--backup", cat.ID, "--target-dir", target}, extra...)...)
		}
		exec.Command("sync").Run()
		b.ResetTimer()
		w := measure(b, restoreCmd(filepath.Join(b.TempDir(), "restored")), st.env())
		b.StopTimer()
		w.report(b, "walship restore (S3, zstd, verified, syncfs at the end)", cat.Size)
		exec.Command("sync").Run()
		ns := measure(b, restoreCmd(filepath.Join(b.TempDir(), "restored-nosync"), "--no-sync"), st.env())
		ns.report(b, "walship restore --no-sync", cat.Size)

		// pg_basebackup -Ft -z to local disk, then tar -xzf.
		t0 = time.Now()
		tgz := st.pg.BaseBackupTar("-z", "-c", "fast")
		b.Logf("pg_basebackup -Ft -z: %.0f s", time.Since(t0).Seconds())
		out := filepath.Join(b.TempDir(), "untar")
		os.MkdirAll(out, 0o700)
		exec.Command("sync").Run()
		x := measure(b, exec.Command("tar", "-xzf", filepath.Join(tgz, "base.tar.gz"), "-C", out), nil)
		x.report(b, "tar -xzf base.tar.gz (local disk, no sync)", cat.Size)
		t0 = time.Now()
		exec.Command("sync", "-f", out).Run()
		b.Logf("then sync -f: %.1f s", time.Since(t0).Seconds())
		b.ReportMetric(float64(cat.Size)/1e6/w.wall.Seconds(), "walship-MB/s")
		b.ReportMetric(float64(cat.Size)/1e6/x.wall.Seconds(), "tar-MB/s")
	}
}

type restoreUsage struct {
	wall, cpu time.Duration
	maxRSS    int64 // KiB
}

func measure(b *testing.B, cmd *exec.Cmd, env []string) restoreUsage {
	b.Helper()
	cmd.Env = append(os.Environ(), env...)
	start := time.Now()
	out, err := cmd.CombinedOutput()
	if err != nil {
		b.Fatalf("%v: %v\n%s", cmd.Args, err, out)
	}
	for _, line := range strings.Split(string(out), "\n") {
		if strings.HasPrefix(line, "restored ") {
			b.Log(line)
		}
	}
	u := restoreUsage{wall: time.Since(start)}
	if ru, ok := cmd.ProcessState.SysUsage().(*syscall.Rusage); ok {
		u.cpu = time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
		u.maxRSS = ru.Maxrss
	}
	return u
}

func (u restoreUsage) report(b *testing.B, what string, bytes int64) {
	gb := float64(bytes) / 1e9
	b.Logf("%s: %.1f s, %.0f MB/s, %.1f CPU-s/GB, max RSS %.0f MB", what, u.wall.Seconds(), float64(bytes)/1e6/u.wall.Seconds(), u.cpu.Seconds()/gb, float64(u.maxRSS)/1024)
}
