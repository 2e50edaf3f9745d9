// Package receiver streams WAL from PostgreSQL over the physical
// replication protocol into a local spool, publishes each completed segment
// to the archivers, and reports to PostgreSQL as flushed only what the
// archivers have confirmed: the replication slot never advances past WAL
// that is not in the bucket.
package receiver

import (
	"context"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgproto3"
	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/sync/errgroup"

	"github.com/walship/walship/internal/backoff"
	"github.com/walship/walship/internal/ratelog"
	"github.com/walship/walship/pipeline"
)

// Publisher stages a WAL file and announces it to the archivers. Both
// calls block until NATS has acknowledged; the receiver retries on error.
type Publisher interface {
	PutObject(ctx context.Context, name string, r io.Reader) error
	PublishSegment(ctx context.Context, ev *pipeline.SegmentEvent) error
}

// Confirmations delivers archived events for one server: those stored since
// the given time, then new ones, until ctx is done.
type Confirmations interface {
	WatchArchived(ctx context.Context, server string, since time.Time, fn func(pipeline.ArchivedEvent)) error
}

// StateRecorder is an optional capability of a Publisher: it records the
// receiver's positions where `walship status` can read them.
type StateRecorder interface {
	PutState(ctx context.Context, server string, state []byte) error
}

// Config configures a receiver.
type Config struct {
	ConnString     string        // libpq connection string
	AppName        string        // application_name, shown in pg_stat_replication
	Slot           string        // physical replication slot
	CreateSlot     bool          // create the slot when missing
	Server         string        // server name; "" derives it from the system identifier
	SpoolDir       string        // the server's spool goes in a subdirectory named after it
	StatusInterval time.Duration // standby status update interval
	RepublishAfter time.Duration // publish a segment again when unconfirmed this long
	StageObjects   bool          // put segment bytes in the object store (false: archivers read the spool)
	Standby        bool          // wait while the slot is streamed elsewhere, then take over
	Synchronous    bool          // fsync and report write at once when caught up (synchronous_commit = remote_write)
	SafeWALWarn    int64         // warn when the slot's safe_wal_size falls under this many bytes (0: never)
	Log            *slog.Logger
	Metrics        *Metrics
}

// Receiver is one PostgreSQL server's WAL receiver.
type Receiver struct {
	cfg  Config
	pub  Publisher
	conf Confirmations
	log  *slog.Logger
	rl   *ratelog.Limiter

	// Known after the first connection.
	sysID  string
	tli    uint32
	size   pipeline.SegmentSize
	server string
	spool  *spool
	tr     *tracker
	start  pipeline.LSN // where the first session starts
	resume pipeline.LSN // where the next session starts (segment-aligned on use)
	m      gauges

	serverEnd pipeline.LSN  // owned by the replication loop
	received  atomic.Uint64 // end of WAL received; read by housekeeping
	serverLSN atomic.Uint64 // serverEnd, for housekeeping
	written   atomic.Uint64 // spool fsync position, for housekeeping
	connected atomic.Bool
	standby   atomic.Bool
	curTLI    atomic.Uint32 // r.tli, for housekeeping
}

// New builds a receiver.
func New(cfg Config, pub Publisher, conf Confirmations) *Receiver {
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.DiscardHandler)
	}
	if cfg.Metrics == nil {
		cfg.Metrics = NewMetrics(prometheus.NewRegistry())
	}
	if cfg.StatusInterval <= 0 {
		cfg.StatusInterval = 10 * time.Second
	}
	if cfg.RepublishAfter <= 0 {
		cfg.RepublishAfter = 5 * time.Minute
	}
	return &Receiver{cfg: cfg, pub: pub, conf: conf, log: cfg.Log, rl: ratelog.New(cfg.Log, 30*time.Second)}
}

// Server is the server name, known once Run has connected.
func (r *Receiver) Server() string { return r.server }

