package receiver

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"log/slog"
	"os"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/walship/walship/internal/ratelog"
	"github.com/walship/walship/pipeline"
)

// Core is one server's receiver state machine: the spool, the publish
// queue, the confirmations and the flush position, with no PostgreSQL or
// NATS connection of its own. The Receiver drives it from its replication
// connection and background loops; the deterministic simulation drives the
// same methods directly, step by step, with simulated neighbours.
//
// The replication-side methods (Start, Resume, Open, WAL, Status,
// EndTimeline, CloseSession) must be called from one goroutine; the others
// are safe to call concurrently with them.
type Core struct {
	cfg   CoreConfig
	spool *spool
	tr    *tracker
	tli   uint32 // timeline being streamed (or to stream next)
	// For other goroutines (housekeeping): the timeline and the end of the
	// WAL fsynced in the spool.
	tliSeen     atomic.Uint32
	writtenSeen atomic.Uint64
	since       time.Time
	rl          *ratelog.Limiter
	m           gauges
	// fileMu orders spool file life: a confirmation's removal and the
	// replication loop's writing of the same name (a file written again
	// after a restart) never interleave, so a removal never takes a newer
	// file than the one confirmed.
	fileMu sync.Mutex
	// done are the markers of archived segments (path by segment), removed
	// once flush passes them.
	done map[pipeline.Segment]string

	// Ranges (replication goroutine): the segment being cut and the end of
	// its last range; when the segment's first byte arrived; the last
	// arrival time noted for the lag; segments that may have ranges in the
	// bucket, whose whole event asks the archivers to delete them.
	cutSeg   pipeline.Segment
	cutEnd   pipeline.LSN
	segBegan time.Time
	lastMark time.Time
	ranged   map[pipeline.Segment]bool
	// rangedUpTo: every segment up to this number, which the server had
	// WAL in when this run started, may have ranges an earlier run (or
	// another receiver) cut.
	rangedUpTo uint64
}

// CoreConfig configures a Core.
type CoreConfig struct {
	Server   string
	SystemID string
	Size     pipeline.SegmentSize
	Dir      string // this server's spool directory
	FS       FS     // nil: the operating system's
	Now      func() time.Time
	// StageObjects puts segment bytes in the object store, for archivers
	// on other hosts; without it archivers read the spool path.
	StageObjects bool
	// StageURL, when set, is the base URL of this process's stage server
	// (--stage http): every event carries the URL of its spool file there,
	// and archivers on other hosts fetch the bytes from it.
	StageURL string
	// Dest is the destination confirmations must name (sinks.DestID);
	// empty accepts any.
	Dest string
	// Run names this run of the receiver in its events (see
	// pipeline.SegmentEvent.Run); empty: random.
	Run string
	// PartialInterval is how long a segment must have been written to
	// before CutRange uploads its WAL in ranges; 0: never (only whole
	// segments).
	PartialInterval time.Duration
	Log             *slog.Logger
	Metrics         *Metrics
}

// NewCore opens (creating it) and locks the server's spool directory.
func NewCore(cfg CoreConfig) (*Core, error) {
	if cfg.FS == nil {
		cfg.FS = OSFS{}
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.DiscardHandler)
	}
	if cfg.Metrics == nil {
		cfg.Metrics = NewMetrics(prometheus.NewRegistry())
	}
	if cfg.Run == "" {
		var b [6]byte
		rand.Read(b[:])
		cfg.Run = hex.EncodeToString(b[:])
	}
	sp, err := newSpool(cfg.FS, cfg.Dir, cfg.Size)
	if err != nil {
		return nil, err
	}
	if err := sp.lock(); err != nil {
		return nil, err
	}
	return &Core{cfg: cfg, spool: sp, rl: ratelog.New(cfg.Log, 30*time.Second), m: newGauges(cfg.Metrics, cfg.Server)}, nil
}

// Release closes the spool and its lock.
func (c *Core) Release() {
	c.spool.closeCurrent()
	c.spool.unlock()
}

