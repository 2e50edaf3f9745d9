package receiver

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/walship/walship/internal/fsutil"
	"github.com/walship/walship/internal/ratelog"
	"github.com/walship/walship/pipeline"
)

// identify opens a replication connection and reads the system identity.
func (r *Receiver) identify(ctx context.Context) (*pgconn.PgConn, pglogrepl.IdentifySystemResult, error) {
	cfg, err := ConnConfig(r.cfg.ConnString, r.cfg.AppName, "true")
	if err != nil {
		return nil, pglogrepl.IdentifySystemResult{}, err
	}
	conn, err := Connect(ctx, cfg)
	if err != nil {
		return nil, pglogrepl.IdentifySystemResult{}, err
	}
	if err := pipeline.SupportedPGMajor(serverMajor(conn)); err != nil {
		closeConn(conn)
		return nil, pglogrepl.IdentifySystemResult{}, fatalf("%v (server_version %q)", err, conn.ParameterStatus("server_version"))
	}
	id, err := pglogrepl.IdentifySystem(ctx, conn)
	if err != nil {
		closeConn(conn)
		return nil, id, fmt.Errorf("identify system: %w", err)
	}
	return conn, id, nil
}

// prepare makes the first connection: identity, segment size, slot, and
// the spool's plan (Core.Start).
func (r *Receiver) prepare(ctx context.Context) (*pgconn.PgConn, error) {
	conn, id, err := r.identify(ctx)
	if err != nil {
		return nil, err
	}
	ok := false
	defer func() {
		if !ok {
			closeConn(conn)
		}
	}()
	r.sysID = id.SystemID
	if r.size, err = SegmentSizeOf(ctx, conn); err != nil {
		return nil, err
	}
	r.server = r.cfg.Server
	if r.server == "" {
		r.server = "pg-" + r.sysID
	}
	if err := pipeline.ValidServerName(r.server); err != nil {
		return nil, fatalf("--server: %v", err)
	}
	r.m = newGauges(r.cfg.Metrics, r.server)
	if r.log == r.cfg.Log {
		r.log = r.log.With("server", r.server)
		r.rl = ratelog.New(r.log, 30*time.Second)
	}
	slot, err := r.slotState(ctx, conn)
	if err != nil {
		return nil, err
	}
	dir := filepath.Join(r.cfg.SpoolDir, r.server)
	core, err := NewCore(CoreConfig{
		Server: r.server, SystemID: r.sysID, Size: r.size, Dir: dir,
		StageObjects: r.cfg.StageObjects, StageURL: r.cfg.StageURL, Dest: r.cfg.Dest, PartialInterval: r.cfg.PartialInterval,
		Log: r.log, Metrics: r.cfg.Metrics,
	})
	if err != nil {
		if errors.Is(err, fsutil.ErrLocked) {
			return nil, fmt.Errorf("%w: %v", ErrSlotActive, err)
		}
		return nil, wrapFatal(err, "%v: fix --spool-dir", err)
	}
	history := func(tli uint32) ([]byte, error) {
		h, err := pglogrepl.TimelineHistory(ctx, conn, int32(tli))
		if err != nil {
			return nil, err
		}
		return h.Content, nil
	}
	if err := core.Start(StartInput{Slot: slot, ServerTLI: uint32(id.Timeline), ServerPos: pipeline.LSN(id.XLogPos), History: history}); err != nil {
		core.Release()
		return nil, err
	}
	// Start checks every spool file and may take a while: another
	// receiver may have taken the slot over and moved it meanwhile. This
	// plan would then be stale, and a flush reported below the slot would
	// move the slot back onto WAL the server may have removed.
	now, err := r.readSlot(ctx, conn)
	if err != nil {
		core.Release()
		return nil, err
	}
	if now.RestartLSN > core.Flush() {
		core.Release()
		return nil, fmt.Errorf("%w: restart_lsn %s moved past %s while the spool was checked", errReplan, now.RestartLSN, core.Flush())
	}
	r.core = core
	tli, start := core.Resume()
	r.received.Store(uint64(start))
	r.log.Info("receiver ready", "system_id", r.sysID, "timeline", tli, "segment_size", uint64(r.size),
		"slot", r.cfg.Slot, "lsn", start.String(), "segment", pipeline.SegmentOf(tli, start, r.size).Name(r.size),
		"pending_files", core.Positions().PendingFiles, "flush", core.Flush().String())
	if r.cfg.Dest == "" {
		r.log.Warn("no --dest given: confirmations from any destination are accepted; give the archivers' --dest to accept only theirs")
	}
	ok = true
	return conn, nil
}