// Run streams until ctx is done or a fatal error. It reconnects with capped
// back-off when the connection drops after a successful start; a failure
// before the first successful start is returned, so a misconfiguration
// exits at once with its reason.
//
// With Config.Standby, a slot streamed by another receiver is not an error:
// Run waits, reporting standby, and takes over when the slot is released.
func (r *Receiver) Run(ctx context.Context) error {
	for {
		if r.cfg.Standby {
			if err := r.awaitSlot(ctx); err != nil {
				return err
			}
		}
		err := r.runOnce(ctx)
		if r.cfg.Standby && errors.Is(err, ErrSlotActive) && ctx.Err() == nil {
			continue // lost the race for the slot: wait again
		}
		return err
	}
}

// awaitSlot waits while another connection streams the slot.
func (r *Receiver) awaitSlot(ctx context.Context) error {
	logged := false
	for {
		slot, err := r.querySlot(ctx)
		if err != nil {
			return err
		}
		if slot.ActivePID == 0 {
			r.setStandby(false)
			return nil
		}
		r.setStandby(true)
		if !logged {
			r.log.Info("standby: the slot is streamed by another connection; waiting to take over", "slot", r.cfg.Slot, "pid", slot.ActivePID)
			logged = true
		}
		if !backoff.Sleep(ctx, time.Second) {
			return ctx.Err()
		}
	}
}

func (r *Receiver) setStandby(on bool) {
	r.standby.Store(on)
	v := 0.0
	if on {
		v = 1
	}
	r.cfg.Metrics.Standby.WithLabelValues(r.cfg.Server).Set(v)
}

func (r *Receiver) runOnce(ctx context.Context) error {
	conn, err := r.prepare(ctx)
	if err != nil {
		return err
	}
	defer r.spool.unlock()
	bgCtx, stopBg := context.WithCancel(ctx)
	defer stopBg()
	bg, bgCtx := errgroup.WithContext(bgCtx)
	bg.Go(func() error { return r.publishLoop(bgCtx) })
	bg.Go(func() error {
		return r.conf.WatchArchived(bgCtx, r.server, time.Now().Add(-10*time.Minute), r.onArchived)
	})
	bg.Go(func() error { return r.housekeeping(bgCtx) })
	bg.Go(func() error { return r.slotPoll(bgCtx, time.Second) })

	err = r.streamLoop(ctx, conn)
	r.m.connected.Set(0)
	r.spool.closeCurrent()
	stopBg()
	bgErr := bg.Wait()
	if err == nil && bgErr != nil && ctx.Err() == nil {
		err = bgErr
	}
	return err
}

func (r *Receiver) streamLoop(ctx context.Context, conn *pgconn.PgConn) error {
	bo := backoff.New(time.Second, 30*time.Second)
	first := true
	for {
		began := time.Now()
		err := r.stream(ctx, conn, first)
		if errors.Is(err, errTimelineSwitched) && ctx.Err() == nil {
			first = false
			continue // same connection, new timeline
		}
		closeConn(conn)
		if ctx.Err() != nil {
			return nil
		}
		if first && err != nil && (errors.Is(err, ErrSlotActive) || errors.Is(err, ErrFatal)) {
			return err
		}
		if errors.Is(err, ErrFatal) {
			return err
		}
		first = false
		r.m.errors.WithLabelValues("receive").Inc()
		r.log.Warn("replication stream ended; reconnecting", "server", r.server, "error", err)
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
			if errors.Is(err, ErrFatal) {
				return err
			}
			r.rl.Warn("reconnect", "cannot reconnect to PostgreSQL; retrying", "server", r.server, "error", err)
		}
		r.rl.Reset("reconnect")
	}
}

func closeConn(conn *pgconn.PgConn) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	conn.Close(ctx)
}

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
	id, err := pglogrepl.IdentifySystem(ctx, conn)
	if err != nil {
		closeConn(conn)
		return nil, id, fmt.Errorf("identify system: %w", err)
	}
	return conn, id, nil
}