// StartInput is what Start needs to know of the server.
type StartInput struct {
	Slot      SlotState
	ServerTLI uint32       // IDENTIFY_SYSTEM's timeline
	ServerPos pipeline.LSN // IDENTIFY_SYSTEM's position
	// History fetches timeline tli's history file from the server
	// (TIMELINE_HISTORY); nil when there is no server to ask.
	History func(tli uint32) ([]byte, error)
}

// Start checks the spool's files, plans them against the slot and the
// server (see makePlan), removes what is of no use, queues for publishing
// every file the bucket may not hold, and decides where streaming starts.
func (c *Core) Start(in StartInput) error {
	l, err := c.spool.list()
	if err != nil {
		return err
	}
	var serverHist []pipeline.HistoryEntry
	var serverData []byte
	if in.ServerTLI > 1 && in.History != nil {
		data, err := in.History(in.ServerTLI)
		if err != nil {
			return fmt.Errorf("timeline %d history: %w", in.ServerTLI, err)
		}
		serverData = data
		if serverHist, err = pipeline.ParseHistory(data); err != nil {
			return fmt.Errorf("timeline %d history from the server: %w", in.ServerTLI, err)
		}
	}
	for _, fs := range [][]spoolFile{l.complete, l.ended} {
		for i := range fs {
			c.check(&fs[i])
		}
	}
	for i := range l.histories {
		c.checkHistory(&l.histories[i], in.History)
	}
	p := makePlan(planInput{size: c.cfg.Size, slot: in.Slot, serverTLI: in.ServerTLI, serverPos: in.ServerPos,
		serverHistory: serverHist, spool: l})
	for _, f := range p.damaged {
		c.cfg.Log.Error("spool file damaged (its bytes are not what walship received); its WAL is streamed again if the server still has it",
			"file", f.name, "bytes", f.size)
		c.cfg.Metrics.Damaged.WithLabelValues(c.cfg.Server).Inc()
	}
	for _, name := range p.remove {
		if err := c.spool.remove(join(c.spool.dir, name)); err != nil {
			return fmt.Errorf("spool: remove %s: %w", name, err)
		}
	}
	c.tli = p.tli
	c.tliSeen.Store(c.tli)
	c.tr = newTracker(c.cfg.Size, p.floor, p.start, c.cfg.Dest)
	c.tr.setFrontierOn(p.tli, p.start)
	c.done = map[pipeline.Segment]string{}
	c.ranged = map[pipeline.Segment]bool{}
	c.rangedUpTo = uint64(max(in.ServerPos, in.Slot.RestartLSN)) / uint64(c.cfg.Size)
	c.cutSeg, c.cutEnd = pipeline.Segment{}, 0
	for _, f := range p.done {
		c.done[f.seg] = join(c.spool.dir, f.name)
	}
	c.since = c.cfg.Now()
	for _, f := range p.pending {
		c.addFound(f)
		c.since = minTime(c.since, f.info.ModTime)
	}
	if err := c.startRanges(l.ranges); err != nil {
		return err
	}
	if err := c.queueHistories(p.histories, l.histories, in.ServerTLI, serverData, in.History); err != nil {
		return err
	}
	// Confirmations are published after the file they confirm was written;
	// an hour covers clock differences between hosts. Older ones are not
	// needed: a file whose confirmation is not replayed is published again,
	// and the archivers find it in the bucket.
	c.since = c.since.Add(-time.Hour)
	c.m.timeline.Set(float64(c.tli))
	return nil
}

