package receiver

import "github.com/prometheus/client_golang/prometheus"

// Metrics are the receiver's Prometheus series, labelled by server.
type Metrics struct {
	ServerLSN    *prometheus.GaugeVec
	ReceivedLSN  *prometheus.GaugeVec
	WrittenLSN   *prometheus.GaugeVec
	PublishedLSN *prometheus.GaugeVec
	ArchivedLSN  *prometheus.GaugeVec
	FlushLSN     *prometheus.GaugeVec
	LagBytes     *prometheus.GaugeVec
	LagSeconds   *prometheus.GaugeVec
	Segments     *prometheus.CounterVec
	Bytes        *prometheus.CounterVec
	Errors       *prometheus.CounterVec
	Connected    *prometheus.GaugeVec
	Timeline     *prometheus.GaugeVec
	SpoolBytes   *prometheus.GaugeVec
	Republished  *prometheus.CounterVec
	Ignored      *prometheus.CounterVec
	PendingFiles *prometheus.GaugeVec
	Damaged      *prometheus.CounterVec
	RangesCut    *prometheus.CounterVec

	SlotWALStatus   *prometheus.GaugeVec
	SlotSafeWALSize *prometheus.GaugeVec
	SlotRetained    *prometheus.GaugeVec
	SlotExists      *prometheus.GaugeVec
	Standby         *prometheus.GaugeVec
	SlotSafeWALLow  *prometheus.GaugeVec
}

// NewMetrics builds the receiver's metrics and registers them on reg.
func NewMetrics(reg prometheus.Registerer) *Metrics {
	g := func(name, help string) *prometheus.GaugeVec {
		return prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: name, Help: help}, []string{"server"})
	}
	m := &Metrics{
		ServerLSN:    g("walship_server_lsn_bytes", "End of WAL on the server, from keepalives (byte position)."),
		ReceivedLSN:  g("walship_received_lsn_bytes", "End of WAL received from the server (byte position)."),
		WrittenLSN:   g("walship_written_lsn_bytes", "End of WAL fsynced to the local spool (byte position)."),
		PublishedLSN: g("walship_published_lsn_bytes", "End of the newest segment published to the archivers (byte position)."),
		ArchivedLSN:  g("walship_archived_lsn_bytes", "End of the newest segment confirmed archived (byte position)."),
		FlushLSN:     g("walship_flush_lsn_bytes", "Flush position reported to PostgreSQL: end of the contiguous archived run (byte position)."),
		LagBytes:     g("walship_archive_lag_bytes", "Bytes received but not yet contiguously archived (received minus flush)."),
		LagSeconds:   g("walship_archive_lag_seconds", "Age in seconds of the oldest received WAL not yet archived: the live recovery point objective."),
		Connected:    g("walship_receiver_connected", "1 while the receiver is streaming from PostgreSQL."),
		Timeline:     g("walship_timeline", "Timeline being streamed."),
		SpoolBytes:   g("walship_spool_bytes", "Bytes of complete segments waiting in the spool for archiving."),
		Segments: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "walship_segments_total", Help: "WAL segments per pipeline stage (received, published, archived).",
		}, []string{"server", "stage"}),
		Bytes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "walship_wal_bytes_total", Help: "Raw WAL bytes per pipeline stage (received, published, archived).",
		}, []string{"server", "stage"}),
		Errors: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "walship_errors_total", Help: "Errors per pipeline stage.",
		}, []string{"server", "stage"}),
		Republished: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "walship_republished_segments_total", Help: "Segments published again because no confirmation arrived in time.",
		}, []string{"server"}),
		Ignored: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "walship_confirmations_ignored_total",
			Help: "Archived events ignored because they do not match the pending file (reason sha256 or dest) or cannot be decoded (undecodable).",
		}, []string{"server", "reason"}),
	}
	m.Damaged = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "walship_spool_damaged_total",
		Help: "Spool files found damaged at start-up (wrong size or checksum): streamed again when the server still has their WAL.",
	}, []string{"server"})
	m.RangesCut = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "walship_partial_ranges_cut_total",
		Help: "Ranges of the segment being written cut for upload before the segment is complete (--partial-interval).",
	}, []string{"server"})
	m.PendingFiles = g("walship_spool_pending_files", "WAL files in the spool the bucket is not yet known to hold (segments, ended-timeline segments, history files, ranges).")
	m.SlotWALStatus = prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Name: "walship_slot_wal_status", Help: "1 for the replication slot's current wal_status (reserved, extended, unreserved, lost), 0 for the others.",
	}, []string{"server", "wal_status"})
	m.SlotSafeWALSize = g("walship_slot_safe_wal_size_bytes", "WAL that can still be written before PostgreSQL invalidates the slot (safe_wal_size), in bytes; absent without max_slot_wal_keep_size.")
	m.SlotRetained = g("walship_slot_retained_bytes", "WAL the slot holds on the server: current WAL position minus restart_lsn, in bytes.")
	m.SlotExists = g("walship_slot_exists", "1 when the replication slot exists on the server.")
	m.Standby = g("walship_receiver_standby", "1 while this receiver waits for a slot another receiver streams.")
	m.SlotSafeWALLow = g("walship_slot_safe_wal_size_low", "1 while safe_wal_size is under the --safe-wal-size-warn threshold.")
	reg.MustRegister(m.SlotWALStatus, m.SlotSafeWALSize, m.SlotRetained, m.SlotExists, m.Standby, m.SlotSafeWALLow)
	reg.MustRegister(m.ServerLSN, m.ReceivedLSN, m.WrittenLSN, m.PublishedLSN, m.ArchivedLSN, m.FlushLSN,
		m.LagBytes, m.LagSeconds, m.Connected, m.Timeline, m.SpoolBytes, m.Segments, m.Bytes, m.Errors, m.Republished,
		m.Ignored, m.PendingFiles, m.Damaged, m.RangesCut)
	return m
}