// prepare makes the first connection: identity, segment size, slot, spool
// and start position.
func (r *Receiver) prepare(ctx context.Context) (*pgconn.PgConn, error) {
	conn, id, err := r.identify(ctx)
	if err != nil {
		return nil, err
	}
	ok := false
	defer func() {
		if !ok {
			closeConn(conn)
			if r.spool != nil {
				r.spool.unlock()
			}
		}
	}()
	r.sysID = id.SystemID
	r.tli = uint32(id.Timeline)
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
	}

	slot, err := r.slotState(ctx, conn)
	if err != nil {
		return nil, err
	}
	if r.spool, err = newSpool(filepath.Join(r.cfg.SpoolDir, r.server), r.size); err != nil {
		return nil, fatalf("%v: fix --spool-dir", err)
	}
	if err := r.spool.lock(); err != nil {
		return nil, fmt.Errorf("%w: %v", ErrSlotActive, err)
	}
	if err := r.plan(slot, pipeline.LSN(id.XLogPos)); err != nil {
		return nil, err
	}
	r.m.timeline.Set(float64(r.tli))
	r.curTLI.Store(r.tli)
	r.log.Info("receiver ready", "system_id", r.sysID, "timeline", r.tli, "segment_size", uint64(r.size),
		"slot", r.cfg.Slot, "lsn", r.start.String(), "segment", pipeline.SegmentOf(r.tli, r.start, r.size).Name(r.size))
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
		if err := CreateSlot(ctx, conn, r.cfg.Slot, true); err != nil {
			return slot, fatalf("%v", err)
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
		// pg_replication_slots tells which.
		if slot.WALStatus == "" {
			q, err := r.querySlot(ctx)
			if err != nil {
				return slot, err
			}
			slot.WALStatus = q.WALStatus
		}
		if slot.WALStatus == "lost" {
			return slot, r.lostError()
		}
	}
	return slot, nil
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

// plan decides where streaming starts and what the spool still owes the
// archive. Complete spool segments wholly before the slot's restart_lsn
// are archived (the slot moves only after archiving) and are removed; the
// others, and ended-timeline segments and history files, are published
// again. Streaming starts on the slot's timeline at the later of the
// slot's segment and the end of the newest complete spool segment, always
// on a segment boundary, so a .partial is streamed again from its start.
func (r *Receiver) plan(slot SlotState, serverPos pipeline.LSN) error {
	restart := slot.RestartLSN
	if restart == 0 {
		restart = serverPos
	}
	if slot.Timeline != 0 && slot.Timeline < r.tli {
		// The slot still holds WAL of an older timeline: stream it from
		// there; the server ends that timeline and walship follows.
		r.tli = slot.Timeline
	}
	r.start = r.size.Start(restart)
	_, complete, err := r.spool.scan()
	if err != nil {
		return err
	}
	var keep []pipeline.Segment
	for _, seg := range complete {
		if seg.EndLSN(r.size) <= restart {
			r.spool.remove(seg)
			continue
		}
		keep = append(keep, seg)
		if seg.Timeline >= r.tli && seg.EndLSN(r.size) > r.start {
			r.tli, r.start = seg.Timeline, seg.EndLSN(r.size)
		}
	}
	first := pipeline.SegmentOf(r.tli, r.start, r.size)
	for _, seg := range keep {
		if seg.Timeline == r.tli && seg.No < first.No {
			first = seg
		}
	}
	r.tr = newTracker(r.size, first, slot.RestartLSN)
	for _, seg := range keep {
		path := r.spool.path(seg)
		sum, n, err := hashFile(path)
		if err != nil {
			return fmt.Errorf("spool segment %s: %w", seg.Name(r.size), err)
		}
		if n != int64(r.size) {
			r.log.Warn("spool segment has the wrong size; it will be streamed again", "segment", seg.Name(r.size), "bytes", n)
			r.spool.remove(seg)
			continue
		}
		if fi, err := os.Stat(path); err == nil {
			r.tr.seen(seg, fi.ModTime())
		}
		r.tr.add(r.event(seg, sum))
	}
	ended, histories, err := r.spool.ended()
	if err != nil {
		return err
	}
	for _, h := range histories {
		data, err := os.ReadFile(filepath.Join(r.spool.dir, h))
		if err != nil {
			return err
		}
		var tli uint32
		fmt.Sscanf(h, "%08X.history", &tli)
		r.tr.add(r.historyEvent(tli, filepath.Join(r.spool.dir, h), data))
	}
	for _, seg := range ended {
		path := r.spool.path(seg) + endedSuffix
		sum, _, err := hashFile(path)
		if err != nil {
			return err
		}
		r.tr.add(r.partialEvent(completed{seg: seg, path: path, sha256: sum}, 0))
	}
	r.resume = r.start
	r.received.Store(uint64(r.start))
	return nil
}

