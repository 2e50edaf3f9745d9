package e2e

import (
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"testing"

	"github.com/walship/walship/internal/testenv"
)

// benchSplitHTTP is BenchmarkDrain's "split-http" shape: walship receive +
// walship archive as separate processes, NATS carrying only the events,
// the archiver fetching each segment from the receiver's spool over HTTP
// (--stage http). It streams from walship_http, a copy of the walship slot
// taken before any shape ran, under its own server name (its own prefix
// in the bucket).
func benchSplitHTTP(b *testing.B, pg *testenv.Postgres, drain func(string, func() []*exec.Cmd) float64,
	startProc func(...string) *exec.Cmd, common func(string) []string, sinkArgs []string, natsURL string, s3 *testenv.S3) float64 {
	pg.Exec(`SELECT pg_drop_replication_slot('walship')`)
	pg.Exec(`SELECT pg_copy_physical_replication_slot('walship_http', 'walship')`)
	secret := filepath.Join(b.TempDir(), "stage.secret")
	if err := os.WriteFile(secret, []byte("bench-stage-secret-0123456789abcdef"), 0o600); err != nil {
		b.Fatal(err)
	}
	return drain("split-http", func() []*exec.Cmd {
		dd := b.TempDir()
		recv := startProc(append([]string{"receive", "--nats", natsURL, "--server", "benchhttp",
			"--dest", "s3://" + s3.Bucket + "/bench", "--s3-endpoint", s3.Endpoint(),
			"--stage", "http", "--stage-listen", "127.0.0.1:" + strconv.Itoa(testenv.FreePort(b)), "--stage-secret-file", secret}, common(dd)...)...)
		arch := startProc(append([]string{"archive", "--nats", natsURL, "--data-dir", dd, "--metrics-addr", "", "--log-level", "warn",
			"--stage-secret-file", secret}, sinkArgs...)...)
		return []*exec.Cmd{recv, arch}
	})
}