// queueHistories stores and queues the history files of the timelines the
// plan streams without seeing them begin (see needHistories), unless the
// spool holds them whole already (then they are queued as found), exactly
// as EndTimeline does: hold at the start of the segment holding the switch
// point. Each may be archived already (Attempt 1: the archivers look in the
// bucket first). serverData is the server's own timeline's history, fetched
// already; the others are fetched with fetch.
func (c *Core) queueHistories(need []timelineSwitch, found []spoolFile, serverTLI uint32, serverData []byte, fetch func(uint32) ([]byte, error)) error {
	have := map[uint32]bool{}
	for _, f := range found {
		if f.valid {
			have[f.tli] = true
		}
	}
	for _, n := range need {
		if have[n.tli] {
			continue
		}
		data := serverData
		if n.tli != serverTLI {
			if fetch == nil {
				return fmt.Errorf("timeline %d history: no server to ask", n.tli)
			}
			var err error
			if data, err = fetch(n.tli); err != nil {
				return fmt.Errorf("timeline %d history: %w", n.tli, err)
			}
		}
		hist, err := pipeline.ParseHistory(data)
		if err != nil {
			return fmt.Errorf("timeline %d history from the server: %w", n.tli, err)
		}
		if _, at, ok := pipeline.SwitchPoint(hist); !ok || at != n.at {
			return fmt.Errorf("timeline %d history says it began at %s; the server's line says %s", n.tli, at, n.at)
		}
		c.fileMu.Lock()
		path, err := c.spool.writeFile(pipeline.HistoryFileName(n.tli), data)
		if err == nil {
			ev := c.historyEvent(n.tli, path, data)
			ev.Attempt = 1
			c.add(ev, c.cfg.Size.Start(n.at))
		}
		c.fileMu.Unlock()
		if err != nil {
			return err
		}
		c.cfg.Log.Info("archiving the history of a timeline this run streams from its start", "timeline", n.tli, "lsn", n.at.String())
	}
	return nil
}

// check hashes a segment file found in the spool and tells whether it is
// whole: the segment's size, and the checksum its sidecar recorded when it
// was written (spools from before sidecars have none).
func (c *Core) check(f *spoolFile) {
	path := join(c.spool.dir, f.name)
	sum, n, err := hashFile(c.cfg.FS, path)
	if err != nil {
		return // unreadable: damaged
	}
	f.sum = sum
	f.valid = n == int64(c.cfg.Size)
	if f.hasSum {
		want, err := c.spool.readSum(path)
		f.valid = f.valid && err == nil && want == sum
	}
}

// checkHistory reads a history file found in the spool. The server's copy,
// when it can be had, is the truth: a damaged or different spool copy is
// replaced by it.
func (c *Core) checkHistory(f *spoolFile, fetch func(uint32) ([]byte, error)) {
	path := join(c.spool.dir, f.name)
	data, err := readAll(c.cfg.FS, path)
	if err == nil {
		f.sum = sha256Hex(data)
		_, perr := pipeline.ParseHistory(data)
		f.valid = perr == nil
		if f.hasSum {
			want, err := c.spool.readSum(path)
			f.valid = f.valid && err == nil && want == f.sum
		}
	}
	if fetch == nil {
		return
	}
	server, err := fetch(f.tli)
	if err != nil || string(server) == string(data) {
		return
	}
	if _, err := pipeline.ParseHistory(server); err != nil {
		return
	}
	if _, err := c.spool.writeFile(f.name, server); err != nil {
		return
	}
	c.cfg.Log.Warn("history file in the spool differed from the server's; replaced by the server's", "file", f.name)
	f.sum, f.valid, f.size = sha256Hex(server), true, int64(len(server))
}

// addFound queues a file found in the spool at start-up. Each was possibly
// published before: Attempt 1 makes the archivers look in the bucket first.
func (c *Core) addFound(f spoolFile) {
	path := join(c.spool.dir, f.name)
	var ev pipeline.SegmentEvent
	var hold pipeline.LSN
	switch f.kind {
	case pipeline.KindHistory:
		data, _ := readAll(c.cfg.FS, path)
		hist, _ := pipeline.ParseHistory(data)
		_, at, _ := pipeline.SwitchPoint(hist)
		ev, hold = c.historyEvent(f.tli, path, data), c.cfg.Size.Start(at)
	case pipeline.KindPartial:
		c.ranged[f.seg] = true
		ev, hold = c.partialEvent(completed{seg: f.seg, path: path, sha256: f.sum}, f.end), f.seg.StartLSN(c.cfg.Size)
	default:
		c.ranged[f.seg] = true // an earlier run may have cut ranges of it
		ev, hold = c.event(f.seg, f.sum), f.seg.StartLSN(c.cfg.Size)
		c.tr.seen(f.seg.StartLSN(c.cfg.Size), f.info.ModTime)
	}
	ev.Attempt = 1
	c.add(ev, hold)
}