func (r *Receiver) event(seg pipeline.Segment, sum string) pipeline.SegmentEvent {
	name := seg.Name(r.size)
	ev := pipeline.SegmentEvent{
		V: pipeline.EventVersion, Server: r.server, SystemID: r.sysID, Timeline: seg.Timeline,
		File: name, Kind: pipeline.KindSegment,
		StartLSN: seg.StartLSN(r.size), EndLSN: seg.EndLSN(r.size),
		Size: int64(r.size), SegSize: uint64(r.size), SHA256: sum,
		Spool: r.spool.path(seg),
	}
	if r.cfg.StageObjects {
		ev.Object = r.server + "/" + name
	}
	return ev
}

// partialEvent announces the last segment of an ended timeline, archived
// as <segment>.partial. end is the switch point (0 when unknown, after a
// restart).
func (r *Receiver) partialEvent(c completed, end pipeline.LSN) pipeline.SegmentEvent {
	ev := r.event(c.seg, c.sha256)
	ev.Kind = pipeline.KindPartial
	ev.Spool = c.path
	if end != 0 {
		ev.EndLSN = end
	}
	if r.cfg.StageObjects {
		ev.Object = r.server + "/" + ev.File + ".partial"
	}
	return ev
}

// historyEvent announces a timeline history file.
func (r *Receiver) historyEvent(tli uint32, path string, data []byte) pipeline.SegmentEvent {
	sum := sha256.Sum256(data)
	ev := pipeline.SegmentEvent{
		V: pipeline.EventVersion, Server: r.server, SystemID: r.sysID, Timeline: tli,
		File: pipeline.HistoryFileName(tli), Kind: pipeline.KindHistory,
		Size: int64(len(data)), SegSize: uint64(r.size), SHA256: pipeline.SHA256Hex(sum[:]), Spool: path,
	}
	if r.cfg.StageObjects {
		ev.Object = r.server + "/" + ev.File
	}
	return ev
}

// switchTimeline follows the server to the next timeline: it archives the
// new timeline's history file and the old timeline's last segment (as
// .partial), and moves the watermark to the new timeline. Streaming
// resumes at the start of the segment that holds the switch point, on the
// new timeline, whose first bytes are the old timeline's.
func (r *Receiver) switchTimeline(ctx context.Context, conn *pgconn.PgConn, next uint32, at pipeline.LSN) error {
	if next <= r.tli {
		return fmt.Errorf("server ended timeline %d and named timeline %d next", r.tli, next)
	}
	hist, err := pglogrepl.TimelineHistory(ctx, conn, int32(next))
	if err != nil {
		return fmt.Errorf("timeline history %d: %w", next, err)
	}
	path, err := r.spool.writeFile(pipeline.HistoryFileName(next), hist.Content)
	if err != nil {
		return fatalf("%v", err)
	}
	r.tr.add(r.historyEvent(next, path, hist.Content))
	if r.spool.f != nil && r.spool.written > r.spool.seg.StartLSN(r.size) {
		c, err := r.spool.endTimeline(at)
		if err != nil {
			return err
		}
		r.tr.add(r.partialEvent(c, at))
	} else if r.spool.f != nil {
		// The timeline ended on a segment boundary: no partial segment.
		r.spool.discardCurrent()
	}
	r.log.Info("timeline switch", "timeline", next, "previous_timeline", r.tli, "lsn", at.String())
	r.tli = next
	r.curTLI.Store(next)
	r.resume = r.size.Start(at)
	r.tr.switchTimeline(pipeline.SegmentOf(next, at, r.size))
	r.m.timeline.Set(float64(next))
	return nil
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
	if uint32(id.Timeline) < r.tli {
		closeConn(conn)
		return nil, fatalf("server is on timeline %d, older than the %d walship streamed: is this another server? point walship at the right one", id.Timeline, r.tli)
	}
	// A newer timeline is fine: streaming resumes on the old one and the
	// server ends it at the switch point, which walship follows.
	if err := r.checkSlotLost(ctx, conn); err != nil {
		closeConn(conn)
		return nil, err
	}
	return conn, nil
}

