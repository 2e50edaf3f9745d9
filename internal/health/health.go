// Package health tracks whether the services a walship process needs (NATS,
// the bucket) can be used now. /readyz answers from it, the gauge
// walship_dependency_up{dependency} shows it, and each process records it
// where `walship status` reads it.
//
// A process tells two kinds of failure apart: a dependency that is only
// unavailable (refused, timing out, answering 5xx) is waited for — the
// process starts, says it is not ready, and checks again with capped
// back-off — while one that is misconfigured (no such bucket, access
// denied, JetStream disabled) stops it at start-up with the error. The
// adapters decide which is which (s3.Unavailable, bus.Unavailable).
package health

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/walship/walship/internal/backoff"
	"github.com/walship/walship/pipeline"
)

// errUnchecked is a dependency's state before its first check.
var errUnchecked = errors.New("not checked yet")

// Set is the dependencies of one process.
type Set struct {
	gauge *prometheus.GaugeVec
	mu    sync.Mutex
	deps  []*Dependency
}

// NewSet builds an empty set whose gauge is registered on reg.
func NewSet(reg prometheus.Registerer) *Set {
	g := prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Name: "walship_dependency_up",
		Help: "1 when the process can use the dependency (nats, s3) now, 0 while it is unavailable.",
	}, []string{"dependency"})
	reg.MustRegister(g)
	return &Set{gauge: g}
}

// Add adds a dependency, down until its first check.
func (s *Set) Add(name string) *Dependency {
	d := &Dependency{name: name, gauge: s.gauge.WithLabelValues(name), err: errUnchecked, since: time.Now()}
	d.gauge.Set(0)
	s.mu.Lock()
	s.deps = append(s.deps, d)
	s.mu.Unlock()
	return d
}

// Ready is nil when every dependency is up, else an error naming each that
// is not, with how long and why.
func (s *Set) Ready() error {
	var down []string
	for _, st := range s.States() {
		if !st.Up {
			down = append(down, fmt.Sprintf("%s unavailable for %s: %s", st.Name, time.Since(st.Since).Round(time.Second), st.Error))
		}
	}
	if len(down) == 0 {
		return nil
	}
	return errors.New(strings.Join(down, "; "))
}

// States is every dependency's state, in the order they were added.
func (s *Set) States() []pipeline.DependencyState {
	s.mu.Lock()
	deps := append([]*Dependency(nil), s.deps...)
	s.mu.Unlock()
	out := make([]pipeline.DependencyState, 0, len(deps))
	for _, d := range deps {
		out = append(out, d.State())
	}
	return out
}

// Dependency is one service a process needs: up, or down with a reason.
type Dependency struct {
	name  string
	gauge prometheus.Gauge
	mu    sync.Mutex
	err   error // nil: up
	since time.Time
}

// Name is the dependency's name (nats, s3).
func (d *Dependency) Name() string { return d.name }

// Report records the outcome of a check or of a real operation: nil means
// up. It reports whether the state changed (up to down, down to up).
func (d *Dependency) Report(err error) (changed bool) {
	d.mu.Lock()
	defer d.mu.Unlock()
	changed = (err == nil) != (d.err == nil)
	if changed {
		d.since = time.Now()
		if err == nil {
			d.gauge.Set(1)
		} else {
			d.gauge.Set(0)
		}
	}
	d.err = err
	return changed
}

// Err is nil when the dependency is up, else why not.
func (d *Dependency) Err() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.err
}

// State is the dependency's state for a process record.
func (d *Dependency) State() pipeline.DependencyState {
	d.mu.Lock()
	defer d.mu.Unlock()
	st := pipeline.DependencyState{Name: d.name, Up: d.err == nil, Since: d.since}
	if d.err != nil {
		st.Error = d.err.Error()
	}
	return st
}

// Policy says how Watch checks a dependency.
type Policy struct {
	// Unavailable tells an outage from a misconfiguration.
	Unavailable func(error) bool
	Every       time.Duration   // between checks while up
	Min, Max    time.Duration   // capped back-off between checks while down
	Timeout     time.Duration   // of one check
	Wake        <-chan struct{} // check at once when it fires (nil: never)
	Log         *slog.Logger
}

// Watch keeps d current until ctx is done, calling check every p.Every
// while it succeeds, with back-off from p.Min to p.Max while it fails, and
// at once when p.Wake fires. Until a check has succeeded (confirmed says
// whether one did at start-up), an error p.Unavailable does not accept is
// returned: a dependency that turns out misconfigured when it first answers
// stops the process as it would have at start-up. After that, every error
// only marks d down, and is logged.
func Watch(ctx context.Context, d *Dependency, p Policy, confirmed bool, check func(context.Context) error) error {
	log := p.Log
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	bo := backoff.New(p.Min, p.Max)
	lastLog := time.Time{}
	if d.Err() != nil {
		lastLog = time.Now() // the caller said so at start-up
	}
	for {
		wait := p.Every
		if d.Err() != nil {
			wait = bo.Next()
		}
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			return nil
		case <-t.C:
		case <-p.Wake:
			t.Stop()
		}
		cctx, cancel := context.WithTimeout(ctx, p.Timeout)
		err := check(cctx)
		cancel()
		if ctx.Err() != nil {
			return nil
		}
		if err != nil && !confirmed && !p.Unavailable(err) {
			return err
		}
		changed := d.Report(err)
		switch {
		case err == nil:
			confirmed = true
			bo.Reset()
			if changed {
				log.Info(d.name+" available: ready", "dependency", d.name)
			}
		case changed:
			log.Warn(d.name+" unavailable: not ready; checking again with back-off", "dependency", d.name, "error", err)
			lastLog = time.Now()
		case time.Since(lastLog) >= time.Minute:
			log.Warn(d.name+" still unavailable", "dependency", d.name, "for", time.Since(d.State().Since).Round(time.Second).String(), "error", err)
			lastLog = time.Now()
		}
	}
}