// add hands a file to the tracker; one already confirmed (its
// confirmation came first) leaves the spool at once.
func (c *Core) add(ev pipeline.SegmentEvent, hold pipeline.LSN) {
	archived, gone := c.tr.add(ev, hold)
	if archived {
		c.archivedFile(ev, ev.Spool)
		c.m.archivedSegs.Inc()
	}
	for _, g := range gone {
		c.archivedFile(g, g.Spool)
	}
}

// archivedFile takes a file the bucket holds out of the spool; a segment
// leaves a marker, so that a restart does not stream it again.
func (c *Core) archivedFile(ev pipeline.SegmentEvent, path string) {
	if ev.Kind == pipeline.KindSegment {
		if err := c.spool.markDone(path); err != nil {
			c.rl.Warn("remove", "cannot mark an archived segment in the spool; it stays there", "segment", ev.File, "error", err)
			return
		}
		c.done[pipeline.SegmentOf(ev.Timeline, ev.StartLSN, c.cfg.Size)] = path + doneSuffix
	}
	if err := c.spool.remove(path); err != nil {
		c.rl.Warn("remove", "cannot remove an archived file from the spool", "segment", ev.File, "error", err)
	}
}

// ReplaySince is how far back confirmations must be replayed after Start.
func (c *Core) ReplaySince() time.Time { return c.since }

// Resume is where the next replication session starts: the timeline and
// the start of the segment holding the first byte not yet complete in the
// spool.
func (c *Core) Resume() (uint32, pipeline.LSN) {
	c.tr.mu.Lock()
	defer c.tr.mu.Unlock()
	return c.tli, c.tr.frontier
}

// ResumeBehind reports whether Resume's position lies in a segment before
// the one holding the slot's restart_lsn: the server may have removed that
// WAL, so the receiver must plan again from the spool and the slot. It
// happens when the bucket held the segment being written whole and flush
// moved past it.
func (c *Core) ResumeBehind(restart pipeline.LSN) bool {
	_, start := c.Resume()
	return restart != 0 && start < c.cfg.Size.Start(restart)
}

// Open begins a session that streams from start (a segment boundary, as
// Resume gave): the spool's segment there is written again from its first
// byte.
func (c *Core) Open(start pipeline.LSN) error {
	seg := pipeline.SegmentOf(c.tli, start, c.cfg.Size)
	if err := c.spool.open(seg); err != nil {
		return err
	}
	c.beginSegment(seg, time.Time{})
	c.ranged[seg] = true // an earlier run or session may have cut ranges of it
	c.tr.setFrontierOn(c.tli, seg.StartLSN(c.cfg.Size))
	c.m.timeline.Set(float64(c.tli))
	return nil
}

// WAL writes received WAL to the spool. data is consumed before WAL
// returns. Every segment it completes is queued for publishing before the
// frontier moves past it.
func (c *Core) WAL(at pipeline.LSN, data []byte) error {
	if len(data) == 0 {
		return nil
	}
	now := c.cfg.Now()
	if c.cfg.Size.Offset(at) == 0 {
		c.segBegan = now
	}
	if now.Sub(c.lastMark) >= markEvery || now.Before(c.lastMark) {
		c.tr.seen(at, now)
		c.lastMark = now
	}
	c.fileMu.Lock()
	defer c.fileMu.Unlock()
	err := c.spool.write(at, data, func(done completed) {
		c.add(c.event(done.seg, done.sha256), done.seg.StartLSN(c.cfg.Size))
		next := done.seg.Next()
		c.beginSegment(next, now)
		c.tr.seen(next.StartLSN(c.cfg.Size), now)
		c.tr.setFrontier(next.StartLSN(c.cfg.Size))
		c.m.receivedSegs.Inc()
	})
	c.m.receivedBytes.Add(float64(len(data)))
	return err
}

