package retention

import (
	"context"
	"log/slog"
	"time"

	"github.com/walship/walship/sinks"
)

// Runner scans the backup catalogue periodically for the metrics and,
// when PruneEvery is set, prunes; inside the archiver process. A failed
// scan or prune is logged and counted, never fatal: the archiver's work
// goes on.
type Runner struct {
	Sink   sinks.Sink
	Layout func(server string) sinks.Layout
	// Servers are the servers to look after, asked before each pass.
	Servers    func(ctx context.Context) ([]string, error)
	Policy     Policy // Now is set at each run
	PruneEvery time.Duration
	ScanEvery  time.Duration
	// Retry is how soon a pass that found no server (or could not tell)
	// is repeated; 0: at the next tick.
	Retry   time.Duration
	Options Options
	Now     func() time.Time
	Log     *slog.Logger
	Metrics *Metrics

	// warned are the backups whose end time in the future was logged
	// (once each): server -> IDs.
	warned map[string]map[string]bool
}

// Run scans at once and every ScanEvery, prunes at once and every
// PruneEvery (when set; each prune is followed by a scan), until ctx is
// done.
func (r *Runner) Run(ctx context.Context) error {
	if r.ScanEvery <= 0 && r.PruneEvery <= 0 {
		<-ctx.Done()
		return nil
	}
	var scanC, pruneC <-chan time.Time
	if r.ScanEvery > 0 {
		t := time.NewTicker(r.ScanEvery)
		defer t.Stop()
		scanC = t.C
	}
	if r.PruneEvery > 0 {
		t := time.NewTicker(r.PruneEvery)
		defer t.Stop()
		pruneC = t.C
	}
	// While no server is known (a new, empty bucket), look again soon
	// rather than at the next tick.
	var retry <-chan time.Time
	again := func(found bool) {
		retry = nil
		if !found && r.Retry > 0 {
			retry = time.After(r.Retry)
		}
	}
	again(r.pass(ctx, r.PruneEvery > 0))
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-scanC:
			again(r.pass(ctx, false))
		case <-retry:
			again(r.pass(ctx, false))
		case <-pruneC:
			again(r.pass(ctx, true))
		}
	}
}

// pass scans (and prunes) every server; it reports whether there was any.
func (r *Runner) pass(ctx context.Context, prune bool) bool {
	servers, err := r.Servers(ctx)
	if err != nil {
		if ctx.Err() == nil {
			r.Log.Warn("backup catalogue: cannot tell which servers to look after", "error", err)
			r.Metrics.ScanErrors.WithLabelValues("").Inc()
		}
		return false
	}
	for _, s := range servers {
		if prune {
			r.prune(ctx, s)
		}
		r.scan(ctx, s)
	}
	return len(servers) > 0
}

func (r *Runner) scan(ctx context.Context, server string) {
	st, err := Scan(ctx, r.Sink, r.Layout(server), r.Options)
	if err != nil {
		if ctx.Err() == nil {
			r.Log.Warn("backup catalogue scan failed", "server", server, "error", err)
			r.Metrics.ScanErrors.WithLabelValues(server).Inc()
		}
		return
	}
	now := r.Now()
	r.warnFuture(server, st, now)
	r.Metrics.Observe(server, st, now)
}

// warnFuture logs, once per backup, an end time in the future.
func (r *Runner) warnFuture(server string, st *State, now time.Time) {
	if r.warned == nil {
		r.warned = map[string]map[string]bool{}
	}
	if r.warned[server] == nil {
		r.warned[server] = map[string]bool{}
	}
	for _, b := range st.Future(now) {
		if !r.warned[server][b.ID] {
			r.warned[server][b.ID] = true
			r.Log.Warn(FutureWarning(b, now), "server", server)
		}
	}
}

func (r *Runner) prune(ctx context.Context, server string) {
	fail := func(err error) {
		if ctx.Err() == nil {
			r.Log.Error("prune failed; the archiver goes on", "server", server, "error", err)
			r.Metrics.PruneErrors.WithLabelValues(server).Inc()
		}
	}
	st, err := Scan(ctx, r.Sink, r.Layout(server), r.Options)
	if err != nil {
		fail(err)
		return
	}
	p := r.Policy
	p.Now = r.Now()
	plan, err := NewPlan(st, p)
	if err != nil {
		fail(err)
		return
	}
	res, err := Execute(ctx, r.Sink, st, plan)
	r.Metrics.PruneObjects.WithLabelValues(server).Add(float64(res.Objects))
	r.Metrics.PruneBytes.WithLabelValues(server).Add(float64(res.Bytes))
	if err != nil {
		fail(err)
		return
	}
	r.Metrics.PruneRuns.WithLabelValues(server).Inc()
	for _, w := range plan.Warnings {
		r.Log.Warn("prune: "+w, "server", server)
	}
	r.Log.Info("pruned", "server", server, "kept", len(plan.Keep), "backups_deleted", res.Backups, "incomplete_deleted", res.Incomplete,
		"wal_deleted", res.WAL, "completed_meanwhile", res.Completed, "objects", res.Objects, "bytes", res.Bytes, "floor", plan.Floor.String(), "note", plan.Note)
}
