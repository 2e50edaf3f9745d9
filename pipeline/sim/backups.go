package sim

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"path"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/walship/walship/pipeline"
	"github.com/walship/walship/pipeline/backup"
	"github.com/walship/walship/pipeline/backup/retention"
	"github.com/walship/walship/pipeline/backup/take"
	"github.com/walship/walship/sinks"
)

// Base backups and retention in the simulation. A backup actor plays
// BASE_BACKUP's server side and drives the REAL take code (take.Steps: its
// chunker, window of unconfirmed chunks, confirmation matching,
// republication, WAL coverage check and catalogue); its chunks go through
// the simulated JetStream to the REAL archivers, under the same faults. A
// prune actor runs the REAL retention plan and execution on the bucket.
// Both are one actor ("bkp"): a prune never runs while a backup step is in
// the middle of a call, so the policy the sim computes before a prune is
// the one the prune sees.
//
// Invariants, after every step and at every delete:
//
//	(e1) every catalogue in the bucket names chunks that are all there with
//	     exactly the bytes the backup produced, and the bucket holds the WAL
//	     from its start LSN to its end LSN (on the server's line);
//	(e2) prune deletes no object of a backup the policy keeps, a chunk only
//	     once its backup's catalogue is gone, no history file, no WAL of a
//	     segment that ends past the floor (the start of the segment holding
//	     the oldest kept backup's start), on any timeline, and nothing but
//	     backups' objects and WAL;
//	(e3) flush never passes the WAL the bucket holds from the prune floor up
//	     (checkFlush; contiguousEnd starts at w.walFloor);
//	(e4) a backup chunk's confirmation never moves a receiver's flush.

const (
	bkActor      = "bkp"
	maxBackups   = 6
	bkChunkSize  = 64 << 10 // take's smallest
	bkPGVersion  = 150004
	manifestJSON = `{"PostgreSQL-Backup-Manifest-Version": 1, "Files": [], "Manifest-Checksum": "%064x"}`
)

// simBackup is one backup the actor takes.
type simBackup struct {
	st       *take.Steps
	id       string
	tli      uint32
	start    pipeline.LSN
	started  bool // started.json written
	streams  []bkStream
	cur      int // stream being sent; len(streams): data ended
	off      int
	begun    bool // streams[cur] announced
	ended    bool
	watched  uint64
	gapFloor pipeline.LSN      // the slot's recreation point when it began
	produced map[string][]byte // chunk name (relative to BackupPrefix) -> raw bytes
}

type bkStream struct {
	name string // base.tar, <oid>.tar, or "" for the manifest
	data []byte
}

// backups is the backup actor's world state.
type backups struct {
	cur      *simBackup
	n        int
	produced map[string][]byte          // every chunk any backup produced, by key without extension
	catalogs map[string]*backup.Catalog // catalogues written, by key
	// walFloor: WAL of segments ending at or below it may be gone (pruned).
	walFloor pipeline.LSN
	pruned   map[string]bool // keys prune deleted
	checked  [2]int          // catalogues and deletes when (e1) last ran
	prune    *pruneCheck     // the prune running, if any
}

func (w *World) backupActions() []action {
	bk := func() *simBackup { return w.bk.cur }
	return []action{
		{"backup-start", bkActor, 1, false, func() bool { return bk() == nil && w.bk.n < maxBackups }, w.backupStart},
		{"backup-data", bkActor, 6, false, func() bool { return bk() != nil && !bk().ended }, w.backupData},
		{"backup-publish", bkActor, 6, false, func() bool { return bk() != nil && bk().started }, w.backupPublish},
		{"backup-confirm", bkActor, 6, false, func() bool { return bk() != nil && bk().started && !w.js.down() }, w.backupConfirm},
		{"backup-tick", bkActor, 1, false, func() bool { return bk() != nil && bk().started }, func() {
			if n := bk().st.Republish(w.now); n > 0 {
				w.logf("backup %s: %d chunks to publish again", bk().id, n)
			}
		}},
		{"backup-finish", bkActor, 2, false, func() bool { return bk() != nil && bk().ended && bk().st.InFlight() == 0 }, w.backupFinish},
		{"backup-kill", "fault", 1, true, func() bool { return bk() != nil && !w.busy[bkActor] && w.rng.IntN(4) == 0 }, func() { w.backupAbandon("the walship backup process is killed") }},
		{"prune", bkActor, 1, false, func() bool { return len(w.bk.catalogs) > 0 || w.bk.n > 0 }, w.pruneRun},
	}
}

