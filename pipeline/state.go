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

// ProcessState is what a walship process (run, receive, archive) records
// about itself every few seconds in the WALSHIP_PROCESSES key-value
// bucket, whose entries expire: `walship status` shows from any host which
// processes run and whether they can reach NATS and the bucket.
type ProcessState struct {
	V            int               `json:"v"`
	Role         string            `json:"role"` // run, receive, archive
	Host         string            `json:"host"`
	PID          int               `json:"pid"`
	Version      string            `json:"version,omitempty"`
	Ready        bool              `json:"ready"`
	NotReady     string            `json:"not_ready,omitempty"` // why not: /readyz's reason
	Dependencies []DependencyState `json:"dependencies"`
	Updated      time.Time         `json:"updated"`
}

// DependencyState is whether a process can use a service it needs now.
type DependencyState struct {
	Name  string    `json:"name"` // nats, s3
	Up    bool      `json:"up"`
	Error string    `json:"error,omitempty"` // why not
	Since time.Time `json:"since"`           // of the last change
}
