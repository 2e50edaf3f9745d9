package receiver

import (
	"context"
	"sync"
	"sync/atomic"
	"time"

	"github.com/walship/walship/pipeline"
)

// tracker holds the segments between "complete in the spool" and
// "confirmed archived": the publish queue, the watermark and the times the
// lag metrics need. The replication loop adds to it, the publisher drains
// its queue, the confirmation watcher confirms; flush is read lock-free by
// the replication loop.
type tracker struct {
	size  pipeline.SegmentSize
	spool *spool
	floor pipeline.LSN // slot restart_lsn at start: never report a flush below it

	mu        sync.Mutex
	wm        *pipeline.Watermark
	pending   map[pipeline.Segment]*entry
	queue     []pipeline.Segment
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

func newTracker(size pipeline.SegmentSize, sp *spool, first pipeline.Segment, floor pipeline.LSN) *tracker {
	t := &tracker{
		size: size, spool: sp, floor: floor,
		wm:        pipeline.NewWatermark(first, size),
		pending:   map[pipeline.Segment]*entry{},
		firstSeen: map[pipeline.Segment]time.Time{},
		wake:      make(chan struct{}, 1),
	}
	t.flush.Store(uint64(max(t.wm.Flush(), floor)))
	return t
}

// add queues a segment that is durable in the spool for publishing.
func (t *tracker) add(ev pipeline.SegmentEvent) {
	seg := pipeline.Segment{Timeline: ev.Timeline, No: uint64(ev.StartLSN) / uint64(t.size)}
	t.mu.Lock()
	if _, ok := t.pending[seg]; !ok {
		t.pending[seg] = &entry{ev: ev, queued: true}
		t.queue = append(t.queue, seg)
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

// next blocks until a segment is queued and returns its event.
func (t *tracker) next(ctx context.Context) (pipeline.SegmentEvent, bool) {
	for {
		t.mu.Lock()
		for len(t.queue) > 0 {
			seg := t.queue[0]
			t.queue = t.queue[1:]
			if e, ok := t.pending[seg]; ok {
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

// isPending reports whether seg still waits for its confirmation.
func (t *tracker) isPending(ev pipeline.SegmentEvent) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	_, ok := t.pending[t.segOf(ev)]
	return ok
}

func (t *tracker) segOf(ev pipeline.SegmentEvent) pipeline.Segment {
	return pipeline.Segment{Timeline: ev.Timeline, No: uint64(ev.StartLSN) / uint64(t.size)}
}

func (t *tracker) markPublished(ev pipeline.SegmentEvent, at time.Time) {
	t.mu.Lock()
	if e, ok := t.pending[t.segOf(ev)]; ok {
		e.published = at
	}
	t.published = max(t.published, ev.EndLSN)
	t.mu.Unlock()
}

// requeueStale queues again every published segment whose confirmation has
// not come within after, and returns how many.
func (t *tracker) requeueStale(now time.Time, after time.Duration) int {
	t.mu.Lock()
	n := 0
	for seg, e := range t.pending {
		if !e.queued && !e.published.IsZero() && now.Sub(e.published) >= after {
			e.queued = true
			t.queue = append(t.queue, seg)
			n++
		}
	}
	t.mu.Unlock()
	if n > 0 {
		t.signal()
	}
	return n
}

// confirm records an archived event. It removes the spool copy and reports
// whether the flush position moved.
func (t *tracker) confirm(ev pipeline.ArchivedEvent) bool {
	if ev.Kind != pipeline.KindSegment {
		return false
	}
	seg := t.segOf(ev.SegmentEvent)
	t.mu.Lock()
	defer t.mu.Unlock()
	if _, ok := t.pending[seg]; ok {
		delete(t.pending, seg)
		t.spool.remove(seg)
	}
	t.archived = max(t.archived, ev.EndLSN)
	moved := t.wm.Confirm(seg)
	if moved {
		for s := range t.firstSeen {
			if s.No < t.wm.Next().No {
				delete(t.firstSeen, s)
			}
		}
		t.flush.Store(uint64(max(t.wm.Flush(), t.floor)))
	}
	return moved
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
	if received <= t.wm.Flush() {
		return 0
	}
	if at, ok := t.firstSeen[t.wm.Next()]; ok {
		return now.Sub(at).Seconds()
	}
	return 0
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
