package health

import (
	"context"
	"errors"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

var (
	errDown   = errors.New("connection refused")
	errConfig = errors.New("no such bucket")
)

func policy() Policy {
	return Policy{Unavailable: func(err error) bool { return errors.Is(err, errDown) },
		Every: 20 * time.Millisecond, Min: 5 * time.Millisecond, Max: 20 * time.Millisecond, Timeout: time.Second}
}

// script is a check that answers from a list, then repeats the last.
type script struct {
	mu   sync.Mutex
	errs []error
	n    int
}

func (s *script) check(context.Context) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	i := min(s.n, len(s.errs)-1)
	s.n++
	return s.errs[i]
}

func (s *script) calls() int { s.mu.Lock(); defer s.mu.Unlock(); return s.n }

func TestReadyAndGauge(t *testing.T) {
	reg := prometheus.NewRegistry()
	set := NewSet(reg)
	nats, s3 := set.Add("nats"), set.Add("s3")
	if set.Ready() == nil {
		t.Error("ready before any check")
	}
	nats.Report(nil)
	s3.Report(errDown)
	err := set.Ready()
	if err == nil || !strings.Contains(err.Error(), "s3 unavailable") || !strings.Contains(err.Error(), "connection refused") || strings.Contains(err.Error(), "nats") {
		t.Errorf("Ready = %v, want s3 and its reason only", err)
	}
	if v := testutil.ToFloat64(set.gauge.WithLabelValues("s3")); v != 0 {
		t.Errorf("s3 gauge %v while down", v)
	}
	if v := testutil.ToFloat64(set.gauge.WithLabelValues("nats")); v != 1 {
		t.Errorf("nats gauge %v while up", v)
	}
	s3.Report(nil)
	if err := set.Ready(); err != nil {
		t.Errorf("Ready = %v with everything up", err)
	}
}

// Before the first success a misconfiguration ends the watch with its
// error; outages only mark the dependency down.
func TestWatchMisconfigurationFoundLate(t *testing.T) {
	d := NewSet(prometheus.NewRegistry()).Add("s3")
	d.Report(errDown)
	s := &script{errs: []error{errDown, errDown, errConfig}}
	err := Watch(context.Background(), d, policy(), false, s.check)
	if !errors.Is(err, errConfig) {
		t.Fatalf("Watch = %v, want the misconfiguration", err)
	}
	if s.calls() != 3 {
		t.Errorf("%d checks, want 3", s.calls())
	}
}

// After a success, nothing ends the watch but ctx: a bucket deleted under
// a running process marks it down, it does not stop it.
func TestWatchAfterSuccess(t *testing.T) {
	d := NewSet(prometheus.NewRegistry()).Add("s3")
	d.Report(errDown)
	s := &script{errs: []error{errDown, nil, errConfig, errDown, nil}}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- Watch(ctx, d, policy(), false, s.check) }()
	deadline := time.Now().Add(5 * time.Second)
	for s.calls() < 6 && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatalf("Watch = %v after a success, want nil", err)
	}
	if d.Err() != nil {
		t.Errorf("down at the end: %v", d.Err())
	}
}

// Wake makes Watch check at once instead of waiting out its back-off.
func TestWatchWake(t *testing.T) {
	d := NewSet(prometheus.NewRegistry()).Add("nats")
	d.Report(errDown)
	wake := make(chan struct{}, 1)
	p := policy()
	p.Min, p.Max = time.Hour, time.Hour
	p.Wake = wake
	s := &script{errs: []error{nil}}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go Watch(ctx, d, p, false, s.check)
	wake <- struct{}{}
	deadline := time.Now().Add(5 * time.Second)
	for d.Err() != nil && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	if d.Err() != nil {
		t.Fatal("still down after a wake with an hour of back-off")
	}
}
