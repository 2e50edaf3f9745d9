// Package receiver streams WAL from PostgreSQL over the physical
// replication protocol into a local spool, publishes each completed segment
// to the archivers, and reports to PostgreSQL as flushed only what the
// bucket is known to hold: the replication slot never advances past WAL
// that is not in the bucket.
//
// The state machine is Core (core.go, plan.go, tracker.go, spool.go): it
// owns the spool, the publish queue and the flush position, and does no
// network I/O. Receiver wires it to PostgreSQL (startup.go, session.go),
// to NATS (publish.go) and to time (housekeeping.go).
package receiver

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"path/filepath"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/sync/errgroup"

	"github.com/walship/walship/internal/backoff"
	"github.com/walship/walship/internal/ratelog"
	"github.com/walship/walship/pipeline"
	"github.com/walship/walship/pipeline/stagehttp"
)

// Publisher stages a WAL file and announces it to the archivers. Both
// calls block until NATS has acknowledged; the receiver retries on error.
type Publisher interface {
	PutObject(ctx context.Context, name string, r io.Reader) error
	// PublishSegment publishes the event and returns its stream sequence
	// (0 when unknown).
	PublishSegment(ctx context.Context, ev *pipeline.SegmentEvent) (uint64, error)
}

// QueueChecker is an optional capability of a Publisher: whether the event
// published with stream sequence seq and message ID msgID still waits for
// an archiver. A file whose confirmation is late is published again only
// when its event is no longer queued.
type QueueChecker interface {
	Queued(ctx context.Context, seq uint64, msgID string) (bool, error)
}

// ObjectChecker is an optional capability of a Publisher: whether the
// object store still holds a staged file with this SHA-256, so that
// publishing it again needs no new copy of its bytes.
type ObjectChecker interface {
	HasObject(ctx context.Context, name, sha256 string) (bool, error)
}

// Confirmations delivers archived events for one server: those stored since
// the given time, then new ones, one at a time, until ctx is done. It waits
// out NATS outages itself and returns only when ctx is done. Events it
// cannot decode go to bad.
type Confirmations interface {
	WatchArchived(ctx context.Context, server string, since time.Time, fn func(pipeline.ArchivedEvent), bad func(error)) error
}

// StateRecorder is an optional capability of a Publisher: it records the
// receiver's positions where `walship status` can read them.
type StateRecorder interface {
	PutState(ctx context.Context, server string, state []byte) error
}

// Config configures a receiver.
type Config struct {
	ConnString     string        // libpq connection string
	AppName        string        // application_name, shown in pg_stat_replication
	Slot           string        // physical replication slot
	CreateSlot     bool          // create the slot when missing
	Server         string        // server name; "" derives it from the system identifier
	SpoolDir       string        // the server's spool goes in a subdirectory named after it
	StatusInterval time.Duration // standby status update interval
	RepublishAfter time.Duration // check, and publish again, a file unconfirmed this long
	StageObjects   bool          // put segment bytes in the object store (false: archivers read the spool)
	Dest           string        // destination confirmations must name (sinks.DestID); "" accepts any
	Standby        bool          // wait while the slot is streamed elsewhere, then take over
	Synchronous    bool          // fsync and report write at once when caught up (synchronous_commit = remote_write)
	// PartialInterval: upload the segment being written in ranges this
	// often (Core.CutRange); 0: whole segments only.
	PartialInterval time.Duration
	SafeWALWarn     int64         // warn when the slot's safe_wal_size falls under this many bytes (0: never)
	SlotPollEvery   time.Duration // how often the slot's health is read (default 1s)
	Log             *slog.Logger
	Metrics         *Metrics

	// StageURL and Stage: serve the spool's held files to archivers over
	// HTTP (--stage http); events carry their URL under StageURL.
	StageURL string
	Stage    Stage
}