// slotState reads the slot, creating it when allowed, and refuses slots
// walship cannot use.
func (r *Receiver) slotState(ctx context.Context, conn *pgconn.PgConn) (SlotState, error) {
	slot, err := r.readSlot(ctx, conn)
	if err != nil {
		return slot, err
	}
	if !slot.Exists {
		if !r.cfg.CreateSlot {
			return slot, fatalf("replication slot %q does not exist: create it with 'walship slot create --slot %s', or pass --create-slot", r.cfg.Slot, r.cfg.Slot)
		}
		// A new slot holds WAL from the moment it exists: make sure the
		// spool can take that WAL first, so that a spool walship cannot
		// write never leaves a slot behind filling the server's disk.
		if err := checkSpoolWritable(filepath.Join(r.cfg.SpoolDir, r.server)); err != nil {
			return slot, wrapFatal(err, "%v: fix --spool-dir (it must be writable by the user walship runs as); no replication slot was created", err)
		}
		if err := CreateSlot(ctx, conn, r.cfg.Slot, true); err != nil {
			return slot, wrapFatal(err, "%v", err)
		}
		r.log.Info("created replication slot", "slot", r.cfg.Slot)
		if slot, err = r.readSlot(ctx, conn); err != nil {
			return slot, err
		}
	}
	if !slot.Physical {
		return slot, fatalf("replication slot %q is a logical slot; walship needs a physical slot: choose another --slot", r.cfg.Slot)
	}
	if slot.RestartLSN == 0 {
		// NULL restart_lsn: never reserved, or invalidated. Only
		// pg_replication_slots tells which; when it cannot be read (a
		// pg_hba.conf that allows replication connections only), a NULL
		// restart_lsn is taken as lost: walship creates its slots with
		// RESERVE_WAL.
		if slot.WALStatus == "" {
			q, err := r.querySlot(ctx)
			if err != nil {
				r.log.Warn("cannot read pg_replication_slots to tell a lost slot from an unreserved one; taking it as lost", "error", err)
				q.WALStatus = "lost"
			}
			slot.WALStatus = q.WALStatus
		}
		if slot.WALStatus == "lost" {
			return slot, r.lostError()
		}
	}
	return slot, nil
}

// checkSpoolWritable creates the spool directory and writes, fsyncs and
// removes a file in it.
func checkSpoolWritable(dir string) error {
	if err := os.MkdirAll(dir, 0o750); err != nil {
		return fmt.Errorf("spool directory: %w", err)
	}
	probe := filepath.Join(dir, ".walship-write-probe")
	if err := fsutil.WriteFile(probe, []byte("walship\n"), 0o640); err != nil {
		return fmt.Errorf("spool directory %s is not writable: %w", dir, err)
	}
	if err := os.Remove(probe); err != nil {
		return fmt.Errorf("spool directory %s: %w", dir, err)
	}
	return nil
}

func (r *Receiver) readSlot(ctx context.Context, conn *pgconn.PgConn) (SlotState, error) {
	slot, ok, err := ReadSlot(ctx, conn, r.cfg.Slot)
	if err != nil {
		return slot, err
	}
	if ok {
		return slot, nil
	}
	return r.querySlot(ctx)
}

