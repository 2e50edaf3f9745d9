package sim

import (
	"context"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"hash/fnv"
	"io"
	"log/slog"
	"math/rand/v2"
	"path"
	"runtime/debug"
	"strconv"
	"strings"
	"time"

	"filippo.io/age"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/walship/walship/compress"
	"github.com/walship/walship/internal/walgen"
	"github.com/walship/walship/pipeline"
	"github.com/walship/walship/pipeline/archiver"
	"github.com/walship/walship/pipeline/backup"
	"github.com/walship/walship/pipeline/receiver"
	"github.com/walship/walship/sinks"
)

// Options shape one run.
type Options struct {
	Seed  uint64
	Steps int       // steps with faults injected (0: 400)
	Log   io.Writer // every step, for replaying a failure (nil: none)
	// Skip names actions (faults) never to take, e.g. to look past a
	// known failure while it is being fixed.
	Skip map[string]bool
}

// Result is what one run did.
type Result struct {
	Seed    uint64
	Steps   int            // steps taken, all phases
	Faults  map[string]int // faults injected, by kind
	Counts  map[string]int // events worth reporting (segments archived, restarts...)
	SimTime time.Duration  // simulated time
	Digest  uint64         // of the whole run: equal for equal seeds
	Err     error          // the first invariant broken, or nil
}

const (
	sysID          = 7300000000000000042
	server         = "db1"
	dest           = "s3://bucket/prefix"
	spoolDir       = "/spool/db1"
	republishAfter = 5 * time.Minute
	maxTimelines   = 4
)

// World is the simulated neighbourhood of one receiver and its archivers.
type World struct {
	opt   Options
	size  pipeline.SegmentSize
	rng   *rand.Rand
	now   time.Time
	start time.Time
	codec compress.Codec
	stage bool       // receiver stages bytes in the object store (else archivers read the spool)
	http  *httpStage // stage.go: staged over HTTP instead (--stage http), else nil
	// ids are the age identities of the archive's keys, oldest first,
	// when the archivers encrypt (--encrypt-recipient); the newest is the
	// recipient of archivers started now (a rotation adds one).
	ids  []age.Identity
	pg14 bool // the server does not say the slot's timeline (PostgreSQL 12 to 14)
	// partial is the receiver's --partial-interval (0: no ranges); quiet:
	// the server mostly writes little at a time, so the segment being
	// written stays open across many cuts.
	partial time.Duration
	quiet   bool

	// PostgreSQL.
	hist     walgen.History
	end      pipeline.LSN // end of WAL on the current timeline
	budget   pipeline.LSN // the server writes no further in the fault phase
	slot     pipeline.LSN // restart_lsn
	initial  pipeline.LSN // restart_lsn when the slot was created
	recycled uint64       // segments below this number are gone from the server

	// The receiver processes: one, or two on different hosts taking the
	// slot over from each other (--standby), each with its own spool.
	hosts    []*host
	lastSent pipeline.LSN // the last flush the server was sent

	js    *jetStream
	bkt   *bucket
	archs []*arch

	layout   sinks.Layout
	faultsOn bool
	diskFull bool
	conflict string // key of a foreign object placed to conflict
	// gapFloor: the slot was recreated here; the archive may have a gap
	// before it (an operator's choice), so flush up to it is allowed.
	gapFloor  pipeline.LSN
	recreated int
	contig    uint64 // first segment number the bucket does not wholly hold (cache)

	bk     backups           // base backups and prunes (backups.go)
	want   map[string]wanted // expected archive contents, by file name
	acts   []action
	buf    []byte
	wbuf   []byte
	busy   map[string]bool
	depth  int
	steps  int
	res    Result
	digest hashWriter
	err    error
}

type session struct {
	tli uint32
	pos pipeline.LSN
}

// host is one receiver process and its spool.
type host struct {
	name    string
	fs      *fileSystem
	core    *receiver.Core
	sess    *session
	watched uint64 // sequence of the last confirmation delivered
	m       *receiver.Metrics
	// sessions: connections since the core started; the first one's
	// slot check happened in Start.
	sessions int
	// flushed: the highest flush this receiver reported since it started;
	// flush never moves back within a receiver's life.
	flushed pipeline.LSN
	st      hostStage // stage.go
}

// actor names one of the host's loops; one host keeps the old names.
func (h *host) actor(loop string) string {
	if h.name == "recv" {
		return loop
	}
	return loop + "-" + h.name
}

// idle: none of the host's loops is in the middle of a call.
func (w *World) idle(h *host) bool {
	return !w.busy[h.actor("repl")] && !w.busy[h.actor("pub")] && !w.busy[h.actor("watch")] && !w.busy[h.actor("house")]
}

// connecting: some host's replication loop is in the middle of a call.
func (w *World) connecting() bool {
	for _, h := range w.hosts {
		if w.busy[h.actor("repl")] {
			return true
		}
	}
	return false
}

// holder is the host whose session streams the slot, if any.
func (w *World) holder() *host {
	for _, h := range w.hosts {
		if h.sess != nil {
			return h
		}
	}
	return nil
}

// downHost is a host whose receiver is not running, for faults that need
// one; nil when all run.
func (w *World) downHost() *host {
	for _, i := range w.rng.Perm(len(w.hosts)) {
		if w.hosts[i].core == nil {
			return w.hosts[i]
		}
	}
	return nil
}

// arch is one archiver process.
type arch struct {
	name   string
	m      *archiver.Metrics
	gen    int
	a      *archiver.Archiver
	w      *archiver.Worker
	ctx    context.Context
	cancel context.CancelFunc
	st     archStage // stage.go
}

