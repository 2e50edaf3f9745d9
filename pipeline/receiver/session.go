package receiver

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgproto3"

	"github.com/walship/walship/internal/backoff"
	"github.com/walship/walship/pipeline"
)

// streamLoop runs replication sessions on conn, and on new connections
// after a drop, until ctx is done or a fatal error.
func (r *Receiver) streamLoop(ctx context.Context, conn *pgconn.PgConn) error {
	bo := backoff.New(time.Second, 30*time.Second)
	first := true
	for {
		began := time.Now()
		err := r.stream(ctx, conn)
		r.core.CloseSession()
		if errors.Is(err, errTimelineSwitched) && ctx.Err() == nil {
			first = false
			continue // same connection, new timeline
		}
		closeConn(conn)
		if ctx.Err() != nil {
			return nil
		}
		if first && errors.Is(err, ErrSlotActive) || errors.Is(err, ErrFatal) {
			return err
		}
		first = false
		r.m.errors.WithLabelValues("receive").Inc()
		r.log.Warn("replication stream ended; reconnecting", "error", err)
		if time.Since(began) > time.Minute {
			bo.Reset()
		}
		for {
			if !bo.Wait(ctx) {
				return nil
			}
			conn, err = r.reconnect(ctx)
			if err == nil {
				break
			}
			if errors.Is(err, ErrFatal) || errors.Is(err, errReplan) {
				return err
			}
			r.rl.Warn("reconnect", "cannot reconnect to PostgreSQL; retrying", "error", err)
		}
		r.rl.Reset("reconnect")
	}
}

func closeConn(conn *pgconn.PgConn) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	conn.Close(ctx)
}

// errTimelineSwitched ends a session after a timeline switch; the next one
// starts at once on the new timeline.
var errTimelineSwitched = errors.New("timeline switched")

// errServerStopping ends a session whose walsender is shutting down.
var errServerStopping = errors.New("server shutting down")

// stream runs one START_REPLICATION session until it ends or ctx is done.
// It starts where Core.Resume says: the start of the segment holding the
// first byte not yet complete in the spool.
func (r *Receiver) stream(ctx context.Context, conn *pgconn.PgConn) error {
	tli, start := r.core.Resume()
	err := pglogrepl.StartReplication(ctx, conn, r.cfg.Slot, pglogrepl.LSN(start),
		pglogrepl.StartReplicationOptions{Timeline: int32(tli), Mode: pglogrepl.PhysicalReplication})
	if next, at, ok := pglogrepl.IsErrEndTimeline(err); ok {
		// Nothing left on this timeline from here: it ended at or before start.
		if err := r.endTimeline(ctx, conn, uint32(next), pipeline.LSN(at)); err != nil {
			return err
		}
		return errTimelineSwitched
	}
	if err != nil {
		var pgErr *pgconn.PgError
		if errors.As(err, &pgErr) && pgErr.Code == "55006" {
			return fmt.Errorf("%w: replication slot %q: %s: another walship receiver or pg_receivewal is streaming it; stop it, choose another --slot, or pass --standby to take over when it stops", ErrSlotActive, r.cfg.Slot, pgErr.Message)
		}
		if errors.As(err, &pgErr) && pgErr.Code == "58P01" {
			return &fatalError{err: ErrSlotLost, msg: pgErr.Message + ": WAL the archive needs is gone from the server; take a new base backup and recreate the slot"}
		}
		return fmt.Errorf("start replication at %s on timeline %d: %w", start, tli, err)
	}
	if err := r.core.Open(start); err != nil {
		return err
	}
	r.received.Store(uint64(start))
	r.m.connected.Set(1)
	r.connected.Store(true)
	defer func() { r.m.connected.Set(0); r.connected.Store(false) }()
	r.log.Info("streaming", "lsn", start.String(), "timeline", tli)

	var sentFlush pipeline.LSN
	var stopping shutdownDetector
	rd := recvDeadline{poll: 200 * time.Millisecond}
	if r.cfg.Synchronous {
		// A synchronous_commit = on commit waits for flush: notice its
		// move within a few milliseconds, not 200.
		rd.poll = 25 * time.Millisecond
	}
	defer rd.stop()
	nextStatus := time.Now()
	nextCut := time.Now().Add(r.cfg.PartialInterval)
	status := func(ctx context.Context) error {
		write, flush, err := r.core.Status()
		if err != nil {
			return err
		}
		err = pglogrepl.SendStandbyStatusUpdate(ctx, conn, pglogrepl.StandbyStatusUpdate{
			WALWritePosition: pglogrepl.LSN(write),
			WALFlushPosition: pglogrepl.LSN(flush),
			WALApplyPosition: pglogrepl.LSN(flush),
			ClientTime:       time.Now(),
		})
		if err != nil {
			return fmt.Errorf("send standby status: %w", err)
		}
		sentFlush = flush
		nextStatus = time.Now().Add(r.cfg.StatusInterval)
		r.m.written.Set(float64(write))
		r.m.flush.Set(float64(flush))
		return nil
	}
	for {
		if ctx.Err() != nil {
			// Last word to the server: everything fsynced, the current flush.
			lctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
			defer cancel()
			return status(lctx)
		}
		if r.cfg.PartialInterval > 0 && !time.Now().Before(nextCut) {
			// Fsync (and report) first: a range holds only fsynced WAL.
			if err := status(ctx); err != nil {
				return err
			}
			// A range that cannot be written (a full disk: the segment is
			// preallocated, a range file is not) is tried again next
			// interval; streaming goes on, and the slot still holds its WAL.
			if err := r.core.CutRange(); err != nil {
				r.m.errors.WithLabelValues("range").Inc()
				r.rl.Warn("range", "cannot cut a range of the segment being written; trying again next interval (the slot still holds its WAL)", "error", err)
			} else {
				r.rl.Reset("range")
			}
			nextCut = time.Now().Add(r.cfg.PartialInterval)
		}
		if r.core.Flush() != sentFlush || !time.Now().Before(nextStatus) {
			if err := status(ctx); err != nil {
				return err
			}
		}
		wake := nextStatus
		if r.cfg.PartialInterval > 0 && nextCut.Before(wake) {
			wake = nextCut
		}
		msg, err := conn.ReceiveMessage(rd.get(ctx, wake))
		if err != nil {
			if pgconn.Timeout(err) || ctx.Err() != nil {
				continue
			}
			return fmt.Errorf("receive: %w", err)
		}
		switch msg := msg.(type) {
		case *pgproto3.CopyData:
			if len(msg.Data) == 0 {
				continue
			}
			switch msg.Data[0] {
			case pglogrepl.PrimaryKeepaliveMessageByteID:
				ka, err := pglogrepl.ParsePrimaryKeepaliveMessage(msg.Data[1:])
				if err != nil {
					return fmt.Errorf("parse keepalive: %w", err)
				}
				r.serverEnd = max(r.serverEnd, pipeline.LSN(ka.ServerWALEnd))
				r.m.server.Set(float64(r.serverEnd))
				received := pipeline.LSN(r.received.Load())
				if stopping.ping(time.Now(), ka.ReplyRequested, pipeline.LSN(ka.ServerWALEnd), received, r.core.Flush()) {
					// A shutting-down walsender waits for flush to reach
					// the end of WAL, which walship reports only once it is
					// archived: let go, so PostgreSQL can stop, and come back.
					r.log.Info("server is shutting down; disconnecting so it can", "lsn", received.String())
					status(ctx)
					return errServerStopping
				}
				r.serverLSN.Store(uint64(r.serverEnd))
				if ka.ReplyRequested {
					if err := status(ctx); err != nil {
						return err
					}
				}
			case pglogrepl.XLogDataByteID:
				xld, err := pglogrepl.ParseXLogData(msg.Data[1:])
				if err != nil {
					return fmt.Errorf("parse xlogdata: %w", err)
				}
				at := pipeline.LSN(xld.WALStart)
				if err := r.core.WAL(at, xld.WALData); err != nil {
					return err
				}
				end := at + pipeline.LSN(len(xld.WALData))
				r.received.Store(uint64(end))
				r.m.received.Set(float64(end))
				r.serverEnd = max(r.serverEnd, pipeline.LSN(xld.ServerWALEnd))
				// Synchronous: once caught up with the server, fsync and
				// report at once, so a remote_write commit waits only for this.
				if r.cfg.Synchronous && end >= pipeline.LSN(xld.ServerWALEnd) {
					if err := status(ctx); err != nil {
						return err
					}
				}
			}
		case *pgproto3.CopyDone:
			// The server ended this timeline (a promotion); it tells the
			// next one and where it starts.
			if err := status(ctx); err != nil {
				return err
			}
			cdr, err := pglogrepl.SendStandbyCopyDone(ctx, conn)
			if err != nil {
				return fmt.Errorf("end of timeline %d: %w", tli, err)
			}
			if cdr == nil {
				return fmt.Errorf("server ended the stream on timeline %d without naming the next timeline", tli)
			}
			if err := r.endTimeline(ctx, conn, uint32(cdr.Timeline), pipeline.LSN(cdr.LSN)); err != nil {
				return err
			}
			return errTimelineSwitched
		case *pgproto3.ErrorResponse:
			return fmt.Errorf("replication stream: %w", pgconn.ErrorResponseToPgError(msg))
		}
	}
}