// checkSlotLost stops the receiver when PostgreSQL has invalidated the slot.
func (r *Receiver) checkSlotLost(ctx context.Context, conn *pgconn.PgConn) error {
	slot, err := r.readSlot(ctx, conn)
	if err != nil {
		return err
	}
	if !slot.Exists {
		return fatalf("replication slot %q disappeared: someone dropped it; the archive may have a gap: take a new base backup, then recreate the slot with 'walship slot create --recreate'", r.cfg.Slot)
	}
	if slot.RestartLSN == 0 {
		q, err := r.querySlot(ctx)
		if err == nil && q.WALStatus == "lost" {
			return r.lostError()
		}
	}
	return nil
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

// recvDeadline is the receive loop's deadline context. One serves many
// messages: a new context (and timer) only when it has passed or a status
// update falls due before it, not one per WAL message.
type recvDeadline struct {
	ctx    context.Context
	cancel context.CancelFunc
	at     time.Time
}

// get returns a context that ends at the next status update or within
// 200 ms, whichever is first, so flush changes are noticed promptly.
func (d *recvDeadline) get(parent context.Context, nextStatus time.Time) context.Context {
	if d.ctx == nil || d.ctx.Err() != nil || nextStatus.Before(d.at) {
		d.stop()
		d.at = time.Now().Add(min(time.Until(nextStatus), 200*time.Millisecond))
		d.ctx, d.cancel = context.WithDeadline(parent, d.at)
	}
	return d.ctx
}

func (d *recvDeadline) stop() {
	if d.cancel != nil {
		d.cancel()
	}
}

// errServerStopping ends a session whose walsender is shutting down.
var errServerStopping = errors.New("server shutting down")

// shutdownDetector recognises a walsender in shutdown: it has sent
// everything and asks for replies again and again, waiting for a flush
// position that only archiving moves.
type shutdownDetector struct {
	pings []time.Time
}

func (d *shutdownDetector) ping(replyRequested bool, serverEnd, received, flush pipeline.LSN) bool {
	if !replyRequested || serverEnd > received || flush >= received {
		d.pings = d.pings[:0]
		return false
	}
	now := time.Now()
	d.pings = append(d.pings, now)
	for len(d.pings) > 0 && now.Sub(d.pings[0]) > time.Second {
		d.pings = d.pings[1:]
	}
	return len(d.pings) >= 5
}

// errTimelineSwitched ends a session after a timeline switch; the next one
// starts at once on the new timeline.
var errTimelineSwitched = errors.New("timeline switched")

// stream runs one START_REPLICATION session until it ends or ctx is done.
// It resumes at the start of the segment holding the first byte not yet in
// the spool.
func (r *Receiver) stream(ctx context.Context, conn *pgconn.PgConn, first bool) error {
	start := r.size.Start(r.resume)
	if !first && r.spool.f != nil {
		start = r.size.Start(r.spool.written)
	}
	err := pglogrepl.StartReplication(ctx, conn, r.cfg.Slot, pglogrepl.LSN(start),
		pglogrepl.StartReplicationOptions{Timeline: int32(r.tli), Mode: pglogrepl.PhysicalReplication})
	if tli, at, ok := pglogrepl.IsErrEndTimeline(err); ok {
		// Nothing left on this timeline from here: it ended at or before start.
		if err := r.switchTimeline(ctx, conn, uint32(tli), pipeline.LSN(at)); err != nil {
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
		return fmt.Errorf("start replication at %s: %w", r.size.Start(start), err)
	}
	// Always restart at a segment boundary: the spool segment is rewritten
	// from its first byte, so its SHA-256 covers the whole segment.
	if err := r.spool.open(pipeline.SegmentOf(r.tli, start, r.size)); err != nil {
		return fatalf("%v", err)
	}
	r.received.Store(uint64(r.spool.written))
	r.m.connected.Set(1)
	r.connected.Store(true)
	defer func() { r.m.connected.Set(0); r.connected.Store(false) }()
	r.log.Info("streaming", "lsn", r.spool.written.String(), "timeline", r.tli)

	var sentFlush pipeline.LSN
	var stopping shutdownDetector
	var rd recvDeadline
	defer rd.stop()
	nextStatus := time.Now()
	status := func() error {
		if err := r.spool.sync(); err != nil {
			return fatalf("%v", err)
		}
		flush := pipeline.LSN(r.tr.flush.Load())
		err := pglogrepl.SendStandbyStatusUpdate(ctx, conn, pglogrepl.StandbyStatusUpdate{
			WALWritePosition: pglogrepl.LSN(r.spool.synced),
			WALFlushPosition: pglogrepl.LSN(flush),
			WALApplyPosition: pglogrepl.LSN(flush),
			ClientTime:       time.Now(),
		})
		if err != nil {
			return fmt.Errorf("send standby status: %w", err)
		}
		sentFlush = flush
		nextStatus = time.Now().Add(r.cfg.StatusInterval)
		r.written.Store(uint64(r.spool.synced))
		r.m.written.Set(float64(r.spool.synced))
		r.m.flush.Set(float64(flush))
		return nil
	}
	for {
		if ctx.Err() != nil {
			// Last word to the server: everything fsynced, the current flush.
			return status()
		}
		if pipeline.LSN(r.tr.flush.Load()) != sentFlush || !time.Now().Before(nextStatus) {
			if err := status(); err != nil {
				return err
			}
		}
		msg, err := conn.ReceiveMessage(rd.get(ctx, nextStatus))
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
				if stopping.ping(ka.ReplyRequested, pipeline.LSN(ka.ServerWALEnd), r.spool.written, pipeline.LSN(r.tr.flush.Load())) {
					// A shutting-down walsender waits for flush to reach
					// the end of WAL, which walship reports only once it is
					// archived: let go, so PostgreSQL can stop, and come back.
					r.log.Info("server is shutting down; disconnecting so it can", "lsn", r.spool.written.String())
					status()
					return errServerStopping
				}
				r.serverLSN.Store(uint64(r.serverEnd))
				if ka.ReplyRequested {
					if err := status(); err != nil {
						return err
					}
				}
			case pglogrepl.XLogDataByteID:
				xld, err := pglogrepl.ParseXLogData(msg.Data[1:])
				if err != nil {
					return fmt.Errorf("parse xlogdata: %w", err)
				}
				if err := r.onWAL(pipeline.LSN(xld.WALStart), xld.WALData, pipeline.LSN(xld.ServerWALEnd)); err != nil {
					return err
				}
				// Synchronous: once caught up with the server, fsync and
				// report at once, so a remote_write commit waits only for this.
				if r.cfg.Synchronous && pipeline.LSN(xld.WALStart)+pipeline.LSN(len(xld.WALData)) >= pipeline.LSN(xld.ServerWALEnd) {
					if err := status(); err != nil {
						return err
					}
				}
			}
		case *pgproto3.CopyDone:
			// The server ended this timeline (a promotion); it tells the
			// next one and where it starts.
			if err := status(); err != nil {
				return err
			}
			cdr, err := pglogrepl.SendStandbyCopyDone(ctx, conn)
			if err != nil {
				return fmt.Errorf("end of timeline %d: %w", r.tli, err)
			}
			if cdr == nil {
				return fmt.Errorf("server ended the stream on timeline %d without naming the next timeline", r.tli)
			}
			if err := r.switchTimeline(ctx, conn, uint32(cdr.Timeline), pipeline.LSN(cdr.LSN)); err != nil {
				return err
			}
			return errTimelineSwitched
		case *pgproto3.ErrorResponse:
			return fmt.Errorf("replication stream: %w", pgconn.ErrorResponseToPgError(msg))
		}
	}
}