type hashWriter struct {
	h interface{ Write([]byte) (int, error) }
}

// Run simulates one seed.
func Run(o Options) (res Result) {
	if o.Steps <= 0 {
		o.Steps = 400
	}
	w := &World{opt: o, rng: rand.New(rand.NewPCG(o.Seed, o.Seed^0x5EED)), busy: map[string]bool{}, want: map[string]wanted{}}
	h := fnv.New64a()
	w.digest = hashWriter{h}
	w.res = Result{Seed: o.Seed, Faults: map[string]int{}, Counts: map[string]int{}}
	defer func() {
		if p := recover(); p != nil {
			if p != errStop {
				w.err = fmt.Errorf("panic: %v\n%s", p, debug.Stack())
			}
		}
		for _, c := range []string{"ranges uploaded", "ranges deleted", "flush inside a segment"} {
			if w.res.Counts[c] > 0 {
				w.count("seeds with " + c)
			}
		}
		w.res.Steps, w.res.SimTime, w.res.Digest, w.res.Err = w.steps, w.now.Sub(w.start), h.Sum64(), w.err
		res = w.res
	}()
	w.setup()
	for i := 0; i < o.Steps; i++ {
		w.step(true)
	}
	w.settle()
	return
}

// errStop unwinds a run at its first broken invariant.
var errStop = errors.New("stop")

func (w *World) fail(format string, args ...any) {
	if w.err == nil {
		w.err = fmt.Errorf("step %d, t=%s: %s", w.steps, w.now.Sub(w.start), fmt.Sprintf(format, args...))
	}
	panic(errStop)
}

func (w *World) logf(format string, args ...any) {
	line := fmt.Sprintf(format, args...)
	fmt.Fprintf(w.digest.h, "%d %s\n", w.steps, line)
	if w.opt.Log != nil {
		fmt.Fprintf(w.opt.Log, "%6d %10s %s\n", w.steps, w.now.Sub(w.start).Round(time.Millisecond), line)
	}
}

// logger is a component's log, written into the step log when there is one.
func (w *World) logger(who string) *slog.Logger {
	if w.opt.Log == nil {
		return slog.New(slog.DiscardHandler)
	}
	h := slog.NewTextHandler(logLines{w, who}, &slog.HandlerOptions{Level: slog.LevelDebug,
		ReplaceAttr: func(groups []string, a slog.Attr) slog.Attr {
			if a.Key == slog.TimeKey {
				return slog.Attr{}
			}
			return a
		}})
	return slog.New(h)
}

type logLines struct {
	w   *World
	who string
}

func (l logLines) Write(p []byte) (int, error) {
	fmt.Fprintf(l.w.opt.Log, "%6d %10s   %s: %s", l.w.steps, l.w.now.Sub(l.w.start).Round(time.Millisecond), l.who, p)
	return len(p), nil
}

func (w *World) count(what string) { w.res.Counts[what]++ }

func (w *World) setup() {
	w.start = time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	w.now = w.start
	// Most seeds use 64 kB segments (eight WAL pages: the logic does not
	// depend on the size, and hashing less runs more seeds); some use 1 MB,
	// PostgreSQL's smallest.
	w.size = 64 << 10
	if w.rng.IntN(10) == 0 {
		w.size = 1 << 20
	}
	w.codec = compress.None
	if w.rng.IntN(5) == 0 {
		w.codec = compress.Zstd
	}
	w.stage = w.rng.IntN(2) == 0
	if w.rng.IntN(4) == 0 {
		w.rotateKey()
	}
	w.pg14 = w.rng.IntN(3) == 0
	if w.rng.IntN(2) == 0 {
		w.partial = time.Duration(100+w.rng.IntN(3000)) * time.Millisecond
		w.quiet = w.rng.IntN(2) == 0
	}
	w.hist = walgen.History{{TLI: 1}}
	// The slot is created somewhere in segment 3, as RESERVE_WAL does.
	w.end = w.recordBoundary(3*pipeline.LSN(w.size) + pipeline.LSN(w.rng.IntN(int(w.size))))
	w.slot, w.initial = w.end, w.end
	w.recycled = uint64(w.end) / uint64(w.size)
	segs := 3 + w.rng.IntN(7)
	if w.size > 64<<10 {
		segs = 2 + w.rng.IntN(4)
	}
	w.budget = w.end + pipeline.LSN(segs)*pipeline.LSN(w.size)
	w.contig = w.recycled
	w.layout = sinks.BarmanCloud{Prefix: "prefix", Server: server}
	nh := 1
	if w.stage && w.rng.IntN(3) == 0 {
		nh = 2 // walship receive --standby on two hosts (walship run has one)
	}
	for i := 0; i < nh; i++ {
		h := &host{name: "recv", fs: newFileSystem(w), m: receiver.NewMetrics(prometheus.NewRegistry())}
		if nh > 1 {
			h.name = string(rune('a' + i))
		}
		h.fs.onRemove = w.checkRemove
		w.hosts = append(w.hosts, h)
	}
	w.js = newJetStream(w)
	w.bkt = &bucket{w: w, objs: map[string]*stored{}, ranges: map[string][]span{}}
	w.bk = backups{produced: map[string][]byte{}, catalogs: map[string]*backup.Catalog{}, pruned: map[string]bool{}}
	n := 1 + w.rng.IntN(3)
	for i := 0; i < n; i++ {
		a := &arch{name: "arch" + strconv.Itoa(i)}
		w.archs = append(w.archs, a)
		w.startArchiver(a)
	}
	w.setupStage()
	w.faultsOn = true
	w.logf("setup pg14=%v size=%d codec=%s encrypted=%v stage=%v archivers=%d receivers=%d slot=%s budget=%s partial=%s quiet=%v",
		w.pg14, w.size, w.codec, len(w.ids) > 0, w.stage, n, nh, w.slot, w.budget, w.partial, w.quiet)
	w.startReceiver(w.hosts[0])
}

