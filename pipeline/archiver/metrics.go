package archiver

import "github.com/prometheus/client_golang/prometheus"

// Metrics are the archiver pool's Prometheus series.
type Metrics struct {
	Segments        *prometheus.CounterVec
	RawBytes        *prometheus.CounterVec
	CompressedBytes *prometheus.CounterVec
	Upload          *prometheus.HistogramVec
	Errors          *prometheus.CounterVec
	Conflicts       *prometheus.CounterVec
	Corrupt         *prometheus.CounterVec
	Malformed       prometheus.Counter
	Unavailable     *prometheus.CounterVec
	// NoStageSecret counts events with a stage URL handed back because
	// this archiver has no stage secret.
	NoStageSecret *prometheus.CounterVec
	Backlog       prometheus.Gauge
	// Ranges (pipeline.KindRange): uploaded (not counting ones found in
	// the sink already), bytes stored for them, and deleted once their
	// whole segment was archived.
	PartialUploads *prometheus.CounterVec
	PartialBytes   *prometheus.CounterVec
	PartialDeleted *prometheus.CounterVec
	// Base backup chunks (pipeline.KindBackup) archived and confirmed,
	// and their raw bytes.
	BackupChunks *prometheus.CounterVec
	BackupBytes  *prometheus.CounterVec
}

// NewMetrics builds the archiver's metrics and registers them on reg.
func NewMetrics(reg prometheus.Registerer) *Metrics {
	m := &Metrics{
		Segments: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "walship_archiver_segments_total", Help: "WAL files (segments, ended timelines' last segments, history files) archived and confirmed by this archiver; ranges are counted by walship_partial_uploads_total.",
		}, []string{"server"}),
		RawBytes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "walship_archiver_raw_bytes_total", Help: "Raw (uncompressed) bytes archived, in bytes.",
		}, []string{"server"}),
		CompressedBytes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "walship_archiver_compressed_bytes_total", Help: "Compressed bytes written to the sink, in bytes.",
		}, []string{"server"}),
		Upload: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name: "walship_upload_duration_seconds", Help: "Duration of one object upload to the sink, in seconds.",
			Buckets: prometheus.ExponentialBuckets(0.005, 2, 14),
		}, []string{"server"}),
		Errors: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "walship_archiver_errors_total", Help: "Archiver errors per stage (consume, archive, upload, confirm, ack, cleanup, ranges).",
		}, []string{"server", "stage"}),
		Conflicts: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "walship_archive_conflicts_total", Help: "Uploads refused because the sink holds different bytes, or another cluster's identity, at the key.",
		}, []string{"server"}),
		Corrupt: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "walship_corrupt_segments_total", Help: "Segments (and ranges of segments) whose bytes failed the SHA-256 or WAL page-header check.",
		}, []string{"server"}),
		Malformed: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "walship_malformed_events_total", Help: "Segment events terminated because they cannot be parsed or are inconsistent.",
		}),
		Unavailable: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "walship_archiver_unavailable_total",
			Help: "Segment events handed back to the receiver (terminated) because their bytes were gone or corrupt; the receiver publishes the file again.",
		}, []string{"server"}),
	}
	m.NoStageSecret = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "walship_archiver_stage_no_secret_total",
		Help: "Segment events served by their receiver over HTTP (--stage http) handed back because this archiver has no stage secret (set WALSHIP_STAGE_SECRET or --stage-secret-file on the archivers).",
	}, []string{"server"})
	reg.MustRegister(m.NoStageSecret)
	m.Backlog = prometheus.NewGauge(prometheus.GaugeOpts{
		Name: "walship_archiver_backlog", Help: "Segment events waiting for or held by the archiver pool (JetStream consumer pending plus unacknowledged).",
	})
	m.PartialUploads = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "walship_partial_uploads_total", Help: "Ranges of segments being written uploaded to the sink (not counting ones found there already).",
	}, []string{"server"})
	m.PartialBytes = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "walship_partial_bytes_total", Help: "Bytes stored in the sink for uploaded ranges (compressed, and encrypted when configured), in bytes.",
	}, []string{"server"})
	m.PartialDeleted = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "walship_partial_deleted_total", Help: "Range objects deleted after their whole segment was archived.",
	}, []string{"server"})
	m.BackupChunks = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "walship_backup_chunks_total", Help: "Base backup chunks archived and confirmed by this archiver (found in the sink already included).",
	}, []string{"server"})
	m.BackupBytes = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "walship_backup_bytes_total", Help: "Raw (uncompressed) bytes of base backup chunks archived, in bytes.",
	}, []string{"server"})
	reg.MustRegister(m.BackupChunks, m.BackupBytes)
	reg.MustRegister(m.Backlog, m.PartialUploads, m.PartialBytes, m.PartialDeleted)
	reg.MustRegister(m.Segments, m.RawBytes, m.CompressedBytes, m.Upload, m.Errors, m.Conflicts, m.Corrupt, m.Malformed, m.Unavailable)
	return m
}
