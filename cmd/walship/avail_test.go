package main

import (
	"context"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/walship/walship/internal/testenv"
	"github.com/walship/walship/pipeline"
)

// Two processes given one --metrics-addr: the second fails at once, before
// it connects anywhere, saying how to run several; an empty address
// serves nothing.
func TestMetricsAddrInUse(t *testing.T) {
	addr := "127.0.0.1:" + strconv.Itoa(testenv.FreePort(t))
	first, err := listenMetrics(addr)
	if err != nil {
		t.Fatal(err)
	}
	defer first.Close()
	_, err = listenMetrics(addr)
	if err == nil || !strings.Contains(err.Error(), "--metrics-addr "+addr+" is in use") || !strings.Contains(err.Error(), "its own --metrics-addr") {
		t.Errorf("second listen: %v", err)
	}
	if ln, err := listenMetrics(""); ln != nil || err != nil {
		t.Errorf("empty --metrics-addr: %v, %v; want nothing served", ln, err)
	}
	// A whole `walship archive` fails on it before reaching for NATS (which
	// is not there: it would wait).
	err = run(context.Background(), []string{"archive", "--nats", "nats://127.0.0.1:1", "--dest", "file://" + t.TempDir(),
		"--metrics-addr", addr}, io.Discard, io.Discard)
	if err == nil || !strings.Contains(err.Error(), "is in use") {
		t.Errorf("archive with a metrics address in use: %v", err)
	}
}

func TestSpoolUsed(t *testing.T) {
	dir := t.TempDir()
	c := &config{DataDir: dir}
	if spoolUsed(c) {
		t.Error("a fresh data directory taken for a used spool")
	}
	os.MkdirAll(filepath.Join(dir, "spool", "db1"), 0o750)
	if !spoolUsed(c) {
		t.Error("a spool with a server directory, no --server: not taken for used")
	}
	c.Server = "db2"
	if spoolUsed(c) {
		t.Error("--server db2 with only db1's spool taken for used")
	}
	c.Server = "db1"
	if !spoolUsed(c) {
		t.Error("--server db1 with db1's spool not taken for used")
	}
	c = &config{DataDir: t.TempDir(), SpoolDir: filepath.Join(dir, "spool"), Server: "db1"}
	if !spoolUsed(c) {
		t.Error("--spool-dir ignored")
	}
}

func TestProcessKey(t *testing.T) {
	for host, want := range map[string]string{
		"db1":              "archive.db1.7",
		"db1.example.com":  "archive.db1_example_com.7",
		"":                 "archive.unknown.7",
		"host with spaces": "archive.host_with_spaces.7",
	} {
		if got := processKey("archive", host, 7); got != want {
			t.Errorf("processKey(%q) = %q, want %q", host, got, want)
		}
	}
}

func TestPrintProcesses(t *testing.T) {
	now := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	ps := []pipeline.ProcessState{
		{Role: "run", Host: "b", PID: 2, Ready: true, Updated: now.Add(-2 * time.Second),
			Dependencies: []pipeline.DependencyState{{Name: "nats", Up: true}, {Name: "s3", Up: true}}},
		{Role: "archive", Host: "a", PID: 1, Ready: false, Updated: now.Add(-time.Second),
			Dependencies: []pipeline.DependencyState{{Name: "nats", Up: true}, {Name: "s3", Error: "connection refused", Since: now.Add(-40 * time.Second)}}},
		{Role: "archive", Host: "c", PID: 3, Ready: true, Updated: now.Add(-5 * time.Minute)},
	}
	var b strings.Builder
	if err := printProcesses(&b, ps, now, false); err != nil {
		t.Fatal(err)
	}
	want := `processes:
  archive on a (pid 1): NOT READY
    nats: up
    s3: UNAVAILABLE for 40s: connection refused
  archive on c (pid 3): stale (record 300s old: stopped, or cannot reach NATS)
  run on b (pid 2): ready
    nats: up
    s3: up
`
	if b.String() != want {
		t.Errorf("got:\n%s\nwant:\n%s", b.String(), want)
	}
	b.Reset()
	printProcesses(&b, nil, now, true)
	if strings.TrimSpace(b.String()) != "[]" {
		t.Errorf("no processes as JSON: %q", b.String())
	}
}
