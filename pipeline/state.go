package pipeline

import "time"

// ServerState is what a receiver records about its server in the
// WALSHIP_STATE key-value bucket every status interval, for `walship
// status` on any host.
type ServerState struct {
	V            int       `json:"v"`
	Server       string    `json:"server"`
	SystemID     string    `json:"system_id"`
	Slot         string    `json:"slot"`
	Timeline     uint32    `json:"timeline"`
	ServerLSN    LSN       `json:"server_lsn"`
	ReceivedLSN  LSN       `json:"received_lsn"`
	WrittenLSN   LSN       `json:"written_lsn"`
	PublishedLSN LSN       `json:"published_lsn"`
	ArchivedLSN  LSN       `json:"archived_lsn"`
	FlushLSN     LSN       `json:"flush_lsn"`
	LagBytes     uint64    `json:"lag_bytes"`
	LagSeconds   float64   `json:"lag_seconds"`
	Connected    bool      `json:"connected"`
	Standby      bool      `json:"standby"` // waiting for the slot held by another receiver
	Updated      time.Time `json:"updated"`
}