func (w *World) tli() uint32 { return w.hist[len(w.hist)-1].TLI }

// historyFile is the content of timeline tli's history file.
func (w *World) historyFile(tli uint32) []byte {
	var b strings.Builder
	for i := 1; i < len(w.hist) && w.hist[i].TLI <= tli; i++ {
		fmt.Fprintf(&b, "%d\t%s\tno recovery target specified\n", w.hist[i-1].TLI, w.hist[i].Begin)
	}
	return []byte(b.String())
}

// tlEnd is where timeline tli's WAL ends now: its switch point, or the
// server's end for the current one.
func (w *World) tlEnd(tli uint32) pipeline.LSN {
	if e, ok := w.hist.End(tli); ok {
		return e
	}
	return w.end
}

// rotateKey gives the archive a new key: archivers started from now on
// encrypt for it; objects written before stay readable with the old one.
func (w *World) rotateKey() {
	id, err := age.GenerateX25519Identity()
	if err != nil {
		w.fail("age: %v", err)
	}
	w.ids = append(w.ids, id)
	if len(w.ids) > 1 {
		w.logf("key rotated: %d keys", len(w.ids))
	}
}

func (w *World) startArchiver(a *arch) {
	a.gen++
	var recipients []age.Recipient
	if len(w.ids) > 0 {
		if w.faultsOn && w.rng.IntN(10) == 0 {
			w.rotateKey()
		}
		recipients = []age.Recipient{w.ids[len(w.ids)-1].(*age.X25519Identity).Recipient()}
	}
	if a.m == nil {
		a.m = archiver.NewMetrics(prometheus.NewRegistry())
	}
	a.ctx, a.cancel = context.WithCancel(context.Background())
	fetch := w.fetcher(a)
	var err error
	a.a, err = archiver.New(archiver.Config{
		Codec: w.codec, Layout: func(string) sinks.Layout { return w.layout }, Dest: dest,
		ReadSpool: !w.stage, OpenSpool: func(p string) (io.ReadCloser, error) { return w.hosts[0].fs.handle().Open(p) }, KeepAlive: -1,
		Log: w.logger(a.name), Metrics: a.m, Recipients: recipients, Fetch: fetch,
	}, busFor{js: w.js, a: a}, &bucketFor{b: w.bkt, a: a})
	if err != nil {
		w.fail("archiver: %v", err)
	}
	a.w = a.a.NewWorker()
}

func (w *World) startReceiver(h *host) {
	core, err := receiver.NewCore(receiver.CoreConfig{
		Server: server, SystemID: strconv.FormatUint(sysID, 10), Size: w.size, Dir: spoolDir,
		FS: h.fs.handle(), Now: func() time.Time { return w.now }, StageObjects: w.stage && w.http == nil, Dest: dest,
		StageURL: w.stageListen(h),
		Run:      fmt.Sprintf("%s%d", h.name, w.steps), PartialInterval: w.partial,
		Log: w.logger(h.name), Metrics: h.m,
	})
	if err != nil {
		w.fail("receiver: new core: %v", err)
	}
	slot := receiver.SlotState{Exists: true, Physical: true, RestartLSN: w.slot, Timeline: w.hist.Owner(w.tli(), w.slot)}
	if w.pg14 {
		slot.Timeline = 0 // pg_replication_slots has no restart_tli before PostgreSQL 15
	}
	history := func(tli uint32) ([]byte, error) {
		if tli < 2 || tli > w.tli() {
			return nil, fmt.Errorf("sim: no history for timeline %d", tli)
		}
		return w.historyFile(tli), nil
	}
	if err := core.Start(receiver.StartInput{Slot: slot, ServerTLI: w.tli(), ServerPos: w.end, History: history}); err != nil {
		w.logf("%s: receiver start failed: %v", h.name, err)
		w.count("start failed")
		core.Release()
		return
	}
	h.core, h.sessions, h.flushed = core, 0, 0
	w.stageHold(h, core)
	h.watched = w.js.archivedSince(core.ReplaySince())
	tli, start := core.Resume()
	for _, t := range w.hist[1:] {
		if t.TLI == tli && t.Begin == start {
			// The server will not end the parent timeline for it: the
			// history must come from the start-up (review 2, finding 1).
			w.count("starts on a switch point")
		}
	}
	w.logf("%s: receiver started: resume %d/%s flush %s", h.name, tli, start, core.Flush())
	w.count("receiver starts")
}

// An action is one thing that can happen next.
type action struct {
	name   string
	actor  string
	weight int
	fault  bool
	ok     func() bool
	do     func()
}

func (w *World) actions() []action {
	if w.acts == nil {
		w.acts = w.makeActions()
	}
	return w.acts
}

