package retention

import (
	"context"
	"io"
	"log/slog"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/walship/walship/pipeline"
	"github.com/walship/walship/pipeline/backup/retention/retentiontest"
	"github.com/walship/walship/sinks"
	"github.com/walship/walship/sinks/file"
)

// The archiver's periodic pass: a prune by the policy, then the metrics
// from a scan; a prune that refuses is counted and the runner goes on.
func TestRunner(t *testing.T) {
	ctx := context.Background()
	s, err := file.New(fastDir(t))
	if err != nil {
		t.Fatal(err)
	}
	l := sinks.BarmanCloud{Prefix: "p", Server: "db"}
	put(t, s, l.IdentityKey(), sinks.Identity{SystemID: "7", SegmentSize: uint64(testSeg), Server: "db"}.Body())
	for no := uint64(1); no <= 12; no++ {
		name := pipeline.Segment{Timeline: 1, No: no}.Name(testSeg)
		put(t, s, l.Key(name, ".zst"), []byte(name))
	}
	now := time.Now().UTC().Truncate(time.Second)
	S := pipeline.LSN(testSeg)
	for i, start := range []pipeline.LSN{2*S + 0x28, 5*S + 0x28, 8*S + 0x28} {
		end := now.Add(-time.Duration(3-i) * 24 * time.Hour)
		if _, err := retentiontest.Write(ctx, s, l, retentiontest.Spec{Server: "db", SystemID: "7", SegSize: uint64(testSeg), Timeline: 1,
			StartLSN: start, EndLSN: start + 0x1000, StartTime: end.Add(-time.Minute), EndTime: end}); err != nil {
			t.Fatal(err)
		}
	}
	m := NewMetrics(prometheus.NewRegistry())
	r := &Runner{Sink: s, Layout: func(string) sinks.Layout { return l }, Servers: func(context.Context) ([]string, error) { return []string{"db"}, nil },
		Policy: Policy{Keep: 2, IncompleteAfter: time.Hour}, PruneEvery: time.Hour, ScanEvery: time.Hour, Now: time.Now,
		Log: slog.New(slog.NewTextHandler(io.Discard, nil)), Metrics: m}
	r.pass(ctx, true)
	if got := testutil.ToFloat64(m.Backups.WithLabelValues("db")); got != 2 {
		t.Errorf("walship_backups = %v, want 2 after prune --keep 2", got)
	}
	if got := testutil.ToFloat64(m.PruneObjects.WithLabelValues("db")); got != 4+4 { // a backup's 4 objects, segments 1-4
		t.Errorf("deleted %v objects, want 8", got)
	}
	if got := testutil.ToFloat64(m.LatestAge.WithLabelValues("db")); got < 24*3600 || got > 24*3600+60 {
		t.Errorf("walship_backup_latest_age_seconds = %v, want a day", got)
	}
	// The window: from the older kept backup's end (2 days ago) to the
	// newest WAL's store time (now).
	if got := testutil.ToFloat64(m.WindowSeconds.WithLabelValues("db")); got < 2*24*3600-60 || got > 2*24*3600+60 {
		t.Errorf("walship_recovery_window_seconds = %v, want two days", got)
	}
	if got := testutil.ToFloat64(m.WindowGap.WithLabelValues("db")); got != 0 {
		t.Errorf("walship_recovery_window_gap = %v, want 0", got)
	}
	// A gap after the newest backup, and a catalogue prune cannot read.
	if err := s.Delete(ctx, l.Key(pipeline.Segment{Timeline: 1, No: 10}.Name(testSeg), ".zst")); err != nil {
		t.Fatal(err)
	}
	put(t, s, l.BackupPrefix()+"20261201T000000Z/backup.json", []byte(`{"v": 9}`))
	r.pass(ctx, true)
	if got := testutil.ToFloat64(m.PruneErrors.WithLabelValues("db")); got != 1 {
		t.Errorf("walship_prune_errors_total = %v, want 1", got)
	}
	if got := testutil.ToFloat64(m.WindowGap.WithLabelValues("db")); got != 1 {
		t.Errorf("walship_recovery_window_gap = %v, want 1", got)
	}
	cctx, cancel := context.WithTimeout(ctx, 100*time.Millisecond)
	defer cancel()
	if err := r.Run(cctx); err != nil {
		t.Errorf("run: %v", err)
	}
}