// onWAL writes received WAL to the spool. data is only valid until the
// next receive, and is consumed here.
func (r *Receiver) onWAL(at pipeline.LSN, data []byte, serverEnd pipeline.LSN) error {
	if len(data) == 0 {
		return nil
	}
	seg := pipeline.SegmentOf(r.tli, at, r.size)
	if r.size.Offset(at) == 0 {
		r.tr.seen(seg, time.Now())
	}
	if err := r.spool.write(at, data, r.onComplete); err != nil {
		return err
	}
	end := at + pipeline.LSN(len(data))
	r.received.Store(uint64(end))
	r.serverEnd = max(r.serverEnd, serverEnd)
	r.m.received.Set(float64(end))
	r.m.receivedBytes.Add(float64(len(data)))
	return nil
}

// onComplete hands a segment that is durable in the spool to the
// publisher. It never blocks: the publisher works from its own queue.
func (r *Receiver) onComplete(c completed) error {
	r.tr.add(r.event(c.seg, c.sha256))
	r.tr.seen(c.seg.Next(), time.Now())
	r.m.written.Set(float64(r.spool.synced))
	r.m.receivedSegs.Inc()
	r.log.Debug("segment complete", "segment", c.seg.Name(r.size))
	return nil
}

// publishLoop stages and announces segments in order, retrying each until
// NATS takes it or it is confirmed some other way.
func (r *Receiver) publishLoop(ctx context.Context) error {
	bo := backoff.New(250*time.Millisecond, 15*time.Second)
	for {
		ev, ok := r.tr.next(ctx)
		if !ok {
			return nil
		}
		for r.tr.isPending(ev) {
			err := r.publish(ctx, &ev)
			if err == nil {
				bo.Reset()
				r.rl.Reset("publish")
				r.tr.markPublished(ev, time.Now())
				r.m.publishedSegs.Inc()
				r.m.publishedBytes.Add(float64(ev.Size))
				break
			}
			if ctx.Err() != nil {
				return nil
			}
			if errors.Is(err, os.ErrNotExist) {
				break // confirmed meanwhile and removed from the spool
			}
			r.m.errors.WithLabelValues("publish").Inc()
			r.rl.Warn("publish", "cannot publish segment; retrying", "segment", ev.File, "error", err)
			if !bo.Wait(ctx) {
				return nil
			}
		}
	}
}