func (w *World) makeActions() []action {
	acts := []action{
		{"pg-write", "pg", 12, false, func() bool { return w.end < w.budget }, w.pgWrite},
		{"pg-switch-wal", "pg", 1, false, w.canSwitchWAL, w.pgSwitchWAL},
	}
	for _, h := range w.hosts {
		h := h
		up := func() bool { return h.core != nil }
		acts = append(acts,
			action{"recv-connect", h.actor("repl"), 6, false, func() bool { return up() && h.sess == nil }, func() { w.recvConnect(h) }},
			action{"recv-stream", h.actor("repl"), 20, false, func() bool { return up() && h.sess != nil }, func() { w.recvStream(h) }},
			action{"recv-status", h.actor("repl"), 8, false, func() bool { return up() && h.sess != nil }, func() { w.recvStatus(h) }},
			action{"recv-cut", h.actor("repl"), 8, false, func() bool { return w.partial != 0 && up() && h.sess != nil }, func() { w.recvCut(h) }},
			action{"recv-publish", h.actor("pub"), 12, false, up, func() { w.recvPublish(h) }},
			action{"recv-confirm", h.actor("watch"), 10, false, func() bool { return up() && !w.js.down() }, func() { w.recvConfirm(h) }},
			action{"recv-tick", h.actor("house"), 3, false, up, func() { w.recvTick(h) }},
			// A receiver starts (or a standby takes over) when the slot
			// is free.
			action{"recv-start", h.actor("repl"), 3, false, func() bool { return !up() && !h.fs.dying && w.idle(h) && w.holder() == nil }, func() { w.startReceiver(h) }},
			action{"recv-crash", "fault", 2, true, func() bool { return up() && w.idle(h) }, func() { w.recvCrash(h) }},
		)
	}
	acts = append(acts, []action{
		{"clock", "clock", 3, false, func() bool { return true }, w.clockJump},
		{"pg-restart", "fault", 2, true, func() bool { h := w.holder(); return h != nil && !w.busy[h.actor("repl")] }, w.pgRestart},
		{"pg-promote", "fault", 1, true, func() bool { return int(w.tli()) < maxTimelines && !w.connecting() }, w.pgPromote},
		{"nats-outage", "fault", 1, true, func() bool { return !w.js.down() }, w.natsOutage},
		{"nats-crash", "fault", 1, true, func() bool { return true }, w.natsCrash},
		{"s3-outage", "fault", 1, true, func() bool { return !w.now.Before(w.bkt.downTill) }, w.s3Outage},
		{"conflict", "fault", 1, true, func() bool { return w.conflict == "" }, w.injectConflict},
		{"forged-confirm", "fault", 1, true, func() bool { return true }, w.forgeConfirm},
		{"range-litter", "fault", 1, true, func() bool { return w.partial != 0 }, w.rangeLitter},
		{"spool-truncate", "fault", 1, true, func() bool { return w.downHost() != nil }, func() { w.truncateSpool(w.downHost()) }},
		{"spool-damage", "fault", 1, true, func() bool { return w.downHost() != nil }, func() { w.damageSpool(w.downHost()) }},
		{"spool-delete", "fault", 1, true, func() bool { return w.downHost() != nil }, func() { w.deleteSpoolFile(w.downHost()) }},
		{"slot-recreate", "fault", 1, true, func() bool { return w.holder() == nil && w.downHost() != nil }, w.recreateSlot},
		{"disk-full", "fault", 1, true, func() bool { return true }, func() { w.diskFull = !w.diskFull; w.logf("disk full: %v", w.diskFull) }},
	}...)
	acts = append(acts, w.backupActions()...)
	acts = append(acts, w.stageActions()...)
	for _, a := range w.archs {
		a := a
		acts = append(acts,
			action{"archive", a.name, 14 / len(w.archs), false, func() bool { return true }, func() { w.archiveStep(a) }},
			action{"arch-crash", "fault", 1, true, func() bool { return true }, func() { w.archCrash(a) }},
		)
	}
	return acts
}

// step picks an enabled action at random, runs it and checks the world.
func (w *World) step(faults bool) {
	w.steps++
	w.now = w.now.Add(time.Duration(w.rng.IntN(300)) * time.Millisecond)
	w.pick(faults, nil)
	for _, h := range w.hosts {
		if h.fs.dying {
			w.res.Faults["recv-crash-in-file-op"]++
			w.recvCrash(h)
		}
	}
	w.checkBackups()
}

func (w *World) pick(faults bool, exclude map[string]bool) {
	acts := w.actions()
	total := 0
	var en []action
	for _, a := range acts {
		if a.fault && !faults || w.busy[a.actor] || exclude[a.actor] || w.opt.Skip[a.name] || !a.ok() {
			continue
		}
		en = append(en, a)
		total += max(a.weight, 1)
	}
	if total == 0 {
		return
	}
	r := w.rng.IntN(total)
	for _, a := range en {
		if r -= max(a.weight, 1); r < 0 {
			w.run(a)
			return
		}
	}
}

func (w *World) run(a action) {
	if a.fault {
		w.res.Faults[a.name]++
	}
	w.busy[a.actor] = true
	defer delete(w.busy, a.actor)
	a.do()
}

// interfere runs a few other actions in the middle of actor's call to a
// neighbour: calls take time, and the world goes on meanwhile.
func (w *World) interfere(actor string) {
	if w.depth > 0 || w.rng.IntN(12) != 0 {
		return
	}
	w.depth++
	defer func() { w.depth-- }()
	w.logf("  (while %s waits)", actor)
	for i := 1 + w.rng.IntN(3); i > 0; i-- {
		w.now = w.now.Add(time.Duration(w.rng.IntN(20000)) * time.Millisecond)
		w.pick(w.faultsOn, map[string]bool{actor: true})
	}
}