// querySlot asks pg_replication_slots over a normal connection.
func (r *Receiver) querySlot(ctx context.Context) (SlotState, error) {
	cfg, err := ConnConfig(r.cfg.ConnString, r.cfg.AppName, "")
	if err != nil {
		return SlotState{}, err
	}
	conn, err := Connect(ctx, cfg)
	if err != nil {
		return SlotState{}, err
	}
	defer closeConn(conn)
	return QuerySlot(ctx, conn, r.cfg.Slot)
}

// reconnect opens a new replication connection after a drop and checks it
// is still the same cluster.
func (r *Receiver) reconnect(ctx context.Context) (*pgconn.PgConn, error) {
	conn, id, err := r.identify(ctx)
	if err != nil {
		return nil, err
	}
	if id.SystemID != r.sysID {
		closeConn(conn)
		return nil, fatalf("server's system identifier changed from %s to %s: this is another cluster; point walship at a new --server or spool", r.sysID, id.SystemID)
	}
	if tli := r.core.Timeline(); uint32(id.Timeline) < tli {
		closeConn(conn)
		return nil, fatalf("server is on timeline %d, older than the %d walship streamed: is this another server? point walship at the right one", id.Timeline, tli)
	}
	// A newer timeline is fine: streaming resumes on the old one and the
	// server ends it at the switch point, which walship follows.
	slot, err := r.checkSlotLost(ctx, conn)
	if err != nil {
		closeConn(conn)
		return nil, err
	}
	if slot.RestartLSN > r.core.Flush() {
		// Someone else moved the slot while this receiver was away: another
		// receiver took over and released it, or an operator advanced it.
		// What this one knows is stale; plan again from the spool and slot.
		closeConn(conn)
		return nil, fmt.Errorf("%w: restart_lsn %s is past this receiver's flush %s", errReplan, slot.RestartLSN, r.core.Flush())
	}
	if r.core.ResumeBehind(slot.RestartLSN) {
		// Flush passed the segment being written (the bucket held it whole,
		// archived by an earlier life or another receiver): the server may
		// have removed it. Plan again from the spool and the slot.
		closeConn(conn)
		_, start := r.core.Resume()
		return nil, fmt.Errorf("%w: restart_lsn %s is past the segment this receiver would stream again from %s", errReplan, slot.RestartLSN, start)
	}
	return conn, nil
}

// errReplan ends a run whose view of the slot is stale; Run starts again
// from the spool and the slot.
var errReplan = errors.New("the slot moved elsewhere")

// checkSlotLost stops the receiver when PostgreSQL has invalidated the
// slot, and returns the slot's state.
func (r *Receiver) checkSlotLost(ctx context.Context, conn *pgconn.PgConn) (SlotState, error) {
	slot, err := r.readSlot(ctx, conn)
	if err != nil {
		return slot, err
	}
	if !slot.Exists {
		return slot, fatalf("replication slot %q disappeared: someone dropped it; the archive may have a gap: take a new base backup, then recreate the slot with 'walship slot create --recreate'", r.cfg.Slot)
	}
	if slot.RestartLSN == 0 {
		q, err := r.querySlot(ctx)
		if err == nil && q.WALStatus == "lost" {
			return slot, r.lostError()
		}
	}
	return slot, nil
}

func (r *Receiver) lostError() error {
	if r.server != "" {
		for _, st := range walStatuses {
			v := 0.0
			if st == "lost" {
				v = 1
			}
			r.cfg.Metrics.SlotWALStatus.WithLabelValues(r.server, st).Set(v)
		}
	}
	return &fatalError{err: ErrSlotLost, msg: fmt.Sprintf("PostgreSQL invalidated replication slot %q (wal_status = lost): WAL needed by the archive was removed, so the archive has a gap; take a new base backup, then run 'walship slot create --recreate' to record the gap and start again", r.cfg.Slot)}
}
