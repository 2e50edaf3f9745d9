package receiver

import (
	"container/heap"
	"context"
	"path/filepath"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"github.com/walship/walship/pipeline"
)

// tracker holds the WAL files between "durable in the spool" and "the
// bucket holds it": the publish queue, the flush position and the times the
// lag metrics need. The replication loop adds to it, the publisher drains
// its queue, the confirmation watcher confirms; flush is read lock-free.
//
// Flush is one rule, on every timeline at once: the lowest hold of the
// pending files, or the frontier (the start of the segment being written,
// moved on over the ranges of it the bucket holds contiguously from its
// start) when nothing is pending, and never below the floor (the slot's
// restart_lsn at start). A file's hold is where the WAL it carries and the
// bucket may not hold starts: for a range, its first byte; for a segment or
// an ended timeline's last segment, the end of its ranges the bucket holds
// contiguously from the segment's start (its first byte when none); for a
// history file, the start of the segment its timeline begins in. A file
// enters before the frontier passes it and leaves only on a confirmation
// that matches it (or, for a range, on its segment's), so flush cannot pass
// WAL the bucket does not hold; and as holds only rise, it never moves
// back.
type tracker struct {
	size  pipeline.SegmentSize
	floor pipeline.LSN
	dest  string // confirmations must name this destination ("": any)

	mu       sync.Mutex
	frontier pipeline.LSN
	ftli     uint32 // the frontier segment's timeline
	// spans are the confirmed ranges of segments not yet confirmed whole,
	// by segment (on its timeline).
	spans map[pipeline.Segment][]span
	// inherited: for the segment a timeline began in, how far from its
	// start the bucket holds it by the previous timeline's files (the same
	// WAL below the switch). It counts for flush, never for restoring the
	// new timeline's file from its own ranges, which must start at 0.
	inherited map[pipeline.Segment]pipeline.LSN
	pending   map[string]*entry // by event MsgID
	holds     holdHeap          // lazily cleaned: entries may be gone
	queue     []string
	marks     []mark       // arrival times of received WAL, by LSN, for the lag in seconds
	archived  pipeline.LSN // end of the newest confirmed segment
	published pipeline.LSN // end of the newest published segment
	wake      chan struct{}
	// early remembers confirmations of files not (yet) in the tracker:
	// another receiver (before a takeover) or an earlier life of this one
	// archived a file that this one has not finished writing. When the file
	// arrives, the bucket is known to hold it.
	early      map[string]string // MsgID → SHA-256
	earlyOrder []string

	flush atomic.Uint64
}

// maxEarly bounds the remembered early confirmations.
const maxEarly = 10000

// span is a confirmed range, [from, to).
type span struct{ from, to pipeline.LSN }

// mark says that the WAL byte at lsn arrived at at.
type mark struct {
	lsn pipeline.LSN
	at  time.Time
}

// markEvery is the resolution of the lag in seconds: a new arrival time is
// kept at most this often.
const markEvery = 250 * time.Millisecond

type entry struct {
	ev        pipeline.SegmentEvent
	hold      pipeline.LSN
	published time.Time // last publish; zero until published
	seq       uint64    // stream sequence of the last publish (0: unknown)
	queued    bool      // in the queue
	check     bool      // queued to check: publish again only if the last event is gone
}

// item is one unit of the publisher's work.
type item struct {
	ev    pipeline.SegmentEvent
	check bool   // publish only if the event of seq is no longer queued
	seq   uint64 // the last publish's stream sequence, for the check
}

func newTracker(size pipeline.SegmentSize, floor, frontier pipeline.LSN, dest string) *tracker {
	t := &tracker{
		size: size, floor: floor, dest: dest, frontier: frontier,
		pending:   map[string]*entry{},
		early:     map[string]string{},
		spans:     map[pipeline.Segment][]span{},
		inherited: map[pipeline.Segment]pipeline.LSN{},
		wake:      make(chan struct{}, 1),
	}
	t.flush.Store(uint64(t.flushLocked()))
	return t
}

// flushLocked is the flush position: the lowest pending hold or the
// frontier, never below the floor.
func (t *tracker) flushLocked() pipeline.LSN {
	f := t.reach(pipeline.SegmentOf(t.ftli, t.frontier, t.size))
	for len(t.holds) > 0 {
		top := t.holds[0]
		if e, ok := t.pending[top.id]; ok && e.hold == top.hold {
			f = min(f, top.hold)
			break
		}
		heap.Pop(&t.holds)
	}
	return max(f, t.floor)
}

