package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"runtime/debug"
	"strings"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"golang.org/x/sync/errgroup"

	"github.com/walship/walship/compress"
	"github.com/walship/walship/internal/health"
	"github.com/walship/walship/pipeline/archiver"
	"github.com/walship/walship/pipeline/bus"
	"github.com/walship/walship/pipeline/receiver"
	"github.com/walship/walship/sinks"
	filesink "github.com/walship/walship/sinks/file"
	s3sink "github.com/walship/walship/sinks/s3"
)

const (
	runGroups     = gPG | gReceive | gNATS | gEmbedded | gSink | gArchive | gCommon
	receiveGroups = gPG | gReceive | gNATS | gCommon
	archiveGroups = gNATS | gSink | gArchive | gCommon
)

// setup parses flags for a command and builds its logger and registry.
func setup(name string, args []string, groups flagGroup, stdout io.Writer) (*config, *slog.Logger, *prometheus.Registry, error) {
	c := &config{}
	fs := newFlagSet(name, c, groups)
	rest, err := parse(fs, args)
	if errors.Is(err, flag.ErrHelp) {
		fmt.Fprintf(stdout, "Usage: walship %s [flags]\n\n%s", name, usageOf(fs))
		return nil, nil, nil, err
	}
	if err != nil {
		return nil, nil, nil, err
	}
	if len(rest) > 0 {
		return nil, nil, nil, fmt.Errorf("%w: unexpected argument %q", errUsage, rest[0])
	}
	if err := c.validate(groups); err != nil {
		return nil, nil, nil, err
	}
	log, reg, err := newLogging(c)
	return c, log, reg, err
}

// newLogging builds the logger and the metrics registry of a process.
func newLogging(c *config) (*slog.Logger, *prometheus.Registry, error) {
	var level slog.Level
	if err := level.UnmarshalText([]byte(c.LogLevel)); err != nil {
		return nil, nil, fmt.Errorf("%w: --log-level %q: use debug, info, warn or error", errUsage, c.LogLevel)
	}
	opts := &slog.HandlerOptions{Level: level}
	var h slog.Handler = slog.NewTextHandler(os.Stderr, opts)
	if c.LogFormat == "json" {
		h = slog.NewJSONHandler(os.Stderr, opts)
	}
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return slog.New(h), reg, nil
}

// openSink parses --dest and opens the sink, checking that it is reachable.
func openSink(ctx context.Context, c *config) (sinks.Sink, string, error) {
	return openSinkChecked(ctx, c, true)
}

// openSinkChecked opens the sink; with check, it also confirms the bucket
// exists (fetch defers that to its retry loop).
func openSinkChecked(ctx context.Context, c *config, check bool) (sinks.Sink, string, error) {
	u, err := url.Parse(c.Dest)
	if err != nil || u.Scheme == "" || u.Opaque != "" {
		return nil, "", fmt.Errorf("%w: malformed --dest %q: use s3://bucket/prefix or file:///absolute/path", errUsage, c.Dest)
	}
	switch u.Scheme {
	case "file":
		if u.Host != "" && u.Host != "localhost" || u.Path == "" {
			return nil, "", fmt.Errorf("%w: malformed --dest %q: use file:///absolute/path (three slashes)", errUsage, c.Dest)
		}
		s, err := filesink.New(u.Path)
		return s, "", err
	case "s3":
		if u.Host == "" {
			return nil, "", fmt.Errorf("%w: malformed --dest %q: use s3://bucket/prefix", errUsage, c.Dest)
		}
		if err := c.S3Sec.validate(); err != nil {
			return nil, "", err
		}
		s, err := s3sink.New(ctx, s3sink.Options{Bucket: u.Host, Endpoint: c.S3Endpoint, Region: c.S3Region, PathStyle: c.S3PathStyle, SignPayload: c.S3SignPayload,
			Timeout: c.S3Timeout, NoConditionalWrites: c.S3NoCondWrites,
			CABundle: c.S3Sec.CABundle, SSE: c.S3Sec.SSE, SSEKMSKeyID: c.S3Sec.SSEKMSKeyID, StorageClass: c.S3Sec.StorageClass})
		if err != nil {
			return nil, "", err
		}
		if check {
			cctx, cancel := context.WithTimeout(ctx, 30*time.Second)
			defer cancel()
			if err := s.CheckBucket(cctx); err != nil {
				return nil, "", err
			}
		}
		return s, strings.Trim(u.Path, "/"), nil
	}
	return nil, "", fmt.Errorf("%w: malformed --dest %q: scheme %q; use s3://bucket/prefix or file:///absolute/path", errUsage, c.Dest, u.Scheme)
}