// maybeLostReply: sometimes the call did its work but its answer is lost.
func (w *World) maybeLostReply() error {
	if w.faultsOn && w.rng.IntN(30) == 0 {
		w.count("lost replies")
		return errors.New("sim: reply lost")
	}
	return nil
}

func (w *World) clockJump() {
	d := time.Duration(w.rng.IntN(int(republishAfter/time.Millisecond))) * time.Millisecond
	if w.faultsOn && w.rng.IntN(4) == 0 {
		d *= 3
	} else if !w.faultsOn {
		d /= 5
	}
	w.now = w.now.Add(d)
	w.logf("clock +%s", d.Round(time.Millisecond))
}

// PostgreSQL.

func (w *World) pgWrite() {
	n := pipeline.LSN(1 + w.rng.IntN(int(w.size)*6/10))
	if w.quiet && w.rng.IntN(5) != 0 {
		n = pipeline.LSN(1 + w.rng.IntN(1500)) // a few small transactions
	}
	if w.end+n > w.budget {
		n = w.budget - w.end
	}
	w.end = min(w.recordBoundary(w.end+n), w.budget)
	w.logf("pg writes to %s", w.end)
}

// recordBoundary is the first place at or after x where a WAL record can
// end: MAXALIGNed and not inside a page header. The server's end of WAL
// and its switch points are always such places.
func (w *World) recordBoundary(x pipeline.LSN) pipeline.LSN {
	x = (x + 7) &^ 7
	hdr := pipeline.LSN(24)
	if w.size.Offset(x-x%8192) == 0 {
		hdr = 40
	}
	if off := x % 8192; off != 0 && off < hdr {
		x += hdr - off
	}
	return x
}

// switchPoint: a timeline ended at x.
func (w *World) switchPoint(x pipeline.LSN) bool {
	for _, t := range w.hist[1:] {
		if t.Begin == x {
			return true
		}
	}
	return false
}

// canSwitchWAL: the server is inside a segment it may still finish.
func (w *World) canSwitchWAL() bool {
	return w.size.Offset(w.end) != 0 && w.size.Start(w.end)+pipeline.LSN(w.size) <= w.budget
}

// pgSwitchWAL is an XLOG_SWITCH (pg_switch_wal, archive_timeout on an idle
// server): the rest of the segment is padding, and the WAL ends on the
// segment boundary - where a promotion right after it puts the switch.
func (w *World) pgSwitchWAL() {
	w.end = w.size.Start(w.end) + pipeline.LSN(w.size)
	w.logf("pg switches WAL: its WAL ends at %s", w.end)
}

func (w *World) pgPromote() {
	if w.canSwitchWAL() && w.rng.IntN(3) == 0 {
		// A planned failover: pg_switch_wal, then the promotion.
		w.pgSwitchWAL()
	}
	if w.size.Offset(w.end) == 0 {
		w.count("promotions on a segment boundary")
	}
	next := w.tli() + 1
	w.hist = append(w.hist, walgen.Timeline{TLI: next, Begin: w.end})
	w.logf("pg promotes: timeline %d at %s", next, w.end)
	w.count("timelines")
}

func (w *World) pgRestart() {
	w.logf("pg restarts: the session drops")
	for _, h := range w.hosts {
		if h.sess != nil {
			h.sess = nil
			h.core.CloseSession()
		}
	}
}

// The receiver.

func (w *World) recvConnect(h *host) {
	if o := w.holder(); o != nil {
		// Another receiver streams the slot. A standby that has not
		// streamed yet waits for the slot again; one that has keeps
		// retrying (its files are still published and confirmed).
		w.logf("%s: connect: the slot is active (%s streams it)", h.name, o.name)
		if h.sessions == 0 && w.idle2(h, "repl") {
			w.release(h, "lost the race for the slot")
		}
		return
	}
	if w.slot > h.core.Flush() {
		// Someone else moved the slot while this receiver was away: plan
		// again (Receiver.reconnect; on the first connection, the check
		// at the end of Receiver.prepare).
		if w.idle2(h, "repl") {
			w.release(h, fmt.Sprintf("the slot moved to %s, past this receiver's flush %s", w.slot, h.core.Flush()))
		}
		return
	}
	if h.core.ResumeBehind(w.slot) {
		// Flush passed the segment being written: plan again
		// (Receiver.reconnect).
		if w.idle2(h, "repl") {
			w.release(h, fmt.Sprintf("the slot %s is past the segment this receiver would stream again", w.slot))
		}
		return
	}
	tli, start := h.core.Resume()
	if w.hist.Owner(tli, 0) == 0 || tli > w.tli() {
		w.fail("%s asked for timeline %d, which the server does not have", h.name, tli)
	}
	if uint64(start)/uint64(w.size) < w.recycled {
		w.fail("%s asked to stream from %s on timeline %d, but the server recycled everything before segment %X: the slot moved past WAL walship did not hold", h.name, start, tli, w.recycled)
	}
	tlEnd := w.tlEnd(tli)
	if start > tlEnd {
		w.fail("%s asked for %s on timeline %d, which ended at %s", h.name, start, tli, tlEnd)
	}
	if tli < w.tli() && start == tlEnd {
		next := w.nextTLI(tli)
		w.logf("%s: connect %d/%s: timeline ended there; next %d", h.name, tli, start, next)
		if err := h.core.EndTimeline(next, tlEnd, w.historyFile(next)); err != nil {
			w.logf("end timeline: %v", err)
		}
		return
	}
	if err := h.core.Open(start); err != nil {
		w.logf("%s: connect %d/%s: open: %v", h.name, tli, start, err)
		return
	}
	h.sess = &session{tli: tli, pos: start}
	h.sessions++
	w.logf("%s: connect %d/%s", h.name, tli, start)
}

