package pipeline

import (
	"encoding/json"
	"fmt"
)

// MarshalJSON writes the LSN in PostgreSQL's notation, so events are
// readable next to pg_stat_replication.
func (l LSN) MarshalJSON() ([]byte, error) { return json.Marshal(l.String()) }

// UnmarshalJSON reads PostgreSQL's notation.
func (l *LSN) UnmarshalJSON(b []byte) error {
	var s string
	if err := json.Unmarshal(b, &s); err != nil {
		return fmt.Errorf("lsn: %w", err)
	}
	v, err := ParseLSN(s)
	if err != nil {
		return err
	}
	*l = v
	return nil
}
