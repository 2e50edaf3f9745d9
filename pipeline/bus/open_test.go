package bus

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"

	"github.com/walship/walship/internal/testenv"
	"github.com/walship/walship/pipeline"
)

// startServer runs an embedded server with the given options on a free
// loopback port and returns its URL.
func startServer(t *testing.T, o server.Options) string {
	t.Helper()
	o.Host, o.Port, o.NoSigs, o.NoLog = "127.0.0.1", testenv.FreePort(t), true, true
	if o.JetStream {
		o.StoreDir = t.TempDir()
	}
	s, err := server.NewServer(&o)
	if err != nil {
		t.Fatal(err)
	}
	go s.Start()
	if !s.ReadyForConnections(10 * time.Second) {
		t.Fatal("nats did not start")
	}
	t.Cleanup(func() { s.Shutdown(); s.WaitForShutdown() })
	return "nats://127.0.0.1:" + strconv.Itoa(o.Port)
}

// Unavailable tells NATS being away (wait) from a misconfiguration (exit
// at start-up), on the errors Connect really returns.
func TestUnavailable(t *testing.T) {
	log := slog.New(slog.DiscardHandler)
	refused := "nats://127.0.0.1:" + strconv.Itoa(testenv.FreePort(t))
	noJS := startServer(t, server.Options{})
	auth := startServer(t, server.Options{JetStream: true, Username: "walship", Password: "right"})
	authURL := func(pw string) string { return "nats://walship:" + pw + "@" + auth[len("nats://"):] }
	cases := []struct {
		name        string
		url         string
		unavailable bool
	}{
		{"connection refused", refused, true},
		{"never answers", "nats://" + strings.TrimPrefix(testenv.BlackHole(t), "http://"), true},
		{"name does not resolve", "nats://walship-no-such-host.invalid:4222", true},
		{"JetStream disabled", noJS, false},
		{"wrong password", authURL("wrong"), false},
		{"malformed URL", "nats://127.0.0.1:notaport", false},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			b, err := Connect(ctx, c.url, DefaultOptions(), log)
			if err == nil {
				b.Close()
				t.Fatal("no error")
			}
			t.Log(err)
			if got := Unavailable(err); got != c.unavailable {
				t.Errorf("Unavailable(%v) = %v, want %v", err, got, c.unavailable)
			}
		})
	}
	if b, err := Connect(context.Background(), authURL("right"), DefaultOptions(), log); err != nil {
		t.Errorf("the right password: %v", err)
	} else {
		b.Close()
	}
	for _, err := range []error{nil, errors.New("stream configuration differs")} {
		if Unavailable(err) {
			t.Errorf("Unavailable(%v)", err)
		}
	}
	for _, err := range []error{fmt.Errorf("x: %w", ErrNotReady), fmt.Errorf("x: %w", nats.ErrTimeout), context.DeadlineExceeded} {
		if !Unavailable(err) {
			t.Errorf("Unavailable(%v) = false", err)
		}
	}
}

// A bus opened while NATS is down: every operation fails with ErrNotReady
// (none panics on resources not yet created), Next and WatchArchived wait,
// and once NATS is up Setup creates the resources and everything works.
func TestOpenWhileNATSDown(t *testing.T) {
	n := testenv.StartNATS(t)
	n.Stop()
	b, err := Open(n.URL(), DefaultOptions(), slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	ctx := context.Background()
	err = b.Setup(ctx)
	if err == nil || !Unavailable(err) {
		t.Fatalf("Setup with NATS down: %v, want an error Unavailable accepts", err)
	}
	ev := event("000000010000000000000005")
	for name, call := range map[string]func() error{
		"PutObject":       func() error { return b.PutObject(ctx, "x", bytes.NewReader([]byte("x"))) },
		"GetObject":       func() error { _, err := b.GetObject(ctx, "x", nil); return err },
		"DeleteObject":    func() error { return b.DeleteObject(ctx, "x") },
		"HasObject":       func() error { _, err := b.HasObject(ctx, "x", "00"); return err },
		"PublishSegment":  func() error { _, err := b.PublishSegment(ctx, &ev); return err },
		"Queued":          func() error { _, err := b.Queued(ctx, 1, "x"); return err },
		"PublishArchived": func() error { return b.PublishArchived(ctx, &pipeline.ArchivedEvent{SegmentEvent: ev}) },
		"PutState":        func() error { return b.PutState(ctx, "db1", []byte("{}")) },
		"PutProcess":      func() error { return b.PutProcess(ctx, "p", []byte("{}")) },
		"Pending":         func() error { _, err := b.Pending(ctx); return err },
	} {
		if err := call(); !errors.Is(err, ErrNotReady) {
			t.Errorf("%s before Setup: %v, want ErrNotReady", name, err)
		}
	}
	began := time.Now()
	if d, err := b.Next(ctx, 300*time.Millisecond); d != nil || err != nil {
		t.Errorf("Next before Setup: %v, %v; want nothing", d, err)
	}
	if time.Since(began) < 250*time.Millisecond {
		t.Error("Next before Setup returned at once: archivers would spin")
	}

	n.Start()
	select {
	case <-b.ConnChanged():
	case <-time.After(20 * time.Second):
		t.Fatal("no signal that the client connected")
	}
	sctx, cancel := context.WithTimeout(ctx, 20*time.Second)
	defer cancel()
	if err := b.Setup(sctx); err != nil {
		t.Fatalf("Setup with NATS up: %v", err)
	}
	if _, err := b.PublishSegment(ctx, &ev); err != nil {
		t.Fatalf("publish after Setup: %v", err)
	}
	d, err := b.Next(ctx, 5*time.Second)
	if err != nil || d == nil {
		t.Fatalf("next after Setup: %v %v", d, err)
	}
	if err := b.PutProcess(ctx, "archive.host.1", []byte(`{"v":1,"role":"archive"}`)); err != nil {
		t.Fatal(err)
	}
	snap, err := ReadSnapshot(ctx, n.URL(), DefaultNames())
	if err != nil {
		t.Fatal(err)
	}
	if len(snap.Processes) != 1 || snap.Processes[0].Role != "archive" {
		t.Errorf("processes in the snapshot: %+v", snap.Processes)
	}
	n.Stop()
	if err := b.Setup(ctx); err == nil || !Unavailable(err) {
		t.Errorf("Setup after NATS went away: %v, want an error Unavailable accepts", err)
	}
}

// A bus opened with a wrong password does not wait forever: Setup says
// it is a misconfiguration once the server has answered.
func TestOpenWrongPassword(t *testing.T) {
	auth := startServer(t, server.Options{JetStream: true, Username: "walship", Password: "right"})
	b, err := Open("nats://walship:wrong@"+auth[len("nats://"):], DefaultOptions(), slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	deadline := time.Now().Add(10 * time.Second)
	for {
		err := b.Setup(context.Background())
		if err != nil && !Unavailable(err) {
			t.Log(err)
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("Setup still says %v after 10s", err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}
