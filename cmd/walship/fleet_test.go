package main

import (
	"context"
	"errors"
	"log/slog"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

// fakeReceiver runs until ctx is done, or fails at once when fail is set.
type fakeReceiver struct {
	fail  error
	ready error
}

func (r *fakeReceiver) Run(ctx context.Context) error {
	if r.fail != nil {
		return r.fail
	}
	<-ctx.Done()
	return nil
}

func (r *fakeReceiver) Ready() error { return r.ready }

// A server that keeps failing is started again with back-off, reported,
// and never stops the others; when it recovers it counts as up.
func TestFleetIsolatesAFailingServer(t *testing.T) {
	reg := prometheus.NewRegistry()
	f := newFleet(slog.New(slog.DiscardHandler), reg)
	f.min, f.max = 5*time.Millisecond, 20*time.Millisecond
	var starts atomic.Int32
	var healed atomic.Bool
	f.add("good", func() (receiverPart, error) { return &fakeReceiver{}, nil })
	f.add("bad", func() (receiverPart, error) {
		starts.Add(1)
		if healed.Load() {
			return &fakeReceiver{ready: errors.New("not streaming from PostgreSQL")}, nil
		}
		return &fakeReceiver{fail: errors.New("slot lost")}, nil
	})
	f.add("broken", func() (receiverPart, error) { return nil, errors.New("cannot build") })
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- f.Run(ctx) }()

	waitUntil(t, "bad to be started again", func() bool { return starts.Load() >= 3 })
	if v := testutil.ToFloat64(f.m.up.WithLabelValues("good")); v != 1 {
		t.Errorf("walship_receiver_up{good} = %v, want 1", v)
	}
	if v := testutil.ToFloat64(f.m.restarts.WithLabelValues("bad")); v < 2 {
		t.Errorf("walship_receiver_restarts_total{bad} = %v", v)
	}
	err := f.Ready()
	if err == nil || !strings.Contains(err.Error(), "server bad: stopped (slot lost)") || !strings.Contains(err.Error(), "server broken: stopped (cannot build)") ||
		strings.Contains(err.Error(), "server good") {
		t.Errorf("Ready = %v", err)
	}
	healed.Store(true)
	waitUntil(t, "bad to run again", func() bool { return testutil.ToFloat64(f.m.up.WithLabelValues("bad")) == 1 })
	waitUntil(t, "bad's own readiness to show", func() bool {
		err := f.Ready()
		return err != nil && strings.Contains(err.Error(), "server bad: not streaming from PostgreSQL")
	})
	select {
	case err := <-done:
		t.Fatalf("fleet stopped on its own: %v", err)
	default:
	}
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("Run = %v after cancel", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("fleet did not stop")
	}
}

func waitUntil(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}