// endTimeline reads the next timeline's history from the server and hands
// the switch to the Core.
func (r *Receiver) endTimeline(ctx context.Context, conn *pgconn.PgConn, next uint32, at pipeline.LSN) error {
	hist, err := pglogrepl.TimelineHistory(ctx, conn, int32(next))
	if err != nil {
		return fmt.Errorf("timeline history %d: %w", next, err)
	}
	return r.core.EndTimeline(next, at, hist.Content)
}

// recvDeadline is the receive loop's deadline context. One serves many
// messages: a new context (and timer) only when it has passed or a status
// update falls due before it, not one per WAL message.
type recvDeadline struct {
	ctx    context.Context
	cancel context.CancelFunc
	at     time.Time
	poll   time.Duration // the longest wait
}

// get returns a context that ends at the next status update or within
// poll (200 ms), whichever is first, so flush changes are noticed promptly.
func (d *recvDeadline) get(parent context.Context, nextStatus time.Time) context.Context {
	if d.ctx == nil || d.ctx.Err() != nil || nextStatus.Before(d.at) {
		d.stop()
		d.at = time.Now().Add(min(time.Until(nextStatus), d.poll))
		d.ctx, d.cancel = context.WithDeadline(parent, d.at)
	}
	return d.ctx
}

func (d *recvDeadline) stop() {
	if d.cancel != nil {
		d.cancel()
	}
}

// shutdownDetector recognises a walsender in shutdown: it has sent
// everything and asks for replies again and again, waiting for a flush
// position that only archiving moves.
type shutdownDetector struct {
	pings []time.Time
}

func (d *shutdownDetector) ping(now time.Time, replyRequested bool, serverEnd, received, flush pipeline.LSN) bool {
	if !replyRequested || serverEnd > received || flush >= received {
		d.pings = d.pings[:0]
		return false
	}
	d.pings = append(d.pings, now)
	for len(d.pings) > 0 && now.Sub(d.pings[0]) > time.Second {
		d.pings = d.pings[1:]
	}
	return len(d.pings) >= 5
}
