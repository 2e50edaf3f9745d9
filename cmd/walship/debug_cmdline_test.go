package main

import (
	"context"
	"log/slog"
	"os"
	"strings"
	"testing"
)

// Found by review: README (Security, "Where secrets come from") says walship never
// shows a password in "/debug/pprof/ (which does not serve cmdline)", but
// --debug-addr serves /debug/pprof/cmdline, which prints os.Args: a --pg or
// --nats password given on the command line (which check only warns about)
// goes to whoever reaches the debug address. TestSecretsNeverShown (e2e)
// fetches /debug/pprof/cmdline from the metrics address, which answers 404,
// so it cannot see this.
func TestDebugCmdlineNotServed(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	saved := os.Args
	defer func() { os.Args = saved }()
	os.Args = []string{"walship", "run", "--pg", "postgres://walship:pgSECRETreview2@db/postgres", "--nats", "nats://u:natsSECRETreview2@n:4222"}
	dln, err := listenDebug("127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go serveDebug(ctx, dln, slog.New(slog.DiscardHandler))()
	code, body := get(t, "http://"+dln.Addr().String()+"/debug/pprof/cmdline")
	if strings.Contains(body, "SECRETreview2") {
		t.Errorf("/debug/pprof/cmdline (%d) shows the passwords: %q", code, body)
	}
}
