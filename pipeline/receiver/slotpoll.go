package receiver

import (
	"context"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
	"github.com/prometheus/client_golang/prometheus"
)

// walStatuses are the values pg_replication_slots.wal_status can take.
var walStatuses = []string{"reserved", "extended", "unreserved", "lost"}

// slotPoll reads the slot's health over a normal SQL connection every
// interval: wal_status, safe_wal_size and the WAL it retains. These are
// what warn before PostgreSQL invalidates the slot.
func (r *Receiver) slotPoll(ctx context.Context, every time.Duration) error {
	m := r.cfg.Metrics
	var conn *pgconn.PgConn
	defer func() {
		if conn != nil {
			closeConn(conn)
		}
	}()
	tick := time.NewTicker(every)
	defer tick.Stop()
	for {
		if conn == nil {
			if cfg, err := ConnConfig(r.cfg.ConnString, r.cfg.AppName+"-monitor", ""); err == nil {
				conn, _ = Connect(ctx, cfg)
			}
		}
		if conn != nil {
			if err := r.pollOnce(ctx, conn, m); err != nil {
				r.rl.Warn("slotpoll", "cannot read the slot's state", "error", err)
				closeConn(conn)
				conn = nil
			}
		}
		select {
		case <-ctx.Done():
			return nil
		case <-tick.C:
		}
	}
}

func (r *Receiver) pollOnce(ctx context.Context, conn *pgconn.PgConn, m *Metrics) error {
	qctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	rr := conn.ExecParams(qctx, `
		SELECT coalesce(wal_status, ''), coalesce(safe_wal_size, -1)::text,
		       coalesce((CASE WHEN pg_is_in_recovery() THEN pg_last_wal_receive_lsn() ELSE pg_current_wal_lsn() END
		                 - restart_lsn), 0)::bigint::text
		  FROM pg_replication_slots WHERE slot_name = $1`,
		[][]byte{[]byte(r.cfg.Slot)}, nil, nil, nil)
	found := false
	for rr.NextRow() {
		found = true
		v := rr.Values()
		status := string(v[0])
		for _, s := range walStatuses {
			val := 0.0
			if s == status {
				val = 1
			}
			m.SlotWALStatus.With(prometheus.Labels{"server": r.server, "wal_status": s}).Set(val)
		}
		low := 0.0
		if safe := parseInt(string(v[1])); safe >= 0 {
			m.SlotSafeWALSize.WithLabelValues(r.server).Set(float64(safe))
			if r.cfg.SafeWALWarn > 0 && safe < r.cfg.SafeWALWarn && status != "lost" {
				low = 1
				r.rl.Warn("safewal", "the slot is close to invalidation: archive faster or raise max_slot_wal_keep_size",
					"slot", r.cfg.Slot, "safe_wal_size", safe, "threshold", r.cfg.SafeWALWarn)
			}
		}
		m.SlotSafeWALLow.WithLabelValues(r.server).Set(low)
		m.SlotRetained.WithLabelValues(r.server).Set(float64(parseInt(string(v[2]))))
		if status == "lost" {
			r.rl.Error("slotlost", "PostgreSQL invalidated the replication slot: the archive has a gap; take a new base backup", "slot", r.cfg.Slot)
		}
	}
	if _, err := rr.Close(); err != nil {
		return err
	}
	m.SlotExists.WithLabelValues(r.server).Set(b2f(found))
	return nil
}

func parseInt(s string) int64 {
	var n int64
	neg := false
	for i, c := range s {
		if i == 0 && c == '-' {
			neg = true
			continue
		}
		if c < '0' || c > '9' {
			break
		}
		n = n*10 + int64(c-'0')
	}
	if neg {
		return -n
	}
	return n
}

func b2f(b bool) float64 {
	if b {
		return 1
	}
	return 0
}
