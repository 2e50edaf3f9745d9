package e2e

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
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

// fetchRun runs walship fetch with a hard limit and returns its exit
// status (-1 when killed at the limit), output and duration.
func fetchRun(t *testing.T, env []string, limit time.Duration, args ...string) (int, string, time.Duration) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), limit)
	defer cancel()
	cmd := exec.CommandContext(ctx, walshipBin, append([]string{"fetch"}, args...)...)
	cmd.Env = append(os.Environ(), env...)
	began := time.Now()
	out, err := cmd.CombinedOutput()
	took := time.Since(began)
	var ee *exec.ExitError
	switch {
	case err == nil:
		return 0, string(out), took
	case ctx.Err() != nil:
		return -1, string(out), took
	case errors.As(err, &ee):
		return ee.ExitCode(), string(out), took
	}
	t.Fatalf("fetch: %v", err)
	return 0, "", 0
}

// putObject replaces an object in the bucket with raw (compressed by its
// key's extension) and the given metadata, as a faulty archiver or a
// damaged store would leave it.
func (st *stack) putObject(key string, raw []byte, meta map[string]string) {
	st.t.Helper()
	codec, ok := compress.CodecForExt(filepath.Ext(key))
	if !ok {
		codec = compress.None
	}
	enc, err := compress.NewEncoder(codec, 0)
	if err != nil {
		st.t.Fatal(err)
	}
	body, err := enc.Encode(raw)
	if err != nil {
		st.t.Fatal(err)
	}
	ctx := context.Background()
	c := st.s3.Client()
	c.DeleteObject(ctx, &s3.DeleteObjectInput{Bucket: aws.String(st.s3.Bucket), Key: aws.String(key)})
	if _, err := c.PutObject(ctx, &s3.PutObjectInput{Bucket: aws.String(st.s3.Bucket), Key: aws.String(key),
		Body: bytes.NewReader(body), Metadata: meta}); err != nil {
		st.t.Fatal(err)
	}
}

func cloneMeta(m map[string]string, kv ...string) map[string]string {
	out := map[string]string{}
	for k, v := range m {
		out[k] = v
	}
	for i := 0; i+1 < len(kv); i += 2 {
		out[kv[i]] = kv[i+1]
	}
	return out
}