func (t *tracker) update() { t.flush.Store(uint64(t.flushLocked())) }

// reach is how far from its start the bucket holds seg's WAL: by seg's own
// confirmed ranges, or by the previous timeline's files (inherited),
// whichever goes further (the segment's start when neither holds any).
func (t *tracker) reach(seg pipeline.Segment) pipeline.LSN {
	return max(t.ownReach(seg), t.inherited[seg])
}

// ownReach is how far from its start seg's own confirmed ranges hold it
// contiguously: what a restore of seg's file from its ranges has.
func (t *tracker) ownReach(seg pipeline.Segment) pipeline.LSN {
	end := seg.StartLSN(t.size)
	for moved := true; moved; {
		moved = false
		for _, s := range t.spans[seg] {
			if s.from <= end && s.to > end {
				end, moved = s.to, true
			}
		}
	}
	return end
}

// setFrontier moves the start of the segment being written, on the same
// timeline.
func (t *tracker) setFrontier(l pipeline.LSN) {
	t.mu.Lock()
	t.setFrontierLocked(t.ftli, l)
	t.mu.Unlock()
}

// setFrontierOn moves the start of the segment being written to l on
// timeline tli.
func (t *tracker) setFrontierOn(tli uint32, l pipeline.LSN) {
	t.mu.Lock()
	t.setFrontierLocked(tli, l)
	t.mu.Unlock()
}

func (t *tracker) setFrontierLocked(tli uint32, l pipeline.LSN) {
	t.frontier, t.ftli = l, tli
	t.update()
}

// holdOf is where a file's hold starts: a whole segment's (or an ended
// timeline's last segment's) rises over the ranges of it the bucket holds.
func (t *tracker) holdOf(ev pipeline.SegmentEvent, hold pipeline.LSN) pipeline.LSN {
	switch ev.Kind {
	case pipeline.KindRange:
		// A range whose first bytes the bucket holds already holds flush
		// only from where they end, and one it holds all of, not at all
		// below that: a range cut again from the segment's start after a
		// restart, or one of a new timeline below its switch, never pulls
		// flush back.
		hold = max(hold, t.reach(pipeline.SegmentOf(ev.Timeline, ev.StartLSN, t.size)))
	case pipeline.KindSegment, pipeline.KindPartial:
		seg := pipeline.SegmentOf(ev.Timeline, ev.StartLSN, t.size)
		hold = max(hold, min(t.reach(seg), ev.EndLSN))
	default:
		// A new timeline's history is needed only for WAL past its switch
		// point; below it, what the old timeline's files hold counts.
		hold = max(hold, t.inherited[pipeline.SegmentOf(ev.Timeline, hold, t.size)])
	}
	return hold
}

// inheritedOf is how far the previous timeline's files hold seg.
func (t *tracker) inheritedOf(seg pipeline.Segment) pipeline.LSN {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.inherited[seg]
}

// ownReachOf is ownReach, for other goroutines.
func (t *tracker) ownReachOf(seg pipeline.Segment) pipeline.LSN {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.ownReach(seg)
}

// add queues a WAL file that is durable in the spool for publishing; hold
// is where its WAL starts. A file already pending with the same bytes is
// left as it is; with other bytes (the spool file was written again with
// different WAL) it is replaced and queued again. A file whose matching
// confirmation came before it is archived already: add reports that, and
// does not queue it.
func (t *tracker) add(ev pipeline.SegmentEvent, hold pipeline.LSN) (archived bool, gone []pipeline.SegmentEvent) {
	id := ev.MsgID()
	t.mu.Lock()
	if sum, ok := t.early[id]; ok && sum == ev.SHA256 {
		delete(t.early, id)
		if ev.Kind == pipeline.KindSegment || ev.Kind == pipeline.KindPartial {
			gone = t.dropRanges(pipeline.SegmentOf(ev.Timeline, ev.StartLSN, t.size), ev.EndLSN, false)
			t.update()
		}
		t.mu.Unlock()
		return true, gone
	}
	e, ok := t.pending[id]
	if ok && e.ev.SHA256 == ev.SHA256 {
		t.mu.Unlock()
		return false, nil
	}
	if !ok {
		e = &entry{}
		t.pending[id] = e
	}
	hold = t.holdOf(ev, hold)
	e.ev, e.hold, e.published, e.seq, e.check = ev, hold, time.Time{}, 0, false
	heap.Push(&t.holds, holdRef{hold: hold, id: id})
	if !e.queued {
		e.queued = true
		t.queue = append(t.queue, id)
	}
	t.update()
	t.mu.Unlock()
	t.signal()
	return false, nil
}

