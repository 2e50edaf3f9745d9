package archiver

import (
	"github.com/walship/walship/pipeline"
	"github.com/walship/walship/sinks"
)

// Base backup chunks (pipeline.KindBackup) are archived like WAL files —
// the same read, put-if-absent with SHA-256 metadata, conflict handling,
// confirmation and clean-up of the staged object — except that their
// bytes are checked by size and SHA-256 only (they are tar or manifest
// bytes, not WAL pages), and they live under the layout's BackupPrefix:
// <BackupPrefix><id>/<archive>/<seq><ext>.

// backupKey is where a backup chunk goes in the sink.
func backupKey(layout sinks.Layout, ev *pipeline.SegmentEvent, ext string) string {
	return layout.BackupPrefix() + ev.File + ext
}

// countBackup adds an archived backup chunk to the metrics; the WAL
// series (segments, raw and compressed bytes) do not count it.
func (a *Archiver) countBackup(ev *pipeline.SegmentEvent, res *pipeline.ArchivedEvent) {
	m := a.cfg.Metrics
	m.BackupChunks.WithLabelValues(ev.Server).Inc()
	m.BackupBytes.WithLabelValues(ev.Server).Add(float64(ev.Size))
	if !res.Existed {
		m.Upload.WithLabelValues(ev.Server).Observe(res.UploadSeconds)
	}
}
