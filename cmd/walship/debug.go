package main

import (
	"context"
	"flag"
	"log/slog"
	"net"
	"net/http"
	"net/http/pprof"
)

// registerDebugFlags adds --debug-addr to the long-running commands (run,
// receive, archive: the ones with NATS flags).
func registerDebugFlags(fs *flag.FlagSet, c *config, groups flagGroup) {
	if groups&gNATS != 0 && groups&gCommon != 0 {
		fs.StringVar(&c.DebugAddr, "debug-addr", "", "address serving the Go profiler at /debug/pprof/ (empty: off; keep it on loopback)")
	}
}

// listenDebug opens --debug-addr (nil when empty).
func listenDebug(addr string) (net.Listener, error) {
	return listenFlag("debug-addr", addr, "give each process its own, or leave it empty")
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
	log.Info("serving debug endpoints", "addr", ln.Addr().String())
	return serveHTTP(ctx, ln, mux)
}