func (r *Receiver) publish(ctx context.Context, ev *pipeline.SegmentEvent) error {
	if ev.Object != "" {
		f, err := os.Open(ev.Spool)
		if err != nil {
			return err
		}
		err = r.pub.PutObject(ctx, ev.Object, f)
		f.Close()
		if err != nil {
			return err
		}
	}
	return r.pub.PublishSegment(ctx, ev)
}

func (r *Receiver) onArchived(ev pipeline.ArchivedEvent) {
	if ev.SystemID != r.sysID {
		return
	}
	if r.tr.confirm(ev) {
		r.log.Debug("flush moved", "lsn", pipeline.LSN(r.tr.flush.Load()).String())
	}
	r.m.archivedSegs.Inc()
}

// housekeeping republishes unconfirmed segments and refreshes the lag
// metrics and the shared state record.
func (r *Receiver) housekeeping(ctx context.Context) error {
	// The state record goes to NATS from its own goroutine, so an outage
	// never stalls the metrics.
	states := make(chan []byte, 1)
	var wg sync.WaitGroup
	defer wg.Wait()
	if sr, ok := r.pub.(StateRecorder); ok {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				select {
				case <-ctx.Done():
					return
				case st := <-states:
					if err := sr.PutState(ctx, r.server, st); err != nil {
						r.rl.Warn("state", "cannot record state", "error", err)
					}
				}
			}
		}()
	}
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	lastState := time.Time{}
	for {
		select {
		case <-ctx.Done():
			return nil
		case now := <-tick.C:
			if n := r.tr.requeueStale(now, r.cfg.RepublishAfter); n > 0 {
				r.m.republished.Add(float64(n))
				r.log.Warn("segments not confirmed in time; publishing them again", "count", n, "after", r.cfg.RepublishAfter.String())
			}
			published, archived, spoolBytes := r.tr.positions()
			flush := pipeline.LSN(r.tr.flush.Load())
			received := pipeline.LSN(r.received.Load())
			r.m.published.Set(float64(published))
			r.m.archived.Set(float64(archived))
			r.m.spoolBytes.Set(float64(spoolBytes))
			if received > flush {
				r.m.lagBytes.Set(float64(received - flush))
			} else {
				r.m.lagBytes.Set(0)
			}
			lagSecs := r.tr.lagSeconds(now, received)
			r.m.lagSeconds.Set(lagSecs)
			if now.Sub(lastState) >= r.cfg.StatusInterval {
				lastState = now
				st := pipeline.ServerState{V: 1, Server: r.server, SystemID: r.sysID, Slot: r.cfg.Slot, Timeline: r.curTLI.Load(),
					ServerLSN: pipeline.LSN(r.serverLSN.Load()), ReceivedLSN: received, WrittenLSN: pipeline.LSN(r.written.Load()),
					PublishedLSN: published, ArchivedLSN: archived, FlushLSN: flush,
					LagSeconds: lagSecs, Connected: r.connected.Load(), Standby: r.standby.Load(), Updated: now.UTC()}
				if received > flush {
					st.LagBytes = uint64(received - flush)
				}
				state, _ := json.Marshal(st)
				select {
				case states <- []byte(state):
				default: // the previous one is still on its way; skip this one
				}
			}
		}
	}
}

