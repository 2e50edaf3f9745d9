package archiver

import (
	"bytes"
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/walship/walship/internal/ratelog"
	"github.com/walship/walship/pipeline/stagehttp"
)

// An archiver without a stage secret meets events served over HTTP: each
// is handed back (never terminated: the receiver still holds the WAL),
// counted, and one error line (rate-limited) names the fix; nothing is
// uploaded.
func TestNoStageSecretHandsBackAndSaysHow(t *testing.T) {
	f := newFixture(t)
	var logs bytes.Buffer
	f.a.log = slog.New(slog.NewTextHandler(&logs, nil))
	f.a.rl = ratelog.New(f.a.log, 30*time.Second)
	f.a.cfg.Fetch = nil
	ev := f.ev
	ev.Object, ev.URL = "", stagehttp.URL("http://receiver.example:9753", "db1", ev.File)
	for i := uint64(1); i <= 3; i++ {
		d, out := f.handle(t, ev, i)
		if out != Naked || d.answer != "nak" {
			t.Fatalf("delivery %d: %s (%s), want nak", i, out, d.answer)
		}
	}
	if got := testutil.ToFloat64(f.a.cfg.Metrics.NoStageSecret.WithLabelValues("db1")); got != 3 {
		t.Errorf("walship_archiver_stage_no_secret_total = %v, want 3", got)
	}
	out := logs.String()
	if n := strings.Count(out, "WALSHIP_STAGE_SECRET or --stage-secret-file"); n != 1 || !strings.Contains(out, "level=ERROR") {
		t.Errorf("want one error line naming the fix, got %d:\n%s", n, out)
	}
	if len(f.bus.archived) != 0 {
		t.Errorf("confirmed without the bytes: %v", f.bus.archived)
	}
}
