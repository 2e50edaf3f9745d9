package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/http/pprof"
	"syscall"
	"time"
)

// registerDebugFlags adds --debug-addr to the long-running commands (run,
// receive, archive: the ones with NATS flags).
func registerDebugFlags(fs *flag.FlagSet, c *config, groups flagGroup) {
	if groups&gNATS != 0 && groups&gCommon != 0 {
		fs.StringVar(&c.DebugAddr, "debug-addr", "", "address serving the Go profiler at /debug/pprof/ (empty: off; it shows the command line, keep it on loopback)")
	}
}

// listenDebug opens --debug-addr (nil when empty).
func listenDebug(addr string) (net.Listener, error) {
	if addr == "" {
		return nil, nil
	}
	ln, err := net.Listen("tcp", addr)
	if errors.Is(err, syscall.EADDRINUSE) {
		return nil, fmt.Errorf("--debug-addr %s is in use (another walship on this host?): give each process its own, or leave it empty", addr)
	}
	if err != nil {
		return nil, fmt.Errorf("--debug-addr %s: %v", addr, err)
	}
	return ln, nil
}

// serveDebug serves the Go profiler on ln (nil: nothing) until ctx is
// done. It is apart from the metrics listener, which Prometheus scrapes
// over the network: profiles are for the host's operator only, and off
// unless asked for. /debug/pprof/cmdline is not served: it would show the
// command line, and a password on it.
func serveDebug(ctx context.Context, ln net.Listener, log *slog.Logger) func() error {
	if ln == nil {
		return func() error { <-ctx.Done(); return nil }
	}
	mux := http.NewServeMux()
	mux.HandleFunc("/debug/pprof/", pprof.Index)
	mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
	mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
	mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	log.Info("serving debug endpoints", "addr", ln.Addr().String())
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