// Receiver is one PostgreSQL server's WAL receiver.
type Receiver struct {
	cfg  Config
	pub  Publisher
	conf Confirmations
	log  *slog.Logger
	rl   *ratelog.Limiter

	// Known after the first connection.
	sysID  string
	size   pipeline.SegmentSize
	server string
	core   *Core
	m      gauges

	serverEnd pipeline.LSN  // owned by the replication loop
	received  atomic.Uint64 // end of WAL received; read by housekeeping
	serverLSN atomic.Uint64 // serverEnd, for housekeeping
	connected atomic.Bool
	standby   atomic.Bool
	started   bool // a start succeeded once (Run's goroutine only)
	// unhold releases the latest registration with Config.Stage (Run's
	// goroutine only).
	unhold func()
}

// New builds a receiver.
func New(cfg Config, pub Publisher, conf Confirmations) *Receiver {
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.DiscardHandler)
	}
	if cfg.Metrics == nil {
		cfg.Metrics = NewMetrics(prometheus.NewRegistry())
	}
	if cfg.StatusInterval <= 0 {
		cfg.StatusInterval = 10 * time.Second
	}
	if cfg.RepublishAfter <= 0 {
		cfg.RepublishAfter = 5 * time.Minute
	}
	if cfg.SlotPollEvery <= 0 {
		cfg.SlotPollEvery = time.Second
	}
	return &Receiver{cfg: cfg, pub: pub, conf: conf, log: cfg.Log, rl: ratelog.New(cfg.Log, 30*time.Second)}
}

// Ready is nil while the receiver streams from PostgreSQL (its
// replication connection is up), else why not: the receiver's part of
// /readyz.
func (r *Receiver) Ready() error {
	switch {
	case r.connected.Load():
		return nil
	case r.standby.Load():
		return errors.New("standby: another receiver streams the slot")
	}
	return errors.New("not streaming from PostgreSQL")
}

// Server is the server name, known once Run has connected.
func (r *Receiver) Server() string { return r.server }

// Run streams until ctx is done or a fatal error. It reconnects with capped
// back-off when the connection drops after a successful start; a failure
// before the first successful start is returned, so a misconfiguration
// exits at once with its reason. Once a start has succeeded (and always
// with Config.Standby), PostgreSQL being unreachable or restarting while
// walship starts again is waited out too.
//
// With Config.Standby, a slot streamed by another receiver is not an error:
// Run waits, reporting standby, and takes over when the slot is released.
func (r *Receiver) Run(ctx context.Context) error {
	bo := backoff.New(time.Second, 30*time.Second)
	if r.cfg.Stage != nil {
		defer func() {
			if r.unhold != nil {
				r.unhold()
			}
		}()
		r.serveSpool()
	}
	for {
		if r.cfg.Standby {
			if err := r.awaitSlot(ctx); err != nil {
				return err
			}
		}
		err := r.runOnce(ctx)
		switch {
		case err == nil || ctx.Err() != nil || errors.Is(err, ErrFatal):
			return err
		case errors.Is(err, errReplan):
			r.log.Warn("starting over from the spool and the slot", "reason", err)
			continue
		case r.cfg.Standby && errors.Is(err, ErrSlotActive):
			// Lost the race for the slot: wait again.
			if !backoff.Sleep(ctx, time.Second) {
				return nil
			}
			continue
		case (r.started || r.cfg.Standby) && pgUnavailable(err):
			r.rl.Warn("start", "cannot reach PostgreSQL to start streaming; retrying", "error", err)
			if !bo.Wait(ctx) {
				return nil
			}
			continue
		}
		return err
	}
}

// awaitSlot waits while another connection streams the slot. PostgreSQL
// unreachable or restarting meanwhile is waited out. When the slot cannot
// be read over SQL (a pg_hba.conf that allows only replication
// connections), it returns and lets the start find out: a busy slot
// answers ErrSlotActive, and Run waits again.
func (r *Receiver) awaitSlot(ctx context.Context) error {
	logged := false
	for {
		slot, err := r.querySlot(ctx)
		if err != nil && ctx.Err() != nil {
			return ctx.Err()
		}
		if err != nil && pgUnavailable(err) {
			r.rl.Warn("standby", "standby: cannot read the slot's state; retrying", "error", err)
			if !backoff.Sleep(ctx, time.Second) {
				return ctx.Err()
			}
			continue
		}
		if err != nil {
			r.rl.Warn("standby-sql", "standby: cannot read pg_replication_slots; trying the slot itself (allow walship a normal connection in pg_hba.conf)", "error", err)
			return nil
		}
		r.rl.Reset("standby")
		if slot.ActivePID == 0 {
			r.setStandby(false)
			return nil
		}
		r.setStandby(true)
		if !logged {
			r.log.Info("standby: the slot is streamed by another connection; waiting to take over", "slot", r.cfg.Slot, "pid", slot.ActivePID)
			logged = true
		}
		if !backoff.Sleep(ctx, time.Second) {
			return ctx.Err()
		}
	}
}