// gauges are the receiver's metric children for its server.
type gauges struct {
	server, received, written, published, archived, flush prometheus.Gauge
	lagBytes, lagSeconds, connected, timeline, spoolBytes prometheus.Gauge
	receivedSegs, publishedSegs, archivedSegs             prometheus.Counter
	receivedBytes, publishedBytes                         prometheus.Counter
	republished                                           prometheus.Counter
	errors                                                *prometheus.CounterVec
}

func newGauges(m *Metrics, server string) gauges {
	for _, stage := range []string{"receive", "publish"} {
		m.Errors.WithLabelValues(server, stage).Add(0)
	}
	m.Republished.WithLabelValues(server).Add(0)
	return gauges{
		server: m.ServerLSN.WithLabelValues(server), received: m.ReceivedLSN.WithLabelValues(server),
		written: m.WrittenLSN.WithLabelValues(server), published: m.PublishedLSN.WithLabelValues(server),
		archived: m.ArchivedLSN.WithLabelValues(server), flush: m.FlushLSN.WithLabelValues(server),
		lagBytes: m.LagBytes.WithLabelValues(server), lagSeconds: m.LagSeconds.WithLabelValues(server),
		connected: m.Connected.WithLabelValues(server), timeline: m.Timeline.WithLabelValues(server),
		spoolBytes:   m.SpoolBytes.WithLabelValues(server),
		receivedSegs: m.Segments.WithLabelValues(server, "received"), publishedSegs: m.Segments.WithLabelValues(server, "published"),
		archivedSegs:  m.Segments.WithLabelValues(server, "archived"),
		receivedBytes: m.Bytes.WithLabelValues(server, "received"), publishedBytes: m.Bytes.WithLabelValues(server, "published"),
		republished: m.Republished.WithLabelValues(server),
		errors:      m.Errors.MustCurryWith(prometheus.Labels{"server": server}),
	}
}