// (c) Whatever is wrong — corrupt metadata, a truncated segment, an
// endpoint that accepts connections and never answers, SIGQUIT — fetch
// ends with an abort (above 125) within --retry-for plus a few seconds;
// a GET that finds nothing after the HEAD found the object is retried.
func TestFetchAbortsWithinRetryFor(t *testing.T) {
	st := newStack(t)
	w := startWalship(t, st.env(), st.args("run", "--create-slot")...)
	waitFor(t, 30*time.Second, "streaming", func() bool { return st.walsenderPID() != "" })
	// One large insert: the segments inside it are whole, not switched.
	st.pg.Exec(`CREATE TABLE bulk (id int, payload text)`)
	from := st.currentLSN()
	st.pg.Exec(`INSERT INTO bulk SELECT g, repeat(md5(g::text), 4) FROM generate_series(1, 40000) g`)
	to := st.currentLSN()
	end := st.switchWAL()
	waitFor(t, 60*time.Second, "archiving", func() bool { return st.replFlush() >= end })
	if err := w.stop(t); err != nil {
		t.Fatal(err)
	}
	have := st.archivedSegments()
	whole := pipeline.SegmentOf(1, from, segSize).No + 1
	if pipeline.SegmentOf(1, to, segSize).No < whole+4 {
		t.Fatalf("the insert filled too few segments (%s to %s)", from, to)
	}
	dest := filepath.Join(t.TempDir(), "RECOVERYXLOG")
	flags := func(extra ...string) []string {
		return append([]string{"--dest", "s3://" + st.s3.Bucket + "/" + st.prefix, "--s3-endpoint", st.s3.Endpoint(), "--s3-path-style",
			"--server", st.server, "--prefetch", "0", "--retry-for", "5s"}, extra...)
	}
	fetch := func(no uint64, extra ...string) (int, string, time.Duration) {
		return fetchRun(t, st.env(), 40*time.Second, append([]string{pipeline.Segment{Timeline: 1, No: no}.Name(segSize), dest}, flags(extra...)...)...)
	}
	if code, out, _ := fetch(whole); code != 0 {
		t.Fatalf("fetch of an intact segment: exit %d\n%s", code, out)
	}

	t.Run("CorruptMetadata", func(t *testing.T) {
		for i, c := range []struct{ key, value, says string }{
			{"walship-raw-size", "-1", "walship-raw-size -1"},
			{"walship-raw-size", "1099511627776", "walship-raw-size 1099511627776"},
			{"walship-system-id", "42", "walship-system-id 42"},
			{"walship-start-lsn", "0/0", "walship-start-lsn"},
			{"walship-end-lsn", "0/1", "walship-end-lsn"},
		} {
			no := whole + 1 + uint64(i%2)
			key := have[no]
			raw, meta := st.object(key)
			st.putObject(key, raw, cloneMeta(meta, c.key, c.value))
			code, out, took := fetch(no)
			st.putObject(key, raw, meta)
			if code <= 125 || took > 8*time.Second || !strings.Contains(out, c.says) {
				t.Errorf("%s = %s: exit %d after %s, want an abort within --retry-for 5s naming %q\n%s", c.key, c.value, code, took.Round(time.Millisecond), c.says, out)
			}
		}
	})

	t.Run("TruncatedSegment", func(t *testing.T) {
		// A whole segment whose second half is zero pages, stored with
		// metadata that matches those bytes: every page header present is
		// valid, only the record chain shows the WAL stops early.
		no := whole + 2
		key := have[no]
		raw, meta := st.object(key)
		cut := bytes.Clone(raw)
		clear(cut[len(cut)/2:])
		sum := sha256.Sum256(cut)
		st.putObject(key, cut, cloneMeta(meta, "walship-sha256", hex.EncodeToString(sum[:])))
		defer st.putObject(key, raw, meta)
		code, out, _ := fetch(no)
		if code <= 125 || !strings.Contains(out, "without a WAL switch") {
			t.Errorf("fetch of a truncated segment: exit %d\n%s", code, out)
		}
		out, err := runWalship(t, st.env(), "verify", "--deep", "--dest", "s3://"+st.s3.Bucket+"/"+st.prefix,
			"--s3-endpoint", st.s3.Endpoint(), "--s3-path-style", "--server", st.server)
		if err == nil || !strings.Contains(out, key) || !strings.Contains(out, "without a WAL switch") {
			t.Errorf("verify --deep did not name the truncated %s (%v):\n%s", key, err, out)
		}
	})

	t.Run("EndpointNeverAnswers", func(t *testing.T) {
		hole := testenv.BlackHole(t)
		code, out, took := fetchRun(t, st.env(), 40*time.Second, pipeline.Segment{Timeline: 1, No: whole}.Name(segSize), dest,
			"--dest", "s3://"+st.s3.Bucket+"/"+st.prefix, "--s3-endpoint", hole, "--s3-path-style", "--server", st.server, "--retry-for", "3s")
		if code <= 125 || took > 8*time.Second {
			t.Errorf("fetch against an endpoint that never answers: exit %d after %s, want an abort within --retry-for 3s\n%s", code, took.Round(time.Millisecond), out)
		}
	})

	t.Run("SIGQUIT", func(t *testing.T) {
		cmd := exec.Command(walshipBin, "fetch", pipeline.Segment{Timeline: 1, No: whole}.Name(segSize), dest,
			"--dest", "s3://"+st.s3.Bucket+"/"+st.prefix, "--s3-endpoint", testenv.BlackHole(t), "--s3-path-style", "--server", st.server)
		cmd.Env = append(os.Environ(), st.env()...)
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		time.Sleep(time.Second)
		cmd.Process.Signal(syscall.SIGQUIT)
		err := cmd.Wait()
		var ee *exec.ExitError
		if !errors.As(err, &ee) || ee.ExitCode() != 255 {
			t.Errorf("fetch after SIGQUIT: %v, want exit status 255", err)
		}
	})

	t.Run("GetAfterHeadFindsNothing", func(t *testing.T) {
		proxy := testenv.StartFaultyS3(t, st.s3)
		name := pipeline.Segment{Timeline: 1, No: whole + 3}.Name(segSize)
		proxy.VanishMatch = name
		proxy.VanishGets.Store(1)
		os.Remove(dest)
		code, out, _ := fetchRun(t, st.env(), 40*time.Second, name, dest,
			"--dest", "s3://"+st.s3.Bucket+"/"+st.prefix, "--s3-endpoint", proxy.Endpoint(), "--s3-path-style",
			"--server", st.server, "--prefetch", "0", "--retry-for", "20s")
		if code != 0 {
			t.Fatalf("fetch after a GET found nothing: exit %d, want the GET retried and the file served\n%s", code, out)
		}
		got, _ := os.ReadFile(dest)
		want, _ := os.ReadFile(filepath.Join(st.pg.WALDir(), name))
		if !bytes.Equal(got, want) || proxy.VanishGets.Load() != 0 {
			t.Errorf("served %d bytes, pg_wal has %d (vanished GETs left: %d)", len(got), len(want), proxy.VanishGets.Load())
		}
		if !strings.Contains(out, "retrying") {
			t.Errorf("fetch did not say it retried:\n%s", out)
		}
	})
}