func newArchiver(ctx context.Context, c *config, b archiver.Bus, log *slog.Logger, reg prometheus.Registerer, deps *health.Set, readSpool bool) (*archiver.Archiver, watcher, error) {
	// Each worker holds a raw segment and its compressed copy; collecting
	// garbage at 50% growth instead of 100% keeps the archiver's RSS near
	// what it really uses (measured: 150 MB -> 110 MB with two workers on
	// 16 MB segments) for a negligible CPU cost. GOGC still overrides it.
	if os.Getenv("GOGC") == "" {
		debug.SetGCPercent(50)
	}
	codec, err := compress.ParseCodec(c.Compression)
	if err != nil {
		return nil, nil, fmt.Errorf("%w: --%v", errUsage, err)
	}
	if _, err := sinks.NewLayout(c.Layout, "", "x"); err != nil {
		return nil, nil, fmt.Errorf("%w: --%v", errUsage, err)
	}
	recipients, err := c.recipients()
	if err != nil {
		return nil, nil, err
	}
	if len(recipients) > 0 {
		log.Info("archived WAL is encrypted after compression (age)", "recipients", len(recipients))
	}
	sink, prefix, err := openSinkChecked(ctx, c, false)
	if err != nil {
		return nil, nil, err
	}
	var watch watcher
	if s, ok := sink.(*s3sink.Sink); ok {
		if watch, err = watchBucket(ctx, s, prefix, log, deps); err != nil {
			return nil, nil, err
		}
	}
	layout := func(server string) sinks.Layout {
		l, _ := sinks.NewLayout(c.Layout, prefix, server)
		return l
	}
	dest, err := sinks.DestID(c.Dest, c.S3Endpoint)
	if err != nil {
		return nil, nil, fmt.Errorf("%w: --dest: %v", errUsage, err)
	}
	fetch, err := stageFetcher(c, c.Workers) // stage.go
	if err != nil {
		return nil, nil, err
	}
	a, err := archiver.New(archiver.Config{
		Workers: c.Workers, Codec: codec, Level: c.Level, Layout: layout, Dest: dest, ReadSpool: readSpool, ConflictRetry: c.ConflictRetry, Recipients: recipients, Fetch: fetch,
		Log: log, Metrics: archiver.NewMetrics(reg),
	}, b, sink)
	if err != nil {
		return nil, nil, fmt.Errorf("%w: %v", errUsage, err)
	}
	return a, watch, nil
}

// newReceiver builds a server's receiver; m is shared by every receiver
// of the process (its series carry the server label).
func newReceiver(c *config, b *bus.Bus, log *slog.Logger, m *receiver.Metrics, stage stagePlan) (*receiver.Receiver, error) {
	spool := c.SpoolDir
	if spool == "" {
		spool = filepath.Join(c.DataDir, "spool")
	}
	var dest string
	if c.Dest != "" {
		var err error
		if dest, err = sinks.DestID(c.Dest, c.S3Endpoint); err != nil {
			return nil, fmt.Errorf("%w: --dest: %v", errUsage, err)
		}
	}
	return receiver.New(receiver.Config{
		ConnString: c.PG, AppName: c.AppName, Slot: c.Slot, CreateSlot: c.CreateSlot, Server: c.Server,
		SpoolDir: spool, StatusInterval: c.StatusInterval, RepublishAfter: c.RepublishAfter,
		StageObjects: stage.objects, StageURL: stage.url, Stage: stage.hold(), Dest: dest, Standby: c.Standby, Synchronous: c.Synchronous, SafeWALWarn: c.SafeWALWarn,
		PartialInterval: c.PartialInt, Log: log, Metrics: m,
	}, b, b), nil
}

// source feeds the archivers from the bus.
func source(b *bus.Bus) archiver.Source {
	return archiver.SourceFunc(func(ctx context.Context) (archiver.Delivery, error) {
		d, err := b.Next(ctx, 5*time.Second)
		if d == nil {
			return nil, err
		}
		return d, err
	})
}

