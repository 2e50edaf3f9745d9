package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/sync/errgroup"

	"github.com/walship/walship/internal/backoff"
	"github.com/walship/walship/pipeline/bus"
	"github.com/walship/walship/pipeline/receiver"
)

// receiverPart is what runAll runs as the receiver: one receiver.Receiver,
// or a fleet of them.
type receiverPart interface {
	Run(ctx context.Context) error
	Ready() error
}

// fleetMetrics are the fleet's series, labelled by server.
type fleetMetrics struct {
	up       *prometheus.GaugeVec
	restarts *prometheus.CounterVec
}

func newFleetMetrics(reg prometheus.Registerer) *fleetMetrics {
	m := &fleetMetrics{
		up: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "walship_receiver_up",
			Help: "1 while the server's receiver runs (streaming, or reconnecting on its own), 0 while it has stopped on an error and waits to be started again.",
		}, []string{"server"}),
		restarts: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "walship_receiver_restarts_total",
			Help: "Times the server's receiver stopped on an error and was started again.",
		}, []string{"server"}),
	}
	reg.MustRegister(m.up, m.restarts)
	return m
}

// fleet runs one receiver per server in one process. A receiver that stops
// (PostgreSQL unreachable at its first start, a lost slot, any fatal
// error) is logged, reported in walship_receiver_up and /readyz, and built
// and started again after a capped back-off; it never stops the others.
// Run returns only when ctx is done.
type fleet struct {
	log      *slog.Logger
	m        *fleetMetrics
	min, max time.Duration // the restart back-off
	members  []*fleetMember
}

type fleetMember struct {
	server string
	build  func() (receiverPart, error)

	mu  sync.Mutex
	cur receiverPart // nil while stopped
	why string       // why it stopped
}

var _ receiverPart = (*fleet)(nil)

// newFleet builds a fleet; build makes a server's receiver afresh for each
// start.
func newFleet(log *slog.Logger, reg prometheus.Registerer) *fleet {
	return &fleet{log: log, m: newFleetMetrics(reg), min: time.Second, max: time.Minute}
}

// add puts a server in the fleet.
func (f *fleet) add(server string, build func() (receiverPart, error)) {
	f.members = append(f.members, &fleetMember{server: server, build: build, why: "not started"})
	f.m.up.WithLabelValues(server).Set(0)
	f.m.restarts.WithLabelValues(server)
}

// Run runs every member until ctx is done.
func (f *fleet) Run(ctx context.Context) error {
	g, gctx := errgroup.WithContext(ctx)
	for _, m := range f.members {
		g.Go(func() error { f.runMember(gctx, m); return nil })
	}
	return g.Wait()
}

func (f *fleet) runMember(ctx context.Context, m *fleetMember) {
	bo := backoff.New(f.min, f.max)
	log := f.log.With("server", m.server)
	for ctx.Err() == nil {
		began := time.Now()
		r, err := m.build()
		if err == nil {
			m.set(r, "")
			f.m.up.WithLabelValues(m.server).Set(1)
			err = r.Run(ctx)
			f.m.up.WithLabelValues(m.server).Set(0)
			if ctx.Err() != nil {
				m.set(nil, "stopping")
				return
			}
			if err == nil {
				err = errors.New("the receiver stopped")
			}
		}
		m.set(nil, err.Error())
		f.m.restarts.WithLabelValues(m.server).Inc()
		if time.Since(began) > 2*f.max {
			bo.Reset()
		}
		d := bo.Next()
		log.Error("receiver stopped; starting it again (the other servers go on)", "error", err, "retry_in", d.Round(time.Millisecond).String())
		if !backoff.Sleep(ctx, d) {
			return
		}
	}
}

func (m *fleetMember) set(r receiverPart, why string) {
	m.mu.Lock()
	m.cur, m.why = r, why
	m.mu.Unlock()
}

// Ready is nil when every server streams, else which do not and why.
func (f *fleet) Ready() error {
	var why []string
	for _, m := range f.members {
		m.mu.Lock()
		r, stopped := m.cur, m.why
		m.mu.Unlock()
		if r == nil {
			why = append(why, fmt.Sprintf("server %s: stopped (%s); starting again", m.server, stopped))
			continue
		}
		if err := r.Ready(); err != nil {
			why = append(why, fmt.Sprintf("server %s: %v", m.server, err))
		}
	}
	if len(why) == 0 {
		return nil
	}
	return errors.New(strings.Join(why, "; "))
}

// receivers builds the process's receiver part: the one server's receiver
// without a configuration file, else a fleet of one receiver per server,
// all on one bus and one set of metrics.
func receivers(c *config, servers []serverConfig, b *bus.Bus, log *slog.Logger, reg prometheus.Registerer, stage stagePlan) (receiverPart, error) {
	m := receiver.NewMetrics(reg)
	if servers == nil {
		return newReceiver(c, b, log, m, stage)
	}
	f := newFleet(log, reg)
	for _, s := range servers {
		// Check the configuration once now, so that a mistake stops the
		// process instead of being retried.
		if _, err := newReceiver(s.config, b, log, m, stage); err != nil {
			return nil, fmt.Errorf("server %s: %w", s.Server, err)
		}
		f.add(s.Server, func() (receiverPart, error) { return newReceiver(s.config, b, log, m, stage) })
	}
	log.Info("streaming many servers in one process", "servers", len(servers))
	return f, nil
}

// spoolsUsed is spoolUsed for any server of the process.
func spoolsUsed(c *config, servers []serverConfig) bool {
	if servers == nil {
		return spoolUsed(c)
	}
	for _, s := range servers {
		if spoolUsed(s.config) {
			return true
		}
	}
	return false
}
