package backup

// EndsAfter reports whether backup c ends after backup o in the WAL: on a
// later timeline (PostgreSQL never reuses a lower timeline ID for a newer
// history), or later on the same one; the ID breaks a tie. This is the
// order of "newest": an ID and an end time are the backup host's clock,
// which may run ahead or behind, the WAL position is not.
func (c *Catalog) EndsAfter(o *Catalog) bool {
	if c.EndTimeline != o.EndTimeline {
		return c.EndTimeline > o.EndTimeline
	}
	if c.EndLSN != o.EndLSN {
		return c.EndLSN > o.EndLSN
	}
	return c.ID > o.ID
}