// startEmbeddedNATS runs a JetStream server in this process, storing under
// the data directory.
func startEmbeddedNATS(c *config, log *slog.Logger) (*server.Server, string, error) {
	host, port, err := net.SplitHostPort(c.NATSListen)
	if err != nil {
		return nil, "", fmt.Errorf("%w: --embedded-nats-listen %q: %v", errUsage, c.NATSListen, err)
	}
	var p int
	if _, err := fmt.Sscan(port, &p); err != nil {
		return nil, "", fmt.Errorf("%w: --embedded-nats-listen %q: bad port", errUsage, c.NATSListen)
	}
	opts := &server.Options{
		ServerName: "walship-embedded", Host: host, Port: p, JetStream: true,
		StoreDir: filepath.Join(c.DataDir, "nats"), NoSigs: true, MaxPayload: 8 << 20,
	}
	if err := c.NATSSec.embeddedServerOptions(opts, log); err != nil {
		return nil, "", err
	}
	ns, err := server.NewServer(opts)
	if err != nil {
		return nil, "", fmt.Errorf("embedded nats: %w", err)
	}
	go ns.Start()
	if !ns.ReadyForConnections(15 * time.Second) {
		ns.Shutdown()
		return nil, "", fmt.Errorf("embedded nats did not start on %s: is the port in use? set --embedded-nats-listen", c.NATSListen)
	}
	log.Info("embedded nats started", "url", ns.ClientURL(), "store", filepath.Join(c.DataDir, "nats"))
	return ns, ns.ClientURL(), nil
}

// serveMetrics serves /metrics, /healthz and /readyz on ln (nil: nothing)
// until ctx is done.
func serveMetrics(ctx context.Context, ln net.Listener, reg *prometheus.Registry, ready func() error, log *slog.Logger) func() error {
	if ln == nil {
		return func() error { <-ctx.Done(); return nil }
	}
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{Registry: reg}))
	// Profiles are not served here: see --debug-addr (debug.go).
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) { io.WriteString(w, "ok\n") })
	mux.HandleFunc("/readyz", func(w http.ResponseWriter, _ *http.Request) {
		if err := ready(); err != nil {
			http.Error(w, "not ready: "+err.Error(), http.StatusServiceUnavailable)
			return
		}
		io.WriteString(w, "ok\n")
	})
	log.Info("serving metrics", "addr", ln.Addr().String())
	return serveHTTP(ctx, ln, mux)
}

// serveHTTP serves h on ln until ctx is done, then shuts down within 2s.
func serveHTTP(ctx context.Context, ln net.Listener, h http.Handler) func() error {
	srv := &http.Server{Handler: h, ReadHeaderTimeout: 5 * time.Second}
	return func() error {
		go func() {
			<-ctx.Done()
			sctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
			defer cancel()
			srv.Shutdown(sctx)
		}()
		if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			return err
		}
		return nil
	}
}

func cmdRun(ctx context.Context, args []string, stdout io.Writer) error {
	c, servers, log, reg, err := setupServers("run", args, runGroups, stdout)
	if err != nil {
		return err
	}
	if c.Dest == "" {
		c.Dest = "file://" + filepath.Join(absPath(c.DataDir), "archive")
		for _, s := range servers {
			s.Dest = c.Dest
		}
	}
	if err := os.MkdirAll(c.DataDir, 0o750); err != nil {
		return fmt.Errorf("--data-dir: %v", err)
	}
	ln, err := listenMetrics(c.MetricsAddr)
	if err != nil {
		return err
	}
	defer closeListener(ln)
	deps := health.NewSet(reg)
	natsURL := c.NATS
	stage := true
	if natsURL == "" {
		ns, u, err := startEmbeddedNATS(c, log)
		if err != nil {
			return err
		}
		defer func() { ns.Shutdown(); ns.WaitForShutdown() }()
		natsURL = u
		stage = false // only this process's archivers exist; they read the spool
	}
	// An external NATS that is unreachable is waited for when the receiver
	// has run before; on a first start it is taken for a mistake.
	b, watchNATS, err := connectBus(ctx, c, natsURL, log, deps, c.NATS != "" && spoolsUsed(c, servers))
	if err != nil {
		return err
	}
	defer b.Close()
	arch, watchS3, err := newArchiver(ctx, c, b, log, reg, deps, true)
	if err != nil {
		return err
	}
	plan, serveStage, err := startStage(c, stage, log, reg) // stage.go
	if err != nil {
		return err
	}
	recv, err := receivers(c, servers, b, log, reg, plan)
	if err != nil {
		return err
	}
	watchRet, err := retentionWatcher(c, log, reg) // prune.go
	if err != nil {
		return err
	}
	return runAll(ctx, "run", c, ln, reg, log, deps, b, recv, arch, watchNATS, watchS3, watchRet, serveStage)
}

