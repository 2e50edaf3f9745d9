package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/walship/walship/internal/health"
	"github.com/walship/walship/pipeline"
	"github.com/walship/walship/pipeline/bus"
	s3sink "github.com/walship/walship/sinks/s3"
)

// How a process keeps checking NATS and the bucket: while up, every
// checkEvery; while down, with back-off from a second to checkMax.
const (
	checkEvery   = 15 * time.Second
	checkMax     = 15 * time.Second
	checkTimeout = 10 * time.Second
	recordEvery  = 5 * time.Second
)

// watcher keeps one dependency's state current until ctx is done; it
// returns an error only for a misconfiguration found when the dependency
// first answers.
type watcher func(ctx context.Context) error

// listenMetrics opens --metrics-addr before anything else, so that a second
// process given the same address fails at once, saying what to do.
func listenMetrics(addr string) (net.Listener, error) {
	return listenFlag("metrics-addr", addr, "give each process its own --metrics-addr (WALSHIP_METRICS_ADDR), or an empty one to serve no metrics")
}

// listenFlag opens the address given to --name (nil when empty); an address
// in use is one line ending in fix.
func listenFlag(name, addr, fix string) (net.Listener, error) {
	if addr == "" {
		return nil, nil
	}
	ln, err := net.Listen("tcp", addr)
	if errors.Is(err, syscall.EADDRINUSE) {
		return nil, fmt.Errorf("--%s %s is in use (another walship on this host?): %s", name, addr, fix)
	}
	if err != nil {
		return nil, fmt.Errorf("--%s %s: %v", name, addr, err)
	}
	return ln, nil
}

// spoolUsed reports whether a receiver has run with this spool before: the
// server's spool directory exists (any server's, without --server, whose
// name comes from PostgreSQL). Such a receiver waits for an unreachable
// NATS; on a first start, an unreachable NATS is taken for a mistake.
func spoolUsed(c *config) bool {
	spool := c.SpoolDir
	if spool == "" {
		spool = filepath.Join(c.DataDir, "spool")
	}
	if c.Server != "" {
		fi, err := os.Stat(filepath.Join(spool, c.Server))
		return err == nil && fi.IsDir()
	}
	entries, _ := os.ReadDir(spool)
	for _, e := range entries {
		if e.IsDir() && !strings.HasPrefix(e.Name(), ".") {
			return true
		}
	}
	return false
}

// connectBus connects to NATS and creates walship's resources. With wait,
// a NATS that is only unavailable does not stop the process: the bus
// connects in the background, the "nats" dependency says why it is not
// ready, and the returned watcher retries until it is. A misconfiguration
// is always an error.
func connectBus(ctx context.Context, c *config, url string, log *slog.Logger, deps *health.Set, wait bool) (*bus.Bus, watcher, error) {
	opts := bus.DefaultOptions()
	opts.Replicas = c.NATSReplicas
	if c.AckWait > 0 {
		opts.AckWait = c.AckWait
	}
	extra, err := c.NATSSec.clientOptions(url)
	if err != nil {
		return nil, nil, err
	}
	dep := deps.Add("nats")
	cctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	var b *bus.Bus
	if wait {
		if b, err = bus.Open(url, opts, log, extra...); err != nil {
			return nil, nil, err
		}
		err = b.Setup(cctx)
		if err != nil && !bus.Unavailable(err) {
			b.Close()
			return nil, nil, err
		}
	} else if b, err = bus.Connect(cctx, url, opts, log, extra...); err != nil {
		return nil, nil, err
	}
	dep.Report(err)
	if err != nil {
		log.Warn("NATS is unavailable; starting anyway, not ready until it answers", "error", err)
	}
	confirmed := err == nil
	p := health.Policy{Unavailable: bus.Unavailable, Every: checkEvery, Min: time.Second, Max: checkMax,
		Timeout: checkTimeout, Wake: b.ConnChanged(), Log: log}
	return b, func(ctx context.Context) error { return health.Watch(ctx, dep, p, confirmed, b.Setup) }, nil
}

// watchBucket checks an S3 destination at start-up: the bucket exists and
// the store honours If-None-Match (a store that ignores it would let an
// archive be overwritten). A misconfiguration is an error; an unavailable
// store is not: the archivers start (their uploads fail and are retried
// like in any outage), the "s3" dependency says why the process is not
// ready, and the returned watcher finishes the start-up checks when the
// store answers, then keeps checking the bucket.
func watchBucket(ctx context.Context, s *s3sink.Sink, prefix string, log *slog.Logger, deps *health.Set) (watcher, error) {
	dep := deps.Add("s3")
	started := false
	check := func(ctx context.Context) error {
		if err := s.CheckBucket(ctx); err != nil {
			return err
		}
		if started {
			return nil
		}
		host, _ := os.Hostname()
		key := path.Join(prefix, fmt.Sprintf(".walship-probe-%s-%d", host, os.Getpid()))
		err := s.ProbeConditionalWrites(ctx, key)
		if err != nil && !errors.Is(err, s3sink.ErrNoConditionalWrites) && !s3sink.Unavailable(err) {
			return fmt.Errorf("cannot write to the destination: %w: grant s3:PutObject and s3:DeleteObject on the prefix", err)
		}
		if err == nil {
			started = true
		}
		return err
	}
	cctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	err := check(cctx)
	cancel()
	if err != nil && !s3sink.Unavailable(err) {
		return nil, err
	}
	dep.Report(err)
	if err != nil {
		log.Warn("the bucket is unavailable; starting anyway, not ready until it answers (uploads are retried)", "error", err)
	}
	confirmed := err == nil
	p := health.Policy{Unavailable: s3sink.Unavailable, Every: checkEvery, Min: time.Second, Max: checkMax, Timeout: checkTimeout, Log: log}
	return func(ctx context.Context) error { return health.Watch(ctx, dep, p, confirmed, check) }, nil
}

// recordProcess writes this process's state where `walship status` reads
// it, every recordEvery until ctx is done, and removes it then.
func recordProcess(ctx context.Context, role string, b *bus.Bus, ready func() error, deps *health.Set, log *slog.Logger) error {
	host, _ := os.Hostname()
	key := processKey(role, host, os.Getpid())
	t := time.NewTicker(recordEvery)
	defer t.Stop()
	for {
		st := pipeline.ProcessState{V: 1, Role: role, Host: host, PID: os.Getpid(), Version: version,
			Ready: true, Dependencies: deps.States(), Updated: time.Now().UTC()}
		if err := ready(); err != nil {
			st.Ready, st.NotReady = false, err.Error()
		}
		data, _ := json.Marshal(st)
		pctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		if err := b.PutProcess(pctx, key, data); err != nil && ctx.Err() == nil {
			log.Debug("cannot record the process state", "error", err)
		}
		cancel()
		select {
		case <-ctx.Done():
			dctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 2*time.Second)
			b.DeleteProcess(dctx, key)
			cancel()
			return nil
		case <-t.C:
		}
	}
}

// processKey is a key-value key for a process: role.host.pid, with any
// character a key may not hold replaced.
func processKey(role, host string, pid int) string {
	clean := strings.Map(func(r rune) rune {
		switch {
		case r >= 'a' && r <= 'z', r >= 'A' && r <= 'Z', r >= '0' && r <= '9', r == '-', r == '_':
			return r
		}
		return '_'
	}, host)
	if clean == "" {
		clean = "unknown"
	}
	return fmt.Sprintf("%s.%s.%d", role, clean, pid)
}