// idle2: none of h's loops but the one calling is in a call.
func (w *World) idle2(h *host, self string) bool {
	for _, l := range []string{"repl", "pub", "watch", "house"} {
		if l != self && w.busy[h.actor(l)] {
			return false
		}
	}
	return true
}

// release ends a receiver's run without a crash: it starts over from its
// spool and the slot (Receiver.Run after errReplan or ErrSlotActive).
func (w *World) release(h *host, why string) {
	w.logf("%s: starts over: %s", h.name, why)
	w.stageRelease(h)
	h.core.Release()
	h.core, h.sess = nil, nil
	w.count("receiver replans")
}

func (w *World) nextTLI(tli uint32) uint32 {
	for i, t := range w.hist {
		if t.TLI == tli {
			return w.hist[i+1].TLI
		}
	}
	w.fail("no timeline after %d", tli)
	return 0
}

func (w *World) endSession(h *host, why string, err error) {
	w.logf("%s: session ends: %s: %v", h.name, why, err)
	h.sess = nil
	h.core.CloseSession()
}

func (w *World) recvStream(h *host) {
	s := h.sess
	limit := w.tlEnd(s.tli)
	if s.pos < limit {
		n := min(pipeline.LSN(1+w.rng.IntN(int(w.size)*3/10)), limit-s.pos)
		if cap(w.buf) < int(n) {
			w.buf = make([]byte, w.size)
		}
		buf := w.buf[:n]
		walgen.Fill(buf, s.pos, s.tli, limit, w.hist, sysID, w.size)
		if err := h.core.WAL(s.pos, buf); err != nil {
			w.endSession(h, "wal", err)
			return
		}
		s.pos += n
		return
	}
	if s.tli == w.tli() {
		return // caught up: a keepalive
	}
	// CopyDone: the server ended the timeline; walship reports, then
	// follows it.
	w.recvStatus(h)
	if h.sess == nil {
		return
	}
	next := w.nextTLI(s.tli)
	err := h.core.EndTimeline(next, limit, w.historyFile(next))
	w.endSession(h, fmt.Sprintf("timeline %d ended at %s", s.tli, limit), err)
}

func (w *World) recvStatus(h *host) {
	write, flush, err := h.core.Status()
	if err != nil {
		w.endSession(h, "status", err)
		return
	}
	w.checkWrite(h, write)
	w.checkFlush(flush)
	if flush < h.flushed {
		w.fail("%s reported flush %s after %s: flush moved back within a receiver's life", h.name, flush, h.flushed)
	}
	if flush > h.flushed && w.size.Offset(flush) != 0 && flush != w.initial && flush != w.gapFloor && !w.switchPoint(flush) {
		w.count("flush inside a segment") // moved there by confirmed ranges
	}
	h.flushed = flush
	w.logf("%s: status write %s flush %s", h.name, write, flush)
	if flush != 0 {
		w.slot = flush
		w.recycled = max(w.recycled, uint64(flush)/uint64(w.size))
	}
	w.lastSent = flush
}

// recvCut: the partial interval passed; the receiver fsyncs and reports
// (usually: the status may also have gone out just before), then cuts a
// range of the segment being written.
func (w *World) recvCut(h *host) {
	if w.rng.IntN(4) != 0 {
		if w.recvStatus(h); h.sess == nil {
			return
		}
	}
	before := h.fs.count(".range")
	if err := h.core.CutRange(); err != nil {
		w.endSession(h, "cut range", err)
		return
	}
	if n := h.fs.count(".range"); n > before {
		w.count("ranges cut")
		w.logf("%s: range cut", h.name)
	}
}

func (w *World) recvPublish(h *host) {
	it, ok := h.core.TryNext()
	if !ok {
		return
	}
	core := h.core
	err := core.Publish(context.Background(), publisher{w.js}, it)
	w.logf("%s: publish %s attempt %d: %v", h.name, it.Event().File, it.Event().Attempt, err)
	if err != nil {
		core.Retry(it)
	}
}

func (w *World) recvConfirm(h *host) {
	m := w.js.archivedAfter(h.watched)
	if m == nil {
		return
	}
	if w.rng.IntN(10) != 0 { // sometimes delivered twice
		h.watched = m.seq
	}
	ev, err := pipeline.DecodeArchivedEvent(m.data)
	if err != nil {
		h.core.Undecodable(err)
		return
	}
	// A backup chunk's confirmation costs the watcher nothing: it is
	// handed over (e4) and the next one is read in the same step, so
	// backups do not slow the receiver's replay of confirmations.
	for ev.Kind == pipeline.KindBackup && h.watched == m.seq {
		before := h.core.Flush()
		h.core.Archived(ev)
		if h.core.Flush() != before {
			w.fail("(e4) the confirmation of backup chunk %s moved %s's flush from %s to %s", ev.File, h.name, before, h.core.Flush())
		}
		if m = w.js.archivedAfter(h.watched); m == nil {
			return
		}
		h.watched = m.seq
		if ev, err = pipeline.DecodeArchivedEvent(m.data); err != nil {
			h.core.Undecodable(err)
			return
		}
	}
	before := h.core.Flush()
	h.core.Archived(ev)
	if ev.Kind == pipeline.KindBackup && h.core.Flush() != before {
		w.fail("(e4) the confirmation of backup chunk %s moved %s's flush from %s to %s", ev.File, h.name, before, h.core.Flush())
	}
	w.logf("%s: confirm %s (%s) flush %s", h.name, ev.File, ev.Kind, h.core.Flush())
}