// backupSink is the bucket as walship backup and prune see it.
func (w *World) backupSink(name string) *bucketFor {
	return &bucketFor{b: w.bkt, a: &arch{name: bkActor}, as: name}
}

// backupBus is JetStream as walship backup sees it.
type backupBus struct{ publisher }

func (backupBus) WatchArchived(context.Context, string, time.Time, func(pipeline.ArchivedEvent), func(error)) error {
	return errors.New("sim: confirmations are fed by the backup actor")
}

func (w *World) backupStart() {
	t, err := take.New(take.Config{
		Server: server, Options: take.Options{Checkpoint: "fast"}, ChunkSize: bkChunkSize, Window: 1 + w.rng.IntN(4),
		RepublishAfter: republishAfter, Dest: dest, LayoutFor: func(string) sinks.Layout { return w.layout },
		Log: w.logger("backup"), Now: func() time.Time { return w.now },
	}, backupBus{publisher{w.js}}, w.backupSink("backup"))
	if err != nil {
		w.fail("take: %v", err)
	}
	st, err := t.Steps(context.Background(), server, strconv.FormatUint(sysID, 10), bkPGVersion, w.size)
	if err != nil {
		w.logf("backup: cannot begin: %v", err)
		return
	}
	// BASE_BACKUP starts at its checkpoint's redo point: a recent position
	// on the current timeline, whose WAL the archive will hold.
	start := w.end - pipeline.LSN(w.rng.IntN(int(w.size)))
	start = max(start, w.hist[len(w.hist)-1].Begin, w.initial, w.gapFloor, w.slot-min(w.slot, pipeline.LSN(w.size)))
	start = min(w.recordBoundary(start), w.end)
	b := &simBackup{st: st, id: st.ID(), tli: w.tli(), start: start, produced: map[string][]byte{}, gapFloor: w.gapFloor}
	b.watched = w.js.archivedSince(w.now.Add(-time.Minute))
	// Mostly one short chunk (hashing and compressing bulk costs seeds);
	// sometimes several, to fill the window.
	size := func(most, some int) int {
		if w.rng.IntN(4) == 0 {
			return w.rng.IntN(some)
		}
		return w.rng.IntN(most)
	}
	b.streams = append(b.streams, bkStream{"base.tar", w.randomBytes(size(16<<10, 5*bkChunkSize/2))})
	if w.rng.IntN(4) == 0 { // a tablespace
		b.streams = append(b.streams, bkStream{strconv.Itoa(16384+w.rng.IntN(1000)) + ".tar", w.randomBytes(size(4<<10, 3*bkChunkSize/2))})
	}
	b.streams = append(b.streams, bkStream{"", []byte(fmt.Sprintf(manifestJSON, w.rng.Uint64()))})
	for _, s := range b.streams {
		arch := backup.ArchiveManifest
		if s.name != "" {
			arch = strings.TrimSuffix(s.name, ".tar")
		}
		for seq := 0; seq == 0 || seq*bkChunkSize < len(s.data); seq++ {
			b.produced[backup.ChunkName(b.id, arch, seq)] = s.data[seq*bkChunkSize : min(len(s.data), (seq+1)*bkChunkSize)]
		}
	}
	for k, v := range b.produced {
		w.bk.produced[w.layout.BackupPrefix()+k] = v
	}
	w.bk.cur = b
	w.bk.n++
	w.count("backups started")
	w.logf("backup %s begins at %d/%s", b.id, b.tli, b.start)
}

func (w *World) randomBytes(n int) []byte {
	b := make([]byte, n)
	for i := 0; i+8 <= n; i += 8 {
		v := w.rng.Uint64()
		for j := 0; j < 8; j++ {
			b[i+j] = byte(v >> (8 * j))
		}
	}
	return b
}

// backupAbandon: the backup fails or its process dies; whatever it put in
// the bucket stays there, without a catalogue.
func (w *World) backupAbandon(why string) {
	w.logf("backup %s abandoned: %s", w.bk.cur.id, why)
	w.bk.cur = nil
	w.count("backups abandoned")
}