func (t *tracker) signal() {
	select {
	case t.wake <- struct{}{}:
	default:
	}
}

// tryNext returns the next queued item, if any.
func (t *tracker) tryNext() (item, bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	for len(t.queue) > 0 {
		id := t.queue[0]
		t.queue = t.queue[1:]
		if e, ok := t.pending[id]; ok && e.queued {
			e.queued = false
			it := item{ev: e.ev, check: e.check, seq: e.seq}
			e.check = false
			return it, true
		}
	}
	return item{}, false
}

// next blocks until an item is queued and returns it.
func (t *tracker) next(ctx context.Context) (item, bool) {
	for {
		if it, ok := t.tryNext(); ok {
			return it, true
		}
		select {
		case <-ctx.Done():
			return item{}, false
		case <-t.wake:
		}
	}
}

// isPending reports whether the file still waits for its confirmation,
// with the same bytes.
func (t *tracker) isPending(ev pipeline.SegmentEvent) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	e, ok := t.pending[ev.MsgID()]
	return ok && e.ev.SHA256 == ev.SHA256
}

// markPublished records a publish (or a check that found the event still
// queued): the republish timer starts again from at.
func (t *tracker) markPublished(ev pipeline.SegmentEvent, seq uint64, at time.Time) {
	t.mu.Lock()
	if e, ok := t.pending[ev.MsgID()]; ok && e.ev.SHA256 == ev.SHA256 {
		e.published, e.seq, e.ev.Attempt = at, seq, ev.Attempt
	}
	if ev.Kind == pipeline.KindSegment || ev.Kind == pipeline.KindRange {
		t.published = max(t.published, ev.EndLSN)
	}
	t.mu.Unlock()
}

// requeue puts an item back at the end of the queue after a failed
// attempt, unless it was confirmed meanwhile.
func (t *tracker) requeue(it item) {
	t.mu.Lock()
	if e, ok := t.pending[it.ev.MsgID()]; ok && e.ev.SHA256 == it.ev.SHA256 && !e.queued {
		e.queued, e.check = true, it.check
		t.queue = append(t.queue, it.ev.MsgID())
	}
	t.mu.Unlock()
	t.signal()
}

// requeueStale queues a check for every file published at least after ago
// and not confirmed since, and returns how many. Order is by hold, so runs
// are reproducible.
func (t *tracker) requeueStale(now time.Time, after time.Duration) int {
	t.mu.Lock()
	var ids []string
	for id, e := range t.pending {
		if !e.queued && !e.published.IsZero() && now.Sub(e.published) >= after {
			ids = append(ids, id)
		}
	}
	sort.Slice(ids, func(i, j int) bool {
		a, b := t.pending[ids[i]], t.pending[ids[j]]
		if a.hold != b.hold {
			return a.hold < b.hold
		}
		return ids[i] < ids[j]
	})
	for _, id := range ids {
		e := t.pending[id]
		e.queued, e.check = true, true
		t.queue = append(t.queue, id)
	}
	t.mu.Unlock()
	if len(ids) > 0 {
		t.signal()
	}
	return len(ids)
}

// confirmation is what a confirmation did.
type confirmation int

const (
	confirmStale    confirmation = iota // nothing pending by that name: a duplicate or a replay
	confirmMismatch                     // pending, but the event's bytes or destination differ
	confirmOK                           // the file is archived
)

