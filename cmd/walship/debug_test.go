package main

import (
	"context"
	"io"
	"log/slog"
	"net"
	"net/http"
	"runtime/debug"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/walship/walship/internal/health"
)

func get(t *testing.T, url string) (int, string) {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

// The metrics listener, which Prometheus reaches over the network, serves
// no profiles; --debug-addr does, and is off by default.
func TestDebugEndpointsOnlyOnDebugAddr(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	log := slog.New(slog.DiscardHandler)
	mln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	dln, err := listenDebug("127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go serveMetrics(ctx, mln, prometheus.NewRegistry(), func() error { return nil }, log)()
	go serveDebug(ctx, dln, log)()
	for _, path := range []string{"/debug/pprof/", "/debug/pprof/cmdline", "/debug/pprof/goroutine?debug=1"} {
		if code, _ := get(t, "http://"+mln.Addr().String()+path); code != http.StatusNotFound {
			t.Errorf("metrics listener answers %s with %d, want 404", path, code)
		}
	}
	if code, body := get(t, "http://"+dln.Addr().String()+"/debug/pprof/goroutine?debug=1"); code != 200 || !strings.Contains(body, "goroutine profile") {
		t.Errorf("debug listener: %d %.100q", code, body)
	}
	if code, _ := get(t, "http://"+mln.Addr().String()+"/readyz"); code != 200 {
		t.Errorf("/readyz %d", code)
	}

	c := &config{}
	fs := newFlagSet("run", c, runGroups)
	if _, err := parse(fs, nil); err != nil {
		t.Fatal(err)
	}
	if c.DebugAddr != "" {
		t.Errorf("--debug-addr defaults to %q, want off", c.DebugAddr)
	}
	if ln, err := listenDebug(""); ln != nil || err != nil {
		t.Errorf("listenDebug(\"\") = %v, %v: want nothing", ln, err)
	}
	if _, err := listenDebug(dln.Addr().String()); err == nil || !strings.Contains(err.Error(), "--debug-addr") || !strings.Contains(err.Error(), "in use") {
		t.Errorf("a second listener on the same address: %v", err)
	}
}

// readiness joins every reason a process is not ready.
func TestReadiness(t *testing.T) {
	deps := health.NewSet(prometheus.NewRegistry())
	nats := deps.Add("nats")
	recvDown := func() error { return errString("not streaming from PostgreSQL") }
	archDown := func() error { return errString("not consuming segment events yet") }
	up := func() error { return nil }
	nats.Report(nil)
	if err := readiness(deps, up, up)(); err != nil {
		t.Errorf("all up: %v", err)
	}
	if err := readiness(deps, nil, nil)(); err != nil {
		t.Errorf("no parts: %v", err)
	}
	err := readiness(deps, recvDown, archDown)()
	if err == nil || !strings.Contains(err.Error(), "not streaming") || !strings.Contains(err.Error(), "not consuming") {
		t.Errorf("receiver and archivers down: %v", err)
	}
	nats.Report(errString("connection refused"))
	if err := readiness(deps, up, up)(); err == nil || !strings.Contains(err.Error(), "nats unavailable") {
		t.Errorf("nats down: %v", err)
	}
}

// versionText names walship's version, Go's, and the protocol libraries'.
func TestVersionText(t *testing.T) {
	bi := &debug.BuildInfo{GoVersion: "go1.99.1", Main: debug.Module{Path: "github.com/walship/walship", Version: "v0.0.0-20990101000000-abcdef123456"},
		Deps: []*debug.Module{
			{Path: "github.com/jackc/pglogrepl", Version: "v0.0.0-20251213150135-2e8d0df862c1"},
			{Path: "github.com/nats-io/nats.go", Version: "v1.2.3", Replace: &debug.Module{Path: "github.com/nats-io/nats.go", Version: "v1.2.4"}},
		}}
	got := versionText("v1.0.0", bi)
	for _, want := range []string{"walship v1.0.0\n", "go go1.99.1\n", "github.com/jackc/pglogrepl v0.0.0-20251213150135-2e8d0df862c1\n", "github.com/nats-io/nats.go v1.2.4\n", "github.com/jackc/pgx/v5 unknown\n"} {
		if !strings.Contains(got, want) {
			t.Errorf("version output lacks %q:\n%s", want, got)
		}
	}
	if got := versionText("dev", bi); !strings.HasPrefix(got, "walship v0.0.0-20990101000000-abcdef123456\n") {
		t.Errorf("without -ldflags, the module version go install stamps: %s", got)
	}
	if got := versionText("dev", nil); !strings.HasPrefix(got, "walship dev\ngo go") {
		t.Errorf("without build information: %s", got)
	}
}

type errString string

func (e errString) Error() string { return string(e) }