func (w *World) backupData() {
	b := w.bk.cur
	if !b.started {
		if err := b.st.Started(b.tli, b.start); err != nil {
			if errors.Is(err, errOutage) {
				return // walship backup retries its connection... the sim: later
			}
			w.backupAbandon(err.Error())
			return
		}
		b.started = true
		return
	}
	if b.cur == len(b.streams) {
		if !b.st.CanClose() {
			return
		}
		if w.tli() != b.tli {
			// PostgreSQL: "the standby was promoted during online backup".
			w.backupAbandon("the server changed timeline during the backup")
			return
		}
		end := w.recordBoundary(w.end)
		if end > w.end {
			end = w.end
		}
		if err := b.st.End(b.tli, end); err != nil {
			w.fail("backup end: %v", err)
		}
		b.ended = true
		w.logf("backup %s: data sent, ends at %s", b.id, end)
		return
	}
	s := b.streams[b.cur]
	if !b.begun {
		if !b.st.CanClose() {
			return // the stream before ends with a chunk: the window is full
		}
		var err error
		if s.name == "" {
			err = b.st.Manifest()
		} else {
			err = b.st.Archive(s.name, "")
		}
		if err != nil {
			w.fail("backup %s: begin %q: %v", b.id, s.name, err)
		}
		b.begun = true
	}
	n := min(len(s.data)-b.off, b.st.Room(), 1+w.rng.IntN(40<<10))
	if n > 0 {
		if err := b.st.Data(s.data[b.off : b.off+n]); err != nil {
			w.fail("backup %s: data: %v", b.id, err)
		}
		b.off += n
	}
	if b.off == len(s.data) {
		b.cur, b.off, b.begun = b.cur+1, 0, false // the next stream (or End) closes this one
	}
}

func (w *World) backupPublish() {
	b := w.bk.cur
	any, err := b.st.Publish(context.Background())
	if any {
		w.logf("backup %s: publish: %v", b.id, err)
	}
}

func (w *World) backupConfirm() {
	b := w.bk.cur
	m := w.js.archivedAfter(b.watched)
	if m == nil {
		return
	}
	b.watched = m.seq
	ev, err := pipeline.DecodeArchivedEvent(m.data)
	if err != nil {
		return
	}
	if b.st.Confirm(ev) {
		w.count("backup chunks confirmed")
	}
}

func (w *World) backupFinish() {
	b := w.bk.cur
	ctx := context.Background()
	missing, err := b.st.MissingWAL(ctx)
	if err != nil || missing != "" {
		return
	}
	cat, err := b.st.Catalog(ctx)
	if err != nil {
		w.logf("backup %s: catalogue: %v", b.id, err)
		if w.bk.cur == b && !errors.Is(err, errOutage) && w.rng.IntN(4) == 0 {
			w.backupAbandon("walship backup failed: " + err.Error())
		}
		return
	}
	if w.bk.cur == b {
		w.bk.cur = nil
	}
	w.count("backups complete")
	w.logf("backup %s complete: %d/%s..%s", cat.ID, cat.Timeline, cat.StartLSN, cat.EndLSN)
}

// checkTakeBack: walship backup deletes only its own catalogue, and only
// when, after writing it, it finds its start marker or one of its chunks
// gone (a prune took it for abandoned meanwhile). The catalogue is then
// no longer one (e1) checks.
func (w *World) checkTakeBack(key string) {
	c, ok := w.bk.catalogs[key]
	if !ok || path.Base(key) != backup.CatalogFile {
		w.fail("(e1) walship backup deletes %s, which is not a catalogue it wrote", key)
		return
	}
	pre := w.layout.BackupPrefix()
	gone := w.bkt.objs[backup.StartedKey(pre, c.ID)] == nil
	for _, a := range append(append([]backup.Archive(nil), c.Archives...), c.Manifest) {
		for _, ch := range a.Chunks {
			gone = gone || w.bkt.objs[ch.Key] == nil
		}
	}
	if !gone {
		w.fail("(e1) walship backup deletes its catalogue %s while its marker and chunks are all there", key)
		return
	}
	delete(w.bk.catalogs, key)
	w.count("catalogues taken back")
}