func (w *World) recvTick(h *host) {
	if n := h.core.Tick(w.now, republishAfter); n > 0 {
		w.logf("%s: tick: %d files to check", h.name, n)
		w.count("republish checks")
	}
}

func (w *World) recvCrash(h *host) {
	w.logf("%s: receiver crashes", h.name)
	h.fs.crash()
	w.stageProcessDies(h)
	h.core, h.sess = nil, nil
	w.count("receiver crashes")
	if !w.stage {
		// walship run: the archivers live in the receiver's process.
		for _, a := range w.archs {
			w.archCrash(a)
		}
	}
}

// The archivers.

func (w *World) archiveStep(a *arch) {
	d := w.js.next(a)
	if d == nil {
		return
	}
	a.st.handles++
	out := a.a.Handle(a.ctx, a.w, d)
	var ev pipeline.SegmentEvent
	json.Unmarshal(d.Data(), &ev)
	w.checkStageOutcome(a, &ev, out)
	w.logf("%s: %s %s (delivery %d)", a.name, out, ev.File, d.n)
	if out == archiver.Acked {
		if ev.Kind == pipeline.KindBackup {
			w.count("backup chunks archived")
		} else if ev.Kind == pipeline.KindRange {
			w.count("ranges archived")
		} else {
			w.count("archived")
		}
	}
}

func (w *World) archCrash(a *arch) {
	w.logf("%s crashes", a.name)
	a.cancel()
	w.startArchiver(a)
}

// Faults of the neighbours.

func (w *World) natsOutage() {
	d := time.Duration(1+w.rng.IntN(20*60)) * time.Second
	w.js.downTill = w.now.Add(d)
	w.logf("nats down for %s", d)
}

func (w *World) natsCrash() {
	window := time.Duration(w.rng.IntN(3000)) * time.Millisecond
	n := w.js.crash(window)
	w.logf("nats crashes, losing %d writes of the last %s", n, window)
}

func (w *World) s3Outage() {
	d := time.Duration(1+w.rng.IntN(30*60)) * time.Second
	w.bkt.downTill = w.now.Add(d)
	w.logf("s3 down for %s", d)
}

// injectConflict puts someone else's object where a segment the receiver
// has not finished yet will go.
func (w *World) injectConflict() {
	seg := pipeline.SegmentOf(w.tli(), w.end, w.size).Next()
	key := w.layout.Key(seg.Name(w.size), w.codec.Ext())
	if _, ok := w.bkt.objs[key]; ok {
		return
	}
	w.bkt.objs[key] = &stored{body: []byte("not this segment"), meta: sinks.Metadata{SHA256: strings.Repeat("0", 64)}, foreign: true}
	w.conflict = key
	w.logf("conflict placed at %s", key)
}

// rangeLitter puts someone else's object beside the ranges of the segment
// being written, under its range prefix but not named like a range: the
// archivers must leave it alone when they delete the segment's ranges.
func (w *World) rangeLitter() {
	name := pipeline.SegmentOf(w.tli(), w.end, w.size).Name(w.size)
	key := w.layout.RangePrefix(name) + "notes.txt"
	if _, ok := w.bkt.objs[key]; ok {
		return
	}
	w.bkt.objs[key] = &stored{body: []byte("an operator's notes"), foreign: true}
	w.logf("foreign object placed at %s", key)
}

// truncateSpool damages a complete spool segment while the receiver is
// down, as a bad disk or a careless operator might: the restart must
// notice and stream it again.
func (w *World) truncateSpool(h *host) {
	for _, n := range sortedNames(h.fs.files) {
		base := path.Base(n)
		if !pipeline.IsSegmentName(base) || w.rng.IntN(2) == 0 {
			continue
		}
		ino := h.fs.files[n]
		cut := w.rng.IntN(max(ino.size, 1))
		ino.data = ino.data[:min(cut, len(ino.data))]
		ino.size, ino.syncedLen, ino.syncedSize = cut, min(ino.syncedLen, cut), cut
		w.logf("%s: spool segment %s truncated to %d bytes", h.name, base, cut)
		return
	}
}

// damageSpool damages a spool WAL file in place while the receiver is
// down, keeping its size: a zeroed tail, a flipped bit, a history file that
// lost its last line, an ended segment cut short.
func (w *World) damageSpool(h *host) {
	names := sortedNames(h.fs.files)
	for _, i := range w.rng.Perm(len(names)) {
		n := names[i]
		base := path.Base(n)
		ino := h.fs.files[n]
		switch {
		case strings.HasSuffix(base, ".history"):
			lines := strings.SplitAfter(strings.TrimSuffix(string(ino.data), "\n"), "\n")
			if len(lines) < 2 {
				continue
			}
			ino.data = []byte(strings.Join(lines[:len(lines)-1], ""))
			ino.size, ino.syncedLen, ino.syncedSize = len(ino.data), len(ino.data), len(ino.data)
			w.logf("%s lost its last line", base)
		case strings.Contains(base, ".partial.ended") && !strings.HasSuffix(base, ".sha256"):
			cut := ino.size / 2
			ino.data = ino.data[:min(cut, len(ino.data))]
			ino.size, ino.syncedLen, ino.syncedSize = cut, min(ino.syncedLen, cut), cut
			w.logf("%s cut to %d bytes", base, cut)
		case strings.HasSuffix(base, ".range") && len(ino.data) > 0:
			ino.data[w.rng.IntN(len(ino.data))] ^= 0x40
			w.logf("%s: a bit flipped", base)
		case pipeline.IsSegmentName(base) && len(ino.data) == int(w.size):
			if w.rng.IntN(2) == 0 {
				clear(ino.data[len(ino.data)-8192:])
				w.logf("%s: last page zeroed", base)
			} else {
				ino.data[w.rng.IntN(len(ino.data))] ^= 0x40
				w.logf("%s: a bit flipped", base)
			}
		default:
			continue
		}
		return
	}
}