// confirm matches an archived event with its pending file. On a match the
// file leaves the tracker; so do, when it is a whole segment (or an ended
// timeline's last segment), its pending ranges, which it covers. What left
// is returned, for removal from the spool.
func (t *tracker) confirm(ev pipeline.ArchivedEvent) (res confirmation, reason string, gone []pipeline.SegmentEvent, moved bool) {
	if ev.Kind == pipeline.KindBackup {
		return confirmStale, "", nil, false // not WAL; never remembered either
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	e, ok := t.pending[ev.MsgID()]
	switch {
	case !ok:
		if t.dest == "" || ev.Dest == t.dest {
			t.remember(ev)
		}
		return confirmStale, "", nil, false
	case ev.SHA256 != e.ev.SHA256:
		return confirmMismatch, "sha256", nil, false
	case t.dest != "" && ev.Dest != t.dest:
		return confirmMismatch, "dest", nil, false
	case ev.Timeline != e.ev.Timeline || ev.StartLSN != e.ev.StartLSN || ev.EndLSN != e.ev.EndLSN || ev.SegSize != e.ev.SegSize:
		// Same name and bytes, another position: not this file (a range's
		// name is relative to a segment size the event states).
		return confirmMismatch, "position", nil, false
	}
	delete(t.pending, ev.MsgID())
	gone = append(gone, e.ev)
	ev.SegmentEvent = e.ev // from here on, the receiver's own record of the file
	seg := pipeline.SegmentOf(ev.Timeline, ev.StartLSN, t.size)
	switch ev.Kind {
	case pipeline.KindSegment, pipeline.KindRange:
		t.archived = max(t.archived, ev.EndLSN)
	}
	switch ev.Kind {
	case pipeline.KindRange:
		t.spans[seg] = append(t.spans[seg], span{ev.StartLSN, ev.EndLSN})
		t.raise(seg)
	case pipeline.KindSegment, pipeline.KindPartial:
		gone = append(gone, t.dropRanges(seg, ev.EndLSN, true)...)
	}
	before := pipeline.LSN(t.flush.Load())
	t.update()
	after := pipeline.LSN(t.flush.Load())
	if after != before {
		for len(t.marks) > 1 && t.marks[1].lsn <= after {
			t.marks = t.marks[1:]
		}
	}
	return confirmOK, "", gone, after != before
}

// dropRanges takes out the pending ranges of a segment the bucket now
// holds whole (or, for an ended timeline, up to its end), and forgets its
// confirmed ones; it returns the dropped, for removal from the spool. All
// of them: an ended timeline's ranges past its end (WAL a cascading
// standby received but never replayed) are no timeline's WAL, and must not
// hold flush.
//
// When seg is the segment being written (archived whole by an earlier life
// of the receiver, or another receiver, and streamed again here), the
// bucket holds it to end: that stays its reach, so flush does not fall
// back to its start.
//
// A segment added already archived (its confirmation came first) is
// complete: the frontier moves past it at once, so it keeps no span
// (frontier false).
func (t *tracker) dropRanges(seg pipeline.Segment, end pipeline.LSN, frontier bool) []pipeline.SegmentEvent {
	name := seg.Name(t.size)
	var ids []string
	for id, r := range t.pending {
		if r.ev.Kind == pipeline.KindRange && r.ev.File == name {
			ids = append(ids, id)
		}
	}
	sort.Strings(ids)
	var gone []pipeline.SegmentEvent
	for _, id := range ids {
		gone = append(gone, t.pending[id].ev)
		delete(t.pending, id)
	}
	delete(t.spans, seg)
	delete(t.inherited, seg)
	if frontier && seg == pipeline.SegmentOf(t.ftli, t.frontier, t.size) {
		t.spans[seg] = []span{{seg.StartLSN(t.size), end}}
	}
	return gone
}

// raise moves the holds of seg's pending files (the segment, an ended
// timeline's last segment, its ranges) up over its confirmed ranges.
func (t *tracker) raise(seg pipeline.Segment) {
	name := seg.Name(t.size)
	for id, e := range t.pending {
		if e.ev.File != name {
			continue
		}
		if h := t.holdOf(e.ev, e.hold); h != e.hold {
			e.hold = h
			heap.Push(&t.holds, holdRef{hold: h, id: id})
		}
	}
}

// inherit gives the segment a new timeline begins in (at) the ranges of
// the old timeline's segment the bucket holds below at: that WAL is the
// same on both, so flush does not move back at a timeline switch.
func (t *tracker) inherit(old, next pipeline.Segment, at pipeline.LSN) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if end := min(t.reach(old), at); end > next.StartLSN(t.size) {
		t.inherited[next] = max(t.inherited[next], end)
	}
}