// checkBackupPut is invariant (c) for the backup's objects: a chunk holds
// exactly the bytes the backup produced; a catalogue decodes and is
// recorded for (e1).
func (w *World) checkBackupPut(key string, o *stored) error {
	rel := strings.TrimPrefix(key, w.layout.BackupPrefix())
	switch path.Base(rel) {
	case backup.StartedFile:
		return nil
	case backup.CatalogFile:
		c, err := backup.DecodeCatalog(o.body)
		if err != nil {
			return fmt.Errorf("%s: %v", key, err)
		}
		w.bk.catalogs[key] = &c
		return nil
	}
	name, ok := strings.CutSuffix(rel, w.codec.Ext())
	if !ok {
		return fmt.Errorf("%s: not a %s object", key, w.codec)
	}
	want, ok := w.bk.produced[w.layout.BackupPrefix()+name]
	if !ok {
		return fmt.Errorf("%s: no backup produced this chunk", key)
	}
	raw, err := w.decodeN(key, o, bkChunkSize)
	if err != nil {
		return err
	}
	if !bytes.Equal(raw, want) || o.meta.SHA256 != newContent(want).sum {
		return fmt.Errorf("%s does not hold the chunk's bytes", key)
	}
	o.raw = raw
	return nil
}

// checkBackups is (e1), after every step.
func (w *World) checkBackups() {
	// Objects are immutable and checked when put: only a new catalogue or
	// a delete can break (e1).
	if v := [2]int{len(w.bk.catalogs), w.bkt.deletes}; v != w.bk.checked {
		w.bk.checked = v
	} else {
		return
	}
	for key, c := range w.bk.catalogs {
		if w.walshipObject(key) == nil {
			continue // pruned
		}
		for _, a := range append(append([]backup.Archive(nil), c.Archives...), c.Manifest) {
			for _, ch := range a.Chunks {
				o := w.walshipObject(ch.Key)
				want, ok := w.bk.produced[strings.TrimSuffix(ch.Key, w.codec.Ext())]
				// o.raw: checkBackupPut found the backup's bytes there,
				// with their SHA-256 in the metadata.
				if o == nil || !ok || o.raw == nil || len(o.raw) != len(want) || ch.SHA256 != o.meta.SHA256 || ch.Size != int64(len(want)) {
					w.fail("(e1) catalogue %s names chunk %s, which the bucket does not hold with the backup's bytes (object: %v)", key, ch.Key, o != nil)
				}
			}
		}
		for n := uint64(c.StartLSN) / uint64(w.size); n <= uint64(c.EndLSN-1)/uint64(w.size); n++ {
			need := min(pipeline.LSN((n+1)*uint64(w.size)), c.EndLSN)
			if got := w.coverage(n); got < need {
				w.fail("(e1) catalogue %s (%s..%s): the bucket holds segment %X's WAL only to %s", key, c.StartLSN, c.EndLSN, n, got)
			}
		}
	}
}

// pruneCheck is what a prune may delete, by the sim's own reading of the
// policy.
type pruneCheck struct {
	keep  map[string]bool // backup IDs
	floor pipeline.LSN
}

func (w *World) pruneRun() {
	p := retention.Policy{Now: w.now, IncompleteAfter: time.Duration(1+w.rng.IntN(120)) * time.Minute}
	switch w.rng.IntN(3) {
	case 0:
		p.Keep = 1 + w.rng.IntN(3)
	case 1:
		p.KeepWithin = time.Duration(1+w.rng.IntN(60)) * time.Minute
	default:
		p.Keep, p.KeepWithin = 1+w.rng.IntN(3), time.Duration(1+w.rng.IntN(60))*time.Minute
	}
	pc := w.policy(p)
	w.logf("prune keep %d within %s incomplete-after %s: the sim keeps %v, floor %s", p.Keep, p.KeepWithin, p.IncompleteAfter, sortedKeys(pc.keep), pc.floor)
	w.bk.prune = pc
	defer func() { w.bk.prune = nil }()
	ctx := context.Background()
	sink := w.backupSink("prune")
	st, err := retention.Scan(ctx, sink, w.layout, retention.Options{Identities: w.ids})
	if err != nil {
		w.logf("prune: scan: %v", err)
		return
	}
	plan, err := retention.NewPlan(st, p)
	if err != nil {
		w.logf("prune: plan: %v", err)
		return
	}
	res, err := retention.Execute(ctx, sink, st, plan)
	w.logf("prune: floor %s (%s): %+v %v", plan.Floor, plan.FloorReason, res, err)
	w.count("prunes")
	w.res.Counts["objects pruned"] += res.Objects
	w.res.Counts["WAL objects pruned"] += res.WAL
}