// deleteSpoolFile removes a complete segment while the receiver is down
// (to free a full disk, or fsck's lost+found), as an operator might.
func (w *World) deleteSpoolFile(h *host) {
	for _, n := range sortedNames(h.fs.files) {
		if pipeline.IsSegmentName(path.Base(n)) && w.rng.IntN(2) == 0 {
			delete(h.fs.files, n)
			delete(h.fs.durable, n)
			w.logf("%s deleted from %s's spool", path.Base(n), h.name)
			return
		}
	}
}

// recreateSlot drops the slot and creates it again at the server's
// position, as 'walship slot create --recreate' does after an
// invalidation: the archive may have a gap from here back to the bucket's
// end, which the spool fills as far as it can.
func (w *World) recreateSlot() {
	if w.recreated >= 2 || w.rng.IntN(4) != 0 {
		return // an operator's rare decision
	}
	w.recreated++
	w.slot = w.end
	w.gapFloor = w.end
	w.recycled = max(w.recycled, uint64(w.end)/uint64(w.size))
	w.logf("slot recreated at %s", w.slot)
}

// forgeConfirm publishes a confirmation that must not count: another
// destination's, or other bytes'.
func (w *World) forgeConfirm() {
	fs := w.hosts[w.rng.IntN(len(w.hosts))].fs
	files, _ := fs.handle().ReadDir(spoolDir)
	for _, f := range files {
		if !pipeline.IsSegmentName(f.Name) {
			continue
		}
		seg, _ := pipeline.ParseSegmentName(f.Name, w.size)
		ev := pipeline.ArchivedEvent{SegmentEvent: pipeline.SegmentEvent{V: 1, Server: server, SystemID: strconv.FormatUint(sysID, 10),
			Timeline: seg.Timeline, File: f.Name, Kind: pipeline.KindSegment, StartLSN: seg.StartLSN(w.size), EndLSN: seg.EndLSN(w.size),
			Size: int64(w.size), SegSize: uint64(w.size), SHA256: strings.Repeat("1", 64)}, Key: "k", Dest: dest}
		if w.rng.IntN(2) == 0 {
			data, _ := io.ReadAll(must(fs.handle().Open(path.Join(spoolDir, f.Name))))
			sum := sha256.Sum256(data)
			ev.SHA256, ev.Dest = pipeline.SHA256Hex(sum[:]), "s3://old-bucket/prefix"
		}
		data, _ := json.Marshal(ev)
		w.js.archived.publish(w, fmt.Sprintf("forged/%d", w.steps), data)
		w.logf("forged confirmation of %s (dest %s)", f.Name, ev.Dest)
		return
	}
}

// settle stops the faults, lets the server finish its segment, and waits
// for flush to reach it: liveness.
func (w *World) settle() {
	w.faultsOn = false
	w.js.downTill, w.bkt.downTill, w.diskFull = w.now, w.now, false
	w.stageSettle()
	if w.conflict != "" {
		delete(w.bkt.objs, w.conflict) // the operator removes it
		w.logf("operator removes the conflicting %s", w.conflict)
	}
	if off := w.size.Offset(w.end); off != 0 {
		w.end += pipeline.LSN(int64(w.size) - off)
	}
	w.budget = w.end
	w.logf("settle: faults stop; the server's WAL ends at %s", w.end)
	began := w.now
	for w.lastSent != w.end {
		if w.now.Sub(began) > time.Hour || w.steps > w.opt.Steps+50000 {
			w.fail("(d) liveness: an hour after the faults stopped flush is %s, the server's WAL ends at %s (receiver up %v, %s)",
				w.lastSent, w.end, w.running(), w.pendingSummary())
		}
		w.step(false)
	}
	w.logf("settled after %s", w.now.Sub(began).Round(time.Second))
	w.settleBackup()
	w.stageDrain()
	for name, spans := range w.bkt.ranges {
		if w.walshipObject(w.layout.Key(name, w.codec.Ext())) != nil || w.walshipObject(w.layout.Key(name+".partial", w.codec.Ext())) != nil {
			w.res.Counts["ranges left behind"] += len(spans) // best effort: harmless, counted
		}
	}
}

func must(r io.ReadCloser, err error) io.Reader {
	if err != nil {
		return strings.NewReader("")
	}
	return r
}

func (w *World) running() string {
	var up []string
	for _, h := range w.hosts {
		up = append(up, fmt.Sprintf("%s %v", h.name, h.core != nil))
	}
	return strings.Join(up, ", ")
}

func (w *World) pendingSummary() string {
	var names []string
	for _, h := range w.hosts {
		for _, n := range sortedNames(h.fs.files) {
			names = append(names, h.name+":"+path.Base(n))
		}
	}
	return fmt.Sprintf("spool %v, %d events queued, %d confirmations", names, len(w.js.segments.msgs), len(w.js.archived.msgs))
}