// remember keeps a confirmation of a file not in the tracker, in case the
// file arrives later: one not yet written here (ahead of the frontier), or
// a history or ended-timeline file.
func (t *tracker) remember(ev pipeline.ArchivedEvent) {
	if ev.Kind == pipeline.KindSegment && ev.StartLSN < t.frontier || ev.Kind == pipeline.KindRange {
		return // ranges: a new run cuts its own; the floor covers what an earlier one confirmed
	}
	id := ev.MsgID()
	if _, ok := t.early[id]; !ok {
		t.earlyOrder = append(t.earlyOrder, id)
	}
	t.early[id] = ev.SHA256
	for len(t.earlyOrder) > maxEarly {
		delete(t.early, t.earlyOrder[0])
		t.earlyOrder = t.earlyOrder[1:]
	}
}

// seen notes that the WAL byte at lsn arrived at at, for the lag in
// seconds. Arrivals closer than markEvery to the last one kept are not
// kept: the lag errs on the old side by at most that.
func (t *tracker) seen(lsn pipeline.LSN, at time.Time) {
	t.mu.Lock()
	defer t.mu.Unlock()
	i := sort.Search(len(t.marks), func(i int) bool { return t.marks[i].lsn >= lsn })
	if i < len(t.marks) || i > 0 && at.Sub(t.marks[i-1].at) < markEvery {
		return // WAL streamed again (it arrived before), or too soon
	}
	t.marks = append(t.marks, mark{})
	copy(t.marks[i+1:], t.marks[i:])
	t.marks[i] = mark{lsn, at}
}

// lagSeconds is the age of the oldest received byte not yet archived: the
// byte at flush arrived no earlier than the last arrival kept at or before
// it.
func (t *tracker) lagSeconds(now time.Time, received pipeline.LSN) float64 {
	t.mu.Lock()
	defer t.mu.Unlock()
	flush := pipeline.LSN(t.flush.Load())
	if received <= flush || len(t.marks) == 0 {
		return 0
	}
	i := sort.Search(len(t.marks), func(i int) bool { return t.marks[i].lsn > flush })
	if i > 0 {
		i--
	}
	return max(0, now.Sub(t.marks[i].at).Seconds())
}

// positions returns the published and archived ends, the bytes waiting in
// the spool and how many files are pending.
func (t *tracker) positions() (published, archived pipeline.LSN, spoolBytes int64, files int) {
	t.mu.Lock()
	defer t.mu.Unlock()
	for _, e := range t.pending {
		spoolBytes += e.ev.Size
	}
	return t.published, t.archived, spoolBytes, len(t.pending)
}

// oldestPending is the lowest hold of the pending files (ok false when none).
func (t *tracker) oldestPending() (pipeline.LSN, bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.flushLocked() // drops stale heap tops
	if len(t.holds) == 0 {
		return 0, false
	}
	return t.holds[0].hold, true
}

// holdRef is a hold in the heap; an entry confirmed or replaced since
// leaves a stale ref, dropped when it reaches the top.
type holdRef struct {
	hold pipeline.LSN
	id   string
}

type holdHeap []holdRef

func (h holdHeap) Len() int { return len(h) }
func (h holdHeap) Less(i, j int) bool {
	if h[i].hold != h[j].hold {
		return h[i].hold < h[j].hold
	}
	return h[i].id < h[j].id
}
func (h holdHeap) Swap(i, j int) { h[i], h[j] = h[j], h[i] }
func (h *holdHeap) Push(x any)   { *h = append(*h, x.(holdRef)) }
func (h *holdHeap) Pop() any {
	old := *h
	x := old[len(old)-1]
	*h = old[:len(old)-1]
	return x
}

// held returns the pending file whose spool file is named name (its base
// name) and, unless sum is empty, whose SHA-256 is sum.
func (t *tracker) held(name, sum string) (pipeline.SegmentEvent, bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	for _, e := range t.pending {
		if e.ev.Spool != "" && filepath.Base(e.ev.Spool) == name && (sum == "" || e.ev.SHA256 == sum) {
			return e.ev, true
		}
	}
	return pipeline.SegmentEvent{}, false
}
