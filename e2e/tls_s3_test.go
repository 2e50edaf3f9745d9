package e2e

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/s3"

	"github.com/walship/walship/internal/testenv"
	"github.com/walship/walship/pipeline"
)

// TestS3HTTPS: versitygw serves HTTPS with a certificate from a private
// CA. walship archives to it with --s3-ca-bundle (and SSE and a storage
// class on every PUT) and fetches back with AWS_CA_BUNDLE, byte for byte;
// without the bundle, each is one clear line and a non-zero exit.
func TestS3HTTPS(t *testing.T) {
	ca := testenv.NewCA(t, "walship test CA")
	st := &stack{t: t, pg: testenv.StartPostgres(t, testenv.PGOptions{}), s3: testenv.StartS3TLS(t, ca),
		dataDir: t.TempDir(), prefix: "backups", server: "https"}
	dest := []string{"--dest", "s3://" + st.s3.Bucket + "/" + st.prefix, "--s3-endpoint", st.s3.Endpoint(), "--s3-path-style", "--server", st.server}
	runArgs := func(extra ...string) []string {
		return append(append([]string{"run", "--pg", st.pg.URL("postgres"), "--create-slot", "--data-dir", st.dataDir,
			"--metrics-addr", "", "--embedded-nats-listen", "127.0.0.1:" + strconv.Itoa(testenv.FreePort(t)), "--status-interval", "1s"}, dest...), extra...)
	}

	t.Run("no CA bundle", func(t *testing.T) {
		logLast(t, failsWith(t, st.env(), runArgs(), "--s3-ca-bundle", "AWS_CA_BUNDLE"))
	})

	p := startWalship(t, st.env(), runArgs("--s3-ca-bundle", ca.CAPath, "--s3-sse", "AES256", "--s3-storage-class", "STANDARD")...)
	st.pg.Exec(`CREATE TABLE https_marker AS SELECT g FROM generate_series(1, 1000) g`)
	end := st.switchWAL()
	seg := uint64(end-1) / uint64(segSize)
	name := pipeline.Segment{Timeline: 1, No: seg}.Name(segSize)
	waitFor(t, 40*time.Second, "segment "+name+" in the bucket over HTTPS", func() bool {
		if p.exited() {
			t.Fatal("walship run exited")
		}
		_, ok := st.archivedSegments()[seg]
		return ok
	})
	key := st.archivedSegments()[seg]
	head, err := st.s3.Client().HeadObject(context.Background(), &s3.HeadObjectInput{Bucket: aws.String(st.s3.Bucket), Key: aws.String(key)})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("versitygw answers HEAD with server-side encryption %q, storage class %q", head.ServerSideEncryption, head.StorageClass)
	if err := p.stop(t); err != nil {
		t.Fatalf("walship run: %v", err)
	}

	want, err := os.ReadFile(filepath.Join(st.pg.WALDir(), name))
	if err != nil {
		t.Fatal(err)
	}
	t.Run("fetch with AWS_CA_BUNDLE", func(t *testing.T) {
		out := filepath.Join(t.TempDir(), "seg")
		if o, err := runWalship(t, append(st.env(), "AWS_CA_BUNDLE="+ca.CAPath), append([]string{"fetch", name, out}, dest...)...); err != nil {
			t.Fatalf("fetch: %v\n%s", err, o)
		}
		got, err := os.ReadFile(out)
		if err != nil || !bytes.Equal(got, want) {
			t.Fatalf("fetched %s differs from pg_wal's (%d vs %d bytes, %v)", name, len(got), len(want), err)
		}
	})
	t.Run("fetch without the bundle", func(t *testing.T) {
		out := filepath.Join(t.TempDir(), "seg")
		o := failsWith(t, st.env(), append([]string{"fetch", name, out}, dest...), "AWS_CA_BUNDLE")
		logLast(t, o)
		_, err := runWalship(t, st.env(), append([]string{"fetch", name, out}, dest...)...)
		if ee, ok := err.(*exec.ExitError); !ok || ee.ExitCode() != 255 {
			t.Errorf("fetch without the CA: %v, want exit status 255 (abort recovery, never 'not found')", err)
		}
	})
}