// Status fsyncs what was written and returns the positions to report to
// PostgreSQL: write (fsynced in the spool) and flush (the bucket holds
// everything before it).
func (c *Core) Status() (write, flush pipeline.LSN, err error) {
	if err := c.spool.sync(); err != nil {
		return 0, 0, err
	}
	c.writtenSeen.Store(uint64(c.spool.synced))
	return c.spool.synced, c.Flush(), nil
}

// Flush is the position below which the bucket holds every byte.
func (c *Core) Flush() pipeline.LSN { return pipeline.LSN(c.tr.flush.Load()) }

// Written is the end of the WAL fsynced in the spool.
func (c *Core) Written() pipeline.LSN { return pipeline.LSN(c.writtenSeen.Load()) }

// Timeline is the timeline being streamed.
func (c *Core) Timeline() uint32 { return c.tliSeen.Load() }

// EndTimeline follows the server to the next timeline, which began at at:
// it stores and queues the new timeline's history file and the old
// timeline's last segment (archived as <segment>.partial), and moves the
// frontier to the segment holding the switch point, where streaming
// resumes on the new timeline.
func (c *Core) EndTimeline(next uint32, at pipeline.LSN, history []byte) error {
	if next <= c.tli {
		return fmt.Errorf("server ended timeline %d and named timeline %d next", c.tli, next)
	}
	hist, err := pipeline.ParseHistory(history)
	if err != nil {
		return fmt.Errorf("timeline %d history: %w", next, err)
	}
	if parent, sw, ok := pipeline.SwitchPoint(hist); !ok || parent != c.tli || sw != at {
		return fmt.Errorf("timeline %d history says it began at %s from timeline %d; the server said %s from timeline %d", next, sw, parent, at, c.tli)
	}
	c.fileMu.Lock()
	defer c.fileMu.Unlock()
	path, err := c.spool.writeFile(pipeline.HistoryFileName(next), history)
	if err != nil {
		return err
	}
	// First what the old timeline's ranges hold of the new timeline's
	// first segment: the history's hold rises over it.
	c.tr.inherit(pipeline.SegmentOf(c.tli, at, c.cfg.Size), pipeline.SegmentOf(next, at, c.cfg.Size), at)
	c.add(c.historyEvent(next, path, history), c.cfg.Size.Start(at))
	switch {
	case c.spool.isOpen() && c.spool.written > c.spool.seg.StartLSN(c.cfg.Size):
		done, err := c.spool.endTimeline(at)
		if err != nil {
			return err
		}
		c.add(c.partialEvent(done, at), done.seg.StartLSN(c.cfg.Size))
	case c.spool.isOpen():
		c.spool.discardCurrent() // the timeline ended on a segment boundary
	}
	c.cfg.Log.Info("timeline switch", "timeline", next, "previous_timeline", c.tli, "lsn", at.String())
	c.tli = next
	c.tliSeen.Store(next)
	c.tr.setFrontierOn(next, c.cfg.Size.Start(at))
	c.m.timeline.Set(float64(next))
	return nil
}

// beginSegment notes that seg is now the segment being written: its ranges
// start over unless this run cut some already (a session that writes it
// again from its start, after a reconnect); began is when its first byte
// arrived (zero: when it does).
func (c *Core) beginSegment(seg pipeline.Segment, began time.Time) {
	if seg != c.cutSeg {
		c.cutSeg, c.cutEnd = seg, seg.StartLSN(c.cfg.Size)
	}
	c.segBegan = began
}

