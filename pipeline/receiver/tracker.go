package receiver

import (
	"context"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/walship/walship/pipeline"
)

// tracker holds the WAL files between "durable in the spool" and
// "confirmed archived": the publish queue, the watermark and the times the
// lag metrics need. The replication loop adds to it, the publisher drains
// its queue, the confirmation watcher confirms; flush is read lock-free by
// the replication loop.
type tracker struct {
	size  pipeline.SegmentSize
	floor pipeline.LSN // slot restart_lsn at start: never report a flush below it

	mu sync.Mutex
	// wm tracks the current timeline. prev, when set, is the previous
	// timeline's watermark, which must reach prevEnd (the start of the
	// segment holding the switch point) before wm counts.
	wm        *pipeline.Watermark
	prev      *pipeline.Watermark
	prevEnd   pipeline.LSN
	pending   map[string]*entry // by event MsgID
	queue     []string
	firstSeen map[pipeline.Segment]time.Time
	archived  pipeline.LSN // end of the newest confirmed segment
	published pipeline.LSN // end of the newest published segment
	wake      chan struct{}

	flush atomic.Uint64
}

type entry struct {
	ev        pipeline.SegmentEvent
	published time.Time // zero until published
	queued    bool
}

func newTracker(size pipeline.SegmentSize, first pipeline.Segment, floor pipeline.LSN) *tracker {
	t := &tracker{
		size: size, floor: floor,
		wm:        pipeline.NewWatermark(first, size),
		pending:   map[string]*entry{},
		firstSeen: map[pipeline.Segment]time.Time{},
		wake:      make(chan struct{}, 1),
	}
	t.flush.Store(uint64(t.flushLocked()))
	return t
}

// flushLocked is the contiguous archived position across the timeline
// chain, never below the floor.
func (t *tracker) flushLocked() pipeline.LSN {
	f := t.wm.Flush()
	if t.prev != nil {
		if pf := t.prev.Flush(); pf < t.prevEnd {
			f = pf
		} else {
			t.prev = nil
		}
	}
	return max(f, t.floor)
}

// switchTimeline starts tracking a new timeline whose first segment is
// first; the old timeline must still be archived up to first's start.
func (t *tracker) switchTimeline(first pipeline.Segment) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.prev == nil || t.prev.Flush() >= t.prevEnd {
		t.prev = t.wm
	}
	t.prevEnd = first.StartLSN(t.size)
	t.wm = pipeline.NewWatermark(first, t.size)
	t.flush.Store(uint64(t.flushLocked()))
}

// add queues a WAL file that is durable in the spool for publishing.
func (t *tracker) add(ev pipeline.SegmentEvent) {
	id := ev.MsgID()
	t.mu.Lock()
	if _, ok := t.pending[id]; !ok {
		t.pending[id] = &entry{ev: ev, queued: true}
		t.queue = append(t.queue, id)
	}
	t.mu.Unlock()
	t.signal()
}

func (t *tracker) signal() {
	select {
	case t.wake <- struct{}{}:
	default:
	}
}

// next blocks until a file is queued and returns its event.
func (t *tracker) next(ctx context.Context) (pipeline.SegmentEvent, bool) {
	for {
		t.mu.Lock()
		for len(t.queue) > 0 {
			id := t.queue[0]
			t.queue = t.queue[1:]
			if e, ok := t.pending[id]; ok {
				e.queued = false
				t.mu.Unlock()
				return e.ev, true
			}
		}
		t.mu.Unlock()
		select {
		case <-ctx.Done():
			return pipeline.SegmentEvent{}, false
		case <-t.wake:
		}
	}
}

// isPending reports whether ev still waits for its confirmation.
func (t *tracker) isPending(ev pipeline.SegmentEvent) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	_, ok := t.pending[ev.MsgID()]
	return ok
}

func (t *tracker) markPublished(ev pipeline.SegmentEvent, at time.Time) {
	t.mu.Lock()
	if e, ok := t.pending[ev.MsgID()]; ok {
		e.published = at
	}
	if ev.Kind == pipeline.KindSegment {
		t.published = max(t.published, ev.EndLSN)
	}
	t.mu.Unlock()
}

// requeueStale queues again every published file whose confirmation has
// not come within after, and returns how many.
func (t *tracker) requeueStale(now time.Time, after time.Duration) int {
	t.mu.Lock()
	n := 0
	for id, e := range t.pending {
		if !e.queued && !e.published.IsZero() && now.Sub(e.published) >= after {
			e.queued = true
			t.queue = append(t.queue, id)
			n++
		}
	}
	t.mu.Unlock()
	if n > 0 {
		t.signal()
	}
	return n
}

// confirm records an archived event: it removes the spool copy and, for a
// segment, reports whether the flush position moved.
func (t *tracker) confirm(ev pipeline.ArchivedEvent) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	if e, ok := t.pending[ev.MsgID()]; ok {
		delete(t.pending, ev.MsgID())
		if e.ev.Spool != "" {
			os.Remove(e.ev.Spool)
		}
	}
	if ev.Kind != pipeline.KindSegment {
		return false
	}
	seg := pipeline.SegmentOf(ev.Timeline, ev.StartLSN, t.size)
	t.archived = max(t.archived, ev.EndLSN)
	before := t.flushLocked()
	t.wm.Confirm(seg)
	if t.prev != nil {
		t.prev.Confirm(seg)
	}
	after := t.flushLocked()
	if after != before {
		for s := range t.firstSeen {
			if s.StartLSN(t.size) < after {
				delete(t.firstSeen, s)
			}
		}
		t.flush.Store(uint64(after))
	}
	return after != before
}

// seen notes when the first byte of a segment arrived, for the lag in
// seconds.
func (t *tracker) seen(seg pipeline.Segment, at time.Time) {
	t.mu.Lock()
	if _, ok := t.firstSeen[seg]; !ok {
		t.firstSeen[seg] = at
	}
	t.mu.Unlock()
}

// lagSeconds is the age of the oldest received byte not yet archived.
func (t *tracker) lagSeconds(now time.Time, received pipeline.LSN) float64 {
	t.mu.Lock()
	defer t.mu.Unlock()
	flush := t.flushLocked()
	if received <= flush {
		return 0
	}
	oldest := time.Time{}
	for s, at := range t.firstSeen {
		if s.EndLSN(t.size) > flush && (oldest.IsZero() || at.Before(oldest)) {
			oldest = at
		}
	}
	if oldest.IsZero() {
		return 0
	}
	return now.Sub(oldest).Seconds()
}

// positions returns the published and archived ends and the bytes waiting
// in the spool.
func (t *tracker) positions() (published, archived pipeline.LSN, spoolBytes int64) {
	t.mu.Lock()
	defer t.mu.Unlock()
	for _, e := range t.pending {
		spoolBytes += e.ev.Size
	}
	return t.published, t.archived, spoolBytes
}
