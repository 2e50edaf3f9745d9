package receiver

import (
	"context"
	"errors"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
	"github.com/prometheus/client_golang/prometheus"
)

// walStatuses are the values pg_replication_slots.wal_status can take.
var walStatuses = []string{"reserved", "extended", "unreserved", "lost"}

// slotPoll reads the slot's health every interval: wal_status,
// safe_wal_size and the WAL it retains, over a normal SQL connection. These
// are what warn before PostgreSQL invalidates the slot. When no SQL
// connection can be had (a pg_hba.conf that allows only replication
// connections), it reads the slot over a short replication connection
// every ten intervals instead (READ_REPLICATION_SLOT: a NULL restart_lsn
// is a lost slot), and says so; when neither works, every failure is
// counted (walship_errors_total{stage="slotpoll"}) and logged.
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
	for n := 0; ; n++ {
		var err error
		if conn == nil {
			var cfg *pgconn.Config
			if cfg, err = ConnConfig(r.cfg.ConnString, r.cfg.AppName+"-monitor", ""); err == nil {
				conn, err = Connect(ctx, cfg)
			}
		}
		if conn != nil {
			if err = r.pollOnce(ctx, conn, m); err != nil {
				closeConn(conn)
				conn = nil
			}
		}
		if err != nil && ctx.Err() == nil {
			if n%10 == 0 {
				if rerr := r.pollReplication(ctx, m); rerr != nil {
					r.m.errors.WithLabelValues("slotpoll").Inc()
					r.rl.Warn("slotpoll", "cannot read the slot's state, so a lost slot would go unnoticed until the next reconnect",
						"slot", r.cfg.Slot, "error", err, "replication_error", rerr)
				} else {
					r.rl.Warn("slotpoll-sql", "cannot read pg_replication_slots; watching the slot over a replication connection instead (no wal_status or safe_wal_size): allow walship a normal connection in pg_hba.conf",
						"slot", r.cfg.Slot, "error", err)
				}
			}
		} else {
			r.rl.Reset("slotpoll")
		}
		select {
		case <-ctx.Done():
			return nil
		case <-tick.C:
		}
	}
}

// pollReplication reads the slot with READ_REPLICATION_SLOT over a
// replication connection it opens and closes.
func (r *Receiver) pollReplication(ctx context.Context, m *Metrics) error {
	cfg, err := ConnConfig(r.cfg.ConnString, r.cfg.AppName+"-monitor", "true")
	if err != nil {
		return err
	}
	qctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	conn, err := Connect(qctx, cfg)
	if err != nil {
		return err
	}
	defer closeConn(conn)
	slot, ok, err := ReadSlot(qctx, conn, r.cfg.Slot)
	if err != nil {
		return err
	}
	if !ok {
		return errors.New("READ_REPLICATION_SLOT needs PostgreSQL 15 or later")
	}
	m.SlotExists.WithLabelValues(r.server).Set(b2f(slot.Exists))
	if slot.Exists && slot.RestartLSN == 0 {
		for _, s := range walStatuses {
			m.SlotWALStatus.With(prometheus.Labels{"server": r.server, "wal_status": s}).Set(b2f(s == "lost"))
		}
		r.rl.Error("slotlost", "PostgreSQL invalidated the replication slot (restart_lsn is NULL): the archive has a gap; take a new base backup", "slot", r.cfg.Slot)
	}
	return nil
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