// CutRange uploads the WAL of the segment being written that is fsynced in
// the spool (by Status) and in no range yet, as a range: the bytes go to
// their own spool file, and a range event is queued like a segment's. It
// does nothing unless ranges are on and the segment's first byte arrived
// at least PartialInterval ago: a server that fills segments faster than
// that uploads whole segments only.
func (c *Core) CutRange() error {
	if c.cfg.PartialInterval <= 0 || !c.spool.isOpen() || c.spool.seg != c.cutSeg {
		return nil
	}
	// What the bucket holds already by the segment's own confirmed ranges
	// (a crashed run's, published again) is not cut again. The previous
	// timeline's WAL below a switch is: a restore of this timeline's file
	// stitches only its own ranges, from offset 0.
	from, to := max(c.cutEnd, c.tr.ownReachOf(c.cutSeg)), c.spool.synced
	// A tenth of the interval's slack: the caller's timer and the
	// segment's first byte start a hair apart, and a cut must not slip a
	// whole interval for it.
	if to <= from || c.segBegan.IsZero() || c.cfg.Now().Sub(c.segBegan) < c.cfg.PartialInterval-c.cfg.PartialInterval/10 {
		return nil
	}
	// A new timeline's first range reaches at least its switch point:
	// recovery reads this timeline's file, stitched from its ranges with
	// the parent's WAL below the switch, and one ending below what flush
	// already counts would be a step back for a restore that only has it.
	if to < c.tr.inheritedOf(c.cutSeg) {
		return nil
	}
	data, err := c.spool.readOpen(from, to)
	if err != nil {
		return err
	}
	seg := c.cutSeg
	c.fileMu.Lock()
	defer c.fileMu.Unlock()
	path, err := c.spool.writeFile(c.spool.rangeName(seg, from, to), data)
	if err != nil {
		return err
	}
	c.cutEnd = to
	c.ranged[seg] = true
	c.add(c.rangeEvent(seg, from, to, path, sha256Hex(data)), from)
	c.m.rangesCut.Inc()
	return nil
}

// startRanges queues the ranges a previous run left in the spool (each may
// hold WAL the bucket lacks and the server no longer has) and removes
// those that are damaged, or of a segment the spool knows is archived.
func (c *Core) startRanges(ranges []spoolFile) error {
	for _, f := range ranges {
		path := join(c.spool.dir, f.name)
		sum, n, err := hashFile(c.cfg.FS, path)
		valid := err == nil && f.hasSum && n == int64(f.end-f.from)
		if valid {
			want, err := c.spool.readSum(path)
			valid = err == nil && want == sum
		}
		if _, archived := c.done[f.seg]; !valid || archived {
			if err := c.spool.remove(path); err != nil {
				return fmt.Errorf("spool: remove %s: %w", f.name, err)
			}
			continue
		}
		ev := c.rangeEvent(f.seg, f.from, f.end, path, sum)
		ev.Attempt = 1
		c.add(ev, f.from)
	}
	return nil
}

// CloseSession ends a session: the open segment is fsynced and closed; the
// next session writes it again from its start.
func (c *Core) CloseSession() { c.spool.closeCurrent() }

// Archived takes a confirmation. Only one that matches a pending file (its
// bytes' SHA-256 and the configured destination) removes the spool copy and
// may move flush; others are counted and logged.
func (c *Core) Archived(ev pipeline.ArchivedEvent) {
	if ev.SystemID != c.cfg.SystemID || ev.Server != c.cfg.Server || ev.Kind == pipeline.KindBackup {
		// A base backup's chunk (walship backup) is not WAL: it neither
		// moves flush nor counts as ignored.
		return
	}
	c.fileMu.Lock()
	defer c.fileMu.Unlock()
	res, reason, gone, moved := c.tr.confirm(ev)
	switch res {
	case confirmMismatch:
		c.cfg.Metrics.Ignored.WithLabelValues(c.cfg.Server, reason).Inc()
		c.rl.Warn("mismatch/"+ev.File, "ignoring a confirmation that does not match the spool's file",
			"segment", ev.File, "reason", reason, "dest", ev.Dest, "key", ev.Key)
		return
	case confirmStale:
		return
	}
	for _, g := range gone {
		c.archivedFile(g, g.Spool)
	}
	if moved {
		// Markers behind flush are no longer needed: a restart starts
		// after them.
		flush := c.Flush()
		var gone []pipeline.Segment
		for seg := range c.done {
			if seg.EndLSN(c.cfg.Size) <= flush {
				gone = append(gone, seg)
			}
		}
		sort.Slice(gone, func(i, j int) bool {
			return gone[i].No < gone[j].No || gone[i].No == gone[j].No && gone[i].Timeline < gone[j].Timeline
		})
		for _, seg := range gone {
			c.cfg.FS.Remove(c.done[seg])
			delete(c.done, seg)
		}
	}
	if ev.Kind != pipeline.KindRange {
		c.m.archivedSegs.Inc()
	}
	if moved {
		c.cfg.Log.Debug("flush moved", "lsn", c.Flush().String())
	}
}

