package main

import (
	"context"
	"encoding/binary"
	"errors"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/walship/walship/internal/testenv"
	"github.com/walship/walship/sinks"
	"github.com/walship/walship/sinks/file"
)

// fetchStatus runs `walship fetch` in-process in dir (the data directory)
// and returns its exit status and message.
func fetchStatus(t *testing.T, dir string, args ...string) (int, string) {
	t.Helper()
	t.Chdir(dir)
	var msg strings.Builder
	err := run(context.Background(), append([]string{"fetch", "--prefetch", "0"}, args...), io.Discard, io.Discard)
	code := exitCode(err, &msg)
	return code, msg.String()
}

// dataDir makes a directory with a global/pg_control naming sysid.
func dataDir(t *testing.T, sysid uint64) string {
	dir := t.TempDir()
	os.MkdirAll(filepath.Join(dir, "global"), 0o700)
	os.MkdirAll(filepath.Join(dir, "pg_wal"), 0o700)
	ctl := make([]byte, 8192)
	binary.LittleEndian.PutUint64(ctl, sysid)
	if err := os.WriteFile(filepath.Join(dir, "global", "pg_control"), ctl, 0o600); err != nil {
		t.Fatal(err)
	}
	return dir
}

// fileArchive makes a file:// archive for server "db" whose identity
// names sysid (none when sysid is 0).
func fileArchive(t *testing.T, sysid string) string {
	root := t.TempDir()
	sink, err := file.New(root)
	if err != nil {
		t.Fatal(err)
	}
	if sysid != "" {
		layout := sinks.BarmanCloud{Server: "db"}
		id := sinks.Identity{SystemID: sysid, SegmentSize: 1 << 20, Server: "db"}
		if err := sink.Put(context.Background(), layout.IdentityKey(), id.Body(), sinks.Metadata{Codec: "none"}); err != nil {
			t.Fatal(err)
		}
	}
	return "file://" + root
}

const missingSeg = "000000010000000000000007"

// Exit 1 only for a file missing from an archive confirmed to be this
// cluster's; every misconfiguration that looks like an empty archive is 255.
func TestFetchExitStatus(t *testing.T) {
	mine := fileArchive(t, "1001")
	other := fileArchive(t, "2002")
	empty := fileArchive(t, "")
	unmounted := filepath.Join(t.TempDir(), "not-mounted")
	data := dataDir(t, 1001)
	outside := t.TempDir()
	for _, c := range []struct {
		name string
		dir  string
		args []string
		want int
	}{
		{"this cluster's archive", data, []string{"--dest", mine, "--server", "db"}, 1},
		{"default server name from pg_control", data, []string{"--dest", mine}, 255},
		{"wrong --server", data, []string{"--dest", mine, "--server", "db2"}, 255},
		{"wrong --layout", data, []string{"--dest", mine, "--server", "db", "--layout", "wal-g"}, 255},
		{"another cluster's archive", data, []string{"--dest", other, "--server", "db"}, 255},
		{"no identity object", data, []string{"--dest", empty, "--server", "db"}, 255},
		{"archive directory not mounted", data, []string{"--dest", "file://" + unmounted, "--server", "db"}, 255},
		{"outside a data directory, identity present", outside, []string{"--dest", mine, "--server", "db"}, 1},
		{"outside a data directory, no identity", outside, []string{"--dest", empty, "--server", "db"}, 255},
		{"help", data, []string{"-h"}, 255},
		{"no arguments", data, []string{"--dest", mine, "--server", "db"}, 255},
		{"unknown flag", data, []string{"--dset", mine}, 255},
	} {
		t.Run(c.name, func(t *testing.T) {
			args := c.args
			if !strings.Contains(c.name, "help") && !strings.Contains(c.name, "no arguments") {
				args = append([]string{missingSeg, "pg_wal/RECOVERYXLOG"}, args...)
			}
			code, msg := fetchStatus(t, c.dir, args...)
			if code != c.want {
				t.Errorf("exit %d, want %d: %s", code, c.want, msg)
			}
		})
	}
	if _, err := os.Stat(unmounted); err == nil {
		t.Error("fetch created the missing archive directory")
	}
}

// A temporary file left beside %p by a fetch that was killed is removed by
// the next call.
func TestFetchRemovesStaleTemp(t *testing.T) {
	data := dataDir(t, 1001)
	stale := filepath.Join(data, "pg_wal", ".walship-tmp-RECOVERYXLOG-123456")
	os.WriteFile(stale, make([]byte, 4096), 0o600)
	code, msg := fetchStatus(t, data, missingSeg, "pg_wal/RECOVERYXLOG", "--dest", fileArchive(t, "1001"), "--server", "db")
	if code != 1 {
		t.Fatalf("exit %d: %s", code, msg)
	}
	if _, err := os.Stat(stale); err == nil {
		t.Error("the stale temporary file is still in pg_wal")
	}
}

// `check` writes its probe twice and fails on a store that lets the second
// write through.
func TestCheckBucketConditionalWrites(t *testing.T) {
	gw := testenv.StartS3(t)
	gw.SetEnv(t)
	proxy := testenv.StartFaultyS3(t, gw)
	proxy.IgnoreIfNoneMatch.Store(true)
	ctx := context.Background()
	cfg := func(endpoint string, noCond bool) *config {
		return &config{Dest: "s3://" + gw.Bucket + "/p", S3Endpoint: endpoint, S3PathStyle: true, Layout: "barman-cloud", S3NoCondWrites: noCond}
	}
	if err := checkBucket(ctx, cfg(gw.Endpoint(), false)); err != nil {
		t.Errorf("check against versitygw: %v", err)
	}
	err := checkBucket(ctx, cfg(proxy.Endpoint(), false))
	if err == nil || !strings.Contains(err.Error(), "If-None-Match") || !strings.Contains(err.Error(), "--s3-no-conditional-writes") {
		t.Errorf("check against a store that ignores If-None-Match: %v", err)
	}
	if err := checkBucket(ctx, cfg(proxy.Endpoint(), true)); err != nil {
		t.Errorf("check with --s3-no-conditional-writes: %v", err)
	}
}

// A panic in fetch dies by SIGABRT and SIGQUIT exits 255: PostgreSQL reads
// both as "abort recovery", where the Go default (exit status 2) reads as
// "not in the archive".
func TestFetchCrashAborts(t *testing.T) {
	if mode := os.Getenv("WALSHIP_TEST_CRASH"); mode != "" {
		abortOnCrash()
		if mode == "panic" {
			panic("walship test panic")
		}
		time.Sleep(time.Minute)
		return
	}
	for _, mode := range []string{"panic", "sigquit"} {
		cmd := exec.Command(os.Args[0], "-test.run=^TestFetchCrashAborts$")
		cmd.Env = append(os.Environ(), "WALSHIP_TEST_CRASH="+mode)
		cmd.Stdout, cmd.Stderr = io.Discard, io.Discard
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		if mode == "sigquit" {
			time.Sleep(500 * time.Millisecond)
			cmd.Process.Signal(syscall.SIGQUIT)
		}
		err := cmd.Wait()
		var ee *exec.ExitError
		if !errors.As(err, &ee) {
			t.Fatalf("%s: %v", mode, err)
		}
		ws := ee.Sys().(syscall.WaitStatus)
		switch {
		case mode == "panic" && !(ws.Signaled() && ws.Signal() == syscall.SIGABRT):
			t.Errorf("a panic ended with %v, want death by SIGABRT", ws)
		case mode == "sigquit" && ws.ExitStatus() != 255:
			t.Errorf("SIGQUIT ended with %v, want exit status 255", ws)
		}
	}
}
