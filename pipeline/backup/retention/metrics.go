package retention

import (
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// Metrics are the backup catalogue's and prune's Prometheus series, per
// server.
type Metrics struct {
	LatestAge     *prometheus.GaugeVec
	Backups       *prometheus.GaugeVec
	Incomplete    *prometheus.GaugeVec
	WindowSeconds *prometheus.GaugeVec
	WindowGap     *prometheus.GaugeVec
	ScanErrors    *prometheus.CounterVec
	PruneRuns     *prometheus.CounterVec
	PruneErrors   *prometheus.CounterVec
	PruneObjects  *prometheus.CounterVec
	PruneBytes    *prometheus.CounterVec
}

// NewMetrics builds the metrics and registers them on reg.
func NewMetrics(reg prometheus.Registerer) *Metrics {
	g := func(name, help string) *prometheus.GaugeVec {
		return prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: name, Help: help}, []string{"server"})
	}
	c := func(name, help string) *prometheus.CounterVec {
		return prometheus.NewCounterVec(prometheus.CounterOpts{Name: name, Help: help}, []string{"server"})
	}
	m := &Metrics{
		LatestAge:     g("walship_backup_latest_age_seconds", "Seconds since the newest complete base backup (by end LSN) ended; when its end time is in the future (the backup host's clock runs ahead), since the bucket stored its catalogue. Absent when there is none."),
		Backups:       g("walship_backups", "Complete base backups (with a catalogue) in the bucket."),
		Incomplete:    g("walship_backup_incomplete", "Base backups started but without a catalogue: in progress, or failed."),
		WindowSeconds: g("walship_recovery_window_seconds", "Seconds of continuously recoverable time: from the end of the oldest complete backup whose WAL reaches the newest backup, to the newest WAL stored contiguously after the newest backup."),
		WindowGap:     g("walship_recovery_window_gap", "1 when the newest backup's recovery window is cut short by missing WAL before the newest WAL in the bucket."),
		ScanErrors:    c("walship_backup_scan_errors_total", "Backup catalogue scans that failed."),
		PruneRuns:     c("walship_prune_runs_total", "Prune runs that completed."),
		PruneErrors:   c("walship_prune_errors_total", "Prune runs that failed or refused (the archiver goes on)."),
		PruneObjects:  c("walship_prune_deleted_objects_total", "Objects deleted by prune (backups' and WAL)."),
		PruneBytes:    c("walship_prune_deleted_bytes_total", "Bytes deleted by prune, as stored."),
	}
	if reg != nil {
		reg.MustRegister(m.LatestAge, m.Backups, m.Incomplete, m.WindowSeconds, m.WindowGap,
			m.ScanErrors, m.PruneRuns, m.PruneErrors, m.PruneObjects, m.PruneBytes)
	}
	return m
}

// Summary is what the metrics report about one server's state.
type Summary struct {
	Backups, Incomplete int
	// Latest is the newest complete backup's end (zero: none): newest by
	// WAL position (State.Complete), the time by the backup host's clock.
	Latest time.Time
	// LatestStored is when the sink stored that backup's catalogue (its
	// clock; zero when it cannot tell).
	LatestStored time.Time
	// WindowSeconds: see walship_recovery_window_seconds.
	WindowSeconds float64
	Gap           bool
}

// Summarize reduces a scan to what the metrics report. The recovery
// window runs from the end of the oldest complete backup whose WAL reaches
// the next newer backup's end without a gap (so that every moment between
// is recoverable), through the newer backups, to the newest backup's
// window end.
func (st *State) Summarize() Summary {
	var s Summary
	complete := st.Complete()
	s.Backups = len(complete)
	s.Incomplete = len(st.Backups) - len(complete)
	if len(complete) == 0 {
		return s
	}
	newest := complete[len(complete)-1]
	s.Latest, s.LatestStored = newest.EndTime(), newest.CatalogStored
	w := newest.Window
	if w.Broken || w.EndTime.IsZero() {
		s.Gap = w.Gap || w.Broken
		return s
	}
	s.Gap = w.Gap
	oldest := newest
	for i := len(complete) - 2; i >= 0; i-- {
		b := complete[i]
		if b.Window.Broken || b.Window.EndLSN < oldest.Catalog.EndLSN {
			break
		}
		oldest = b
	}
	if d := w.EndTime.Sub(oldest.EndTime()).Seconds(); d > 0 {
		s.WindowSeconds = d
	}
	return s
}

// Age is how long ago the newest backup ended, never negative: an end
// time in the future (the backup host's clock runs ahead) would hold a
// negative age, and the alert on a stale backup silent, for as long as
// the clock is ahead; then the bucket's store time of its catalogue
// stands in, else now.
func (s Summary) Age(now time.Time) time.Duration {
	at := s.Latest
	if at.After(now) {
		at = now
		if !s.LatestStored.IsZero() && s.LatestStored.Before(now) {
			at = s.LatestStored
		}
	}
	return now.Sub(at)
}

// Observe sets server's gauges from a scan taken at now.
func (m *Metrics) Observe(server string, st *State, now time.Time) {
	s := st.Summarize()
	// Counters exist from the first scan on, so that alerts on their
	// increase see them start at 0.
	for _, c := range []*prometheus.CounterVec{m.ScanErrors, m.PruneRuns, m.PruneErrors, m.PruneObjects, m.PruneBytes} {
		c.WithLabelValues(server).Add(0)
	}
	m.Backups.WithLabelValues(server).Set(float64(s.Backups))
	m.Incomplete.WithLabelValues(server).Set(float64(s.Incomplete))
	if s.Latest.IsZero() {
		m.LatestAge.DeleteLabelValues(server)
	} else {
		m.LatestAge.WithLabelValues(server).Set(s.Age(now).Seconds())
	}
	m.WindowSeconds.WithLabelValues(server).Set(s.WindowSeconds)
	gap := 0.0
	if s.Gap {
		gap = 1
	}
	m.WindowGap.WithLabelValues(server).Set(gap)
}