func cmdReceive(ctx context.Context, args []string, stdout io.Writer) error {
	c, servers, log, reg, err := setupServers("receive", args, receiveGroups, stdout)
	if err != nil {
		return err
	}
	if c.NATS == "" {
		return fmt.Errorf("%w: receive needs --nats (or use 'walship run' for the embedded server)", errUsage)
	}
	if c.Dest == "" {
		return fmt.Errorf("%w: receive needs --dest, the destination the archivers write to (with --s3-endpoint if they use one): only their confirmations may move the slot", errUsage)
	}
	ln, err := listenMetrics(c.MetricsAddr)
	if err != nil {
		return err
	}
	defer closeListener(ln)
	plan, serveStage, err := startStage(c, true, log, reg) // stage.go
	if err != nil {
		return err
	}
	deps := health.NewSet(reg)
	b, watchNATS, err := connectBus(ctx, c, c.NATS, log, deps, spoolsUsed(c, servers))
	if err != nil {
		return err
	}
	defer b.Close()
	recv, err := receivers(c, servers, b, log, reg, plan)
	if err != nil {
		return err
	}
	return runAll(ctx, "receive", c, ln, reg, log, deps, b, recv, nil, watchNATS, serveStage)
}

func cmdArchive(ctx context.Context, args []string, stdout io.Writer) error {
	c, log, reg, err := setup("archive", args, archiveGroups, stdout)
	if err != nil {
		return err
	}
	if c.NATS == "" {
		return fmt.Errorf("%w: archive needs --nats", errUsage)
	}
	if c.Dest == "" {
		return fmt.Errorf("%w: archive needs --dest s3://bucket/prefix or file:///path", errUsage)
	}
	ln, err := listenMetrics(c.MetricsAddr)
	if err != nil {
		return err
	}
	defer closeListener(ln)
	deps := health.NewSet(reg)
	// Archivers hold no state: they wait for an unreachable NATS.
	b, watchNATS, err := connectBus(ctx, c, c.NATS, log, deps, true)
	if err != nil {
		return err
	}
	defer b.Close()
	arch, watchS3, err := newArchiver(ctx, c, b, log, reg, deps, false)
	if err != nil {
		return err
	}
	watchRet, err := retentionWatcher(c, log, reg) // prune.go
	if err != nil {
		return err
	}
	return runAll(ctx, "archive", c, ln, reg, log, deps, b, nil, arch, watchNATS, watchS3, watchRet)
}

// runAll runs the receiver and/or archiver, the metrics server, the
// dependency watchers and the process record until ctx is done or one
// fails. A receiver that stops on its own ends the process; so does a
// watcher that finds a misconfiguration when its dependency first answers.
func runAll(ctx context.Context, role string, c *config, ln net.Listener, reg *prometheus.Registry, log *slog.Logger, deps *health.Set,
	b *bus.Bus, recv receiverPart, arch *archiver.Archiver, watchers ...watcher) error {
	dln, err := listenDebug(c.DebugAddr)
	if err != nil {
		return err
	}
	defer closeListener(dln)
	var recvReady, archReady func() error
	if recv != nil {
		recvReady = recv.Ready
	}
	if arch != nil {
		archReady = b.Consuming
	}
	ready := readiness(deps, recvReady, archReady)
	g, gctx := errgroup.WithContext(ctx)
	// The archivers keep running while the receiver shuts down, so that its
	// last segments can still be confirmed; they stop when it has.
	archCtx, stopArch := context.WithCancel(context.WithoutCancel(ctx))
	g.Go(serveMetrics(gctx, ln, reg, ready, log))
	g.Go(serveDebug(gctx, dln, log))
	for _, w := range watchers {
		if w != nil {
			g.Go(func() error { return w(gctx) })
		}
	}
	g.Go(func() error { return recordProcess(gctx, role, b, ready, deps, log) })
	if arch != nil {
		g.Go(func() error {
			err := arch.Run(archCtx, source(b))
			if err != nil {
				return fmt.Errorf("archiver: %w", err)
			}
			return nil
		})
	}
	if recv != nil {
		g.Go(func() error {
			defer stopArch()
			return recv.Run(gctx)
		})
	} else {
		g.Go(func() error {
			<-gctx.Done()
			stopArch()
			return nil
		})
	}
	err = g.Wait()
	stopArch()
	if err == nil {
		log.Info("stopped")
	}
	return err
}

func closeListener(ln net.Listener) {
	if ln != nil {
		ln.Close()
	}
}

func absPath(p string) string {
	if a, err := filepath.Abs(p); err == nil {
		return a
	}
	return p
}