// Undecodable counts an archived event that could not be decoded.
func (c *Core) Undecodable(err error) {
	c.cfg.Metrics.Ignored.WithLabelValues(c.cfg.Server, "undecodable").Inc()
	c.rl.Warn("undecodable", "ignoring an archived event that cannot be decoded (an archiver of another version?)", "error", err)
}

// Next blocks until a file is to be published or checked, or ctx ends.
func (c *Core) Next(ctx context.Context) (PublishItem, bool) {
	it, ok := c.tr.next(ctx)
	return PublishItem{it}, ok
}

// TryNext returns the next file to publish or check, if any.
func (c *Core) TryNext() (PublishItem, bool) {
	it, ok := c.tr.tryNext()
	return PublishItem{it}, ok
}

// PublishItem is a unit of the publisher's work.
type PublishItem struct{ it item }

// Event is the event the item publishes.
func (p PublishItem) Event() pipeline.SegmentEvent { return p.it.ev }

// Publish makes one attempt at an item: for a check, it asks whether the
// last event is still queued and publishes again only if not; it stages
// the bytes unless the object store still has them, then publishes the
// event. On error the caller retries the same item (Retry) after a pause.
// A file confirmed meanwhile is not published.
func (c *Core) Publish(ctx context.Context, pub Publisher, p PublishItem) error {
	it := p.it
	if !c.tr.isPending(it.ev) {
		return nil
	}
	if it.check {
		if qc, ok := pub.(QueueChecker); ok && it.seq != 0 {
			queued, err := qc.Queued(ctx, it.seq, it.ev.PublishID())
			if err != nil {
				return err
			}
			if queued {
				// Still waiting for an archiver (S3 down, a backlog): a new
				// event would only add work.
				c.tr.markPublished(it.ev, it.seq, c.cfg.Now())
				return nil
			}
		}
		it.ev.Attempt++
		c.m.republished.Inc()
	}
	if it.ev.Object != "" {
		staged := false
		if oc, ok := pub.(ObjectChecker); ok && it.ev.Attempt > 0 {
			staged, _ = oc.HasObject(ctx, it.ev.Object, it.ev.SHA256)
		}
		if !staged {
			f, err := c.cfg.FS.Open(it.ev.Spool)
			if err != nil {
				if os.IsNotExist(err) && !c.tr.isPending(it.ev) {
					return nil // confirmed and removed meanwhile
				}
				return err
			}
			err = pub.PutObject(ctx, it.ev.Object, f)
			f.Close()
			if err != nil {
				return err
			}
		}
	}
	if c.cfg.StageURL != "" && it.ev.Spool != "" {
		it.ev.URL = c.stageURL(&it.ev)
	}
	seq, err := pub.PublishSegment(ctx, &it.ev)
	if err != nil {
		return err
	}
	c.tr.markPublished(it.ev, seq, c.cfg.Now())
	if it.ev.Kind != pipeline.KindRange {
		c.m.publishedSegs.Inc()
		c.m.publishedBytes.Add(float64(it.ev.Size))
	}
	return nil
}

// Retry queues an item again after a failed Publish.
func (c *Core) Retry(p PublishItem) { c.tr.requeue(p.it) }

// Tick queues a check of every file published at least after ago without a
// confirmation since, and returns how many.
func (c *Core) Tick(now time.Time, after time.Duration) int {
	return c.tr.requeueStale(now, after)
}

// Positions are the positions and counts for metrics and status.
type Positions struct {
	Published, Archived, Flush pipeline.LSN
	SpoolBytes                 int64
	PendingFiles               int
}