// policy is the sim's own reading of a keep policy over the catalogues in
// the bucket: the backups kept and the WAL floor.
func (w *World) policy(p retention.Policy) *pruneCheck {
	var cats []*backup.Catalog
	for key, c := range w.bk.catalogs {
		if w.walshipObject(key) != nil {
			cats = append(cats, c)
		}
	}
	sort.Slice(cats, func(i, j int) bool {
		if !cats[i].EndTime.Equal(cats[j].EndTime) {
			return cats[i].EndTime.After(cats[j].EndTime)
		}
		return cats[i].ID > cats[j].ID
	})
	pc := &pruneCheck{keep: map[string]bool{}}
	older := false
	for i, c := range cats {
		within := p.KeepWithin > 0 && !c.EndTime.Before(p.Now.Add(-p.KeepWithin))
		if i < p.Keep || within || p.KeepWithin > 0 && !older && !within {
			pc.keep[c.ID] = true
		}
		if p.KeepWithin > 0 && !within {
			older = true
		}
	}
	for _, c := range cats {
		if pc.keep[c.ID] && (pc.floor == 0 || c.StartLSN < pc.floor) {
			pc.floor = c.StartLSN
		}
	}
	pc.floor = w.size.Start(pc.floor)
	return pc
}

// checkPruneDelete is (e2), at every delete a prune makes.
func (w *World) checkPruneDelete(key string) {
	pc := w.bk.prune
	// Prune goes by key: an object at a WAL key below the floor goes
	// whoever put it there (the conflict fault's, too).
	_, exists := w.bkt.objs[key]
	if rel, ok := strings.CutPrefix(key, w.layout.BackupPrefix()); ok {
		id, _, _ := strings.Cut(rel, "/")
		if pc.keep[id] {
			w.fail("(e2) prune deletes %s of backup %s, which the policy keeps", key, id)
		}
		cat := backup.CatalogKey(w.layout.BackupPrefix(), id)
		if key != cat && w.walshipObject(cat) != nil {
			w.fail("(e2) prune deletes %s while backup %s's catalogue is still there", key, id)
		}
		return
	}
	var seg pipeline.Segment
	if s, _, _, ok := w.parseRangeKey(key); ok {
		seg = s
	} else if file, ok := strings.CutSuffix(path.Base(key), w.codec.Ext()); ok && w.layout.Key(file, w.codec.Ext()) == key && pipeline.IsSegmentName(strings.TrimSuffix(file, ".partial")) {
		seg, _ = pipeline.ParseSegmentName(strings.TrimSuffix(file, ".partial"), w.size)
	} else {
		w.fail("(e2) prune deletes %s, which is neither a backup's object nor WAL", key)
	}
	if pc.floor == 0 || seg.EndLSN(w.size) > pc.floor {
		w.fail("(e2) prune deletes %s (timeline %d, segment ends at %s), at or above the floor %s of the backups it keeps", key, seg.Timeline, seg.EndLSN(w.size), pc.floor)
	}
	if exists {
		w.bk.walFloor = max(w.bk.walFloor, seg.EndLSN(w.size))
		w.bk.pruned[key] = true
	}
}

func sortedKeys(m map[string]bool) []string {
	var out []string
	for k := range m {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}

// settleBackup is liveness for backups: once the faults stop and flush
// has reached the server's end, the backup in progress completes, unless
// the archive cannot hold its WAL (the slot was recreated past its start,
// an operator's choice) or the server changed timeline under it.
func (w *World) settleBackup() {
	b := w.bk.cur
	if b == nil {
		return
	}
	if b.gapFloor != w.gapFloor {
		w.backupAbandon("the slot was recreated during the backup: its WAL may have a gap")
		return
	}
	began := w.now
	for w.bk.cur == b {
		if w.now.Sub(began) > time.Hour || w.steps > w.opt.Steps+100000 {
			w.fail("(d) liveness: an hour after the faults stopped backup %s is not complete (%d chunks in flight, data ended %v)", b.id, b.st.InFlight(), b.ended)
		}
		w.step(false)
	}
	w.logf("backup settled after %s", w.now.Sub(began).Round(time.Second))
}