func (r *Receiver) setStandby(on bool) {
	r.standby.Store(on)
	v := 0.0
	if on {
		v = 1
	}
	r.cfg.Metrics.Standby.WithLabelValues(r.cfg.Server).Set(v)
}

// runOnce prepares the spool and streams, with the publisher, the
// confirmation watcher, housekeeping and the slot poller beside it. They
// share one fate: when any of them stops with an error, all stop and
// runOnce returns it; none runs on while another is dead.
func (r *Receiver) runOnce(ctx context.Context) error {
	conn, err := r.prepare(ctx)
	if err != nil {
		return err
	}
	r.started = true
	defer r.core.Release()
	if r.cfg.Stage != nil {
		// Served from now on, and after this run ends too, until the next
		// run's core replaces it: between runs nothing confirms, so the
		// files this core holds are still exactly the spool's pending
		// ones (PostgreSQL down must not stop their archiving).
		r.hold(r.server, r.core)
	}
	sctx, stop := context.WithCancel(ctx)
	defer stop()
	g, gctx := errgroup.WithContext(sctx)
	g.Go(func() error {
		defer stop()
		return r.streamLoop(gctx, conn)
	})
	g.Go(func() error { return r.publishLoop(gctx) })
	g.Go(func() error {
		return r.conf.WatchArchived(gctx, r.server, r.core.ReplaySince(), r.core.Archived, r.core.Undecodable)
	})
	g.Go(func() error { return r.housekeeping(gctx) })
	g.Go(func() error { return r.slotPoll(gctx, r.cfg.SlotPollEvery) })
	err = g.Wait()
	if ctx.Err() != nil && !errors.Is(err, ErrFatal) {
		return nil
	}
	return err
}

// serveSpool lends the spool to the stage before the first run, which
// needs PostgreSQL: the files it holds (announced by an earlier process)
// stay archivable while PostgreSQL is unreachable. The server's name must
// be configured: a name derived from the system identifier is known only
// once PostgreSQL answers.
func (r *Receiver) serveSpool() {
	if r.cfg.Server == "" || pipeline.ValidServerName(r.cfg.Server) != nil {
		return
	}
	h := newSpoolHolder(OSFS{}, filepath.Join(r.cfg.SpoolDir, r.cfg.Server))
	r.hold(r.cfg.Server, h)
	if n := h.files(); n > 0 {
		r.log.Info("serving the spool's files to archivers before PostgreSQL answers (--stage http)", "server", r.cfg.Server, "files", n)
	}
}

// hold registers h with the stage under server, replacing the previous
// registration.
func (r *Receiver) hold(server string, h stagehttp.Holder) {
	r.unhold = r.cfg.Stage.Hold(server, h)
}

// publishLoop stages and announces files. A file that cannot be published
// goes back to the end of the queue, after a pause, so one bad file never
// holds up the others.
func (r *Receiver) publishLoop(ctx context.Context) error {
	bo := backoff.New(250*time.Millisecond, 15*time.Second)
	for {
		it, ok := r.core.Next(ctx)
		if !ok {
			return nil
		}
		err := r.core.Publish(ctx, r.pub, it)
		if err == nil {
			bo.Reset()
			r.rl.Reset("publish")
			continue
		}
		if ctx.Err() != nil {
			return nil
		}
		r.core.Retry(it)
		r.m.errors.WithLabelValues("publish").Inc()
		r.rl.Warn("publish", "cannot publish segment; retrying", "segment", it.Event().File, "error", err)
		if !bo.Wait(ctx) {
			return nil
		}
	}
}