// Positions reports the positions for metrics and the state record.
func (c *Core) Positions() Positions {
	pub, arch, bytes, files := c.tr.positions()
	return Positions{Published: pub, Archived: arch, Flush: c.Flush(), SpoolBytes: bytes, PendingFiles: files}
}

// LagSeconds is the age of the oldest received byte the bucket does not hold.
func (c *Core) LagSeconds(now time.Time, received pipeline.LSN) float64 {
	return c.tr.lagSeconds(now, received)
}

func (c *Core) event(seg pipeline.Segment, sum string) pipeline.SegmentEvent {
	ev := c.baseEvent(seg, sum)
	if c.ranged[seg] || seg.No <= c.rangedUpTo {
		ev.Ranges = true
		delete(c.ranged, seg)
	}
	return ev
}

// baseEvent is a segment's event, without the Ranges flag.
func (c *Core) baseEvent(seg pipeline.Segment, sum string) pipeline.SegmentEvent {
	name := seg.Name(c.cfg.Size)
	ev := pipeline.SegmentEvent{
		V: pipeline.EventVersion, Server: c.cfg.Server, SystemID: c.cfg.SystemID, Timeline: seg.Timeline,
		File: name, Kind: pipeline.KindSegment,
		StartLSN: seg.StartLSN(c.cfg.Size), EndLSN: seg.EndLSN(c.cfg.Size),
		Size: int64(c.cfg.Size), SegSize: uint64(c.cfg.Size), SHA256: sum,
		Spool: c.spool.path(seg), Run: c.cfg.Run,
	}
	if c.cfg.StageObjects {
		ev.Object = c.cfg.Server + "/" + name
	}
	return ev
}

// rangeEvent announces bytes [from, to) of seg, held by the spool file at
// path.
func (c *Core) rangeEvent(seg pipeline.Segment, from, to pipeline.LSN, path, sum string) pipeline.SegmentEvent {
	ev := c.baseEvent(seg, sum)
	ev.Kind, ev.StartLSN, ev.EndLSN, ev.Size, ev.Spool = pipeline.KindRange, from, to, int64(to-from), path
	if c.cfg.StageObjects {
		ev.Object = c.cfg.Server + "/" + ev.RangeName()
	}
	return ev
}

// partialEvent announces the last segment of an ended timeline, archived
// as <segment>.partial. end is the switch point; 0 (unknown, a spool from
// an older walship) keeps the segment's end.
func (c *Core) partialEvent(done completed, end pipeline.LSN) pipeline.SegmentEvent {
	ev := c.event(done.seg, done.sha256)
	ev.Kind = pipeline.KindPartial
	ev.Spool = done.path
	if end != 0 {
		ev.EndLSN = end
	}
	if c.cfg.StageObjects {
		ev.Object = c.cfg.Server + "/" + ev.File + ".partial"
	}
	return ev
}

// historyEvent announces a timeline history file.
func (c *Core) historyEvent(tli uint32, path string, data []byte) pipeline.SegmentEvent {
	ev := pipeline.SegmentEvent{
		V: pipeline.EventVersion, Server: c.cfg.Server, SystemID: c.cfg.SystemID, Timeline: tli,
		File: pipeline.HistoryFileName(tli), Kind: pipeline.KindHistory,
		Size: int64(len(data)), SegSize: uint64(c.cfg.Size), SHA256: sha256Hex(data), Spool: path, Run: c.cfg.Run,
	}
	if c.cfg.StageObjects {
		ev.Object = c.cfg.Server + "/" + ev.File
	}
	return ev
}

func sha256Hex(data []byte) string {
	sum := sha256.Sum256(data)
	return pipeline.SHA256Hex(sum[:])
}

func readAll(fs FS, path string) ([]byte, error) {
	f, err := fs.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	return io.ReadAll(io.LimitReader(f, 1<<20))
}

func minTime(a, b time.Time) time.Time {
	if b.Before(a) {
		return b
	}
	return a
}
