package take

import (
	"context"
	"sort"
	"sync"
	"time"

	"github.com/walship/walship/pipeline"
)

// inflight is a published chunk not yet confirmed archived: its event and
// its bytes, kept in memory so it can be published again.
type inflight struct {
	ev        pipeline.SegmentEvent
	data      []byte
	published time.Time
	busy      int // republications using data right now
}

// window bounds the chunks in flight: at most n published and not yet
// confirmed, each held in memory (so a backup needs no local disk, its
// memory is about (n+1) chunks, and a server's WAL events never queue
// behind more than n of its backup chunks). Confirmations are matched by
// file, SHA-256 and destination, as the receiver matches its segments'.
type window struct {
	slots chan struct{}
	free  chan []byte
	size  int
	dest  string // "" accepts any destination

	mu      sync.Mutex
	pending map[string]*inflight
	done    map[string]pipeline.ArchivedEvent // by chunk name
	changed chan struct{}
}

func newWindow(n, chunkSize int, dest string) *window {
	return &window{slots: make(chan struct{}, n), free: make(chan []byte, n+1), size: chunkSize, dest: dest,
		pending: map[string]*inflight{}, done: map[string]pipeline.ArchivedEvent{}, changed: make(chan struct{}, 1)}
}

// buffer returns an empty chunk buffer, reused when one is free.
func (w *window) buffer() []byte {
	select {
	case b := <-w.free:
		return b[:0]
	default:
		return make([]byte, 0, w.size)
	}
}

func (w *window) recycle(b []byte) {
	if cap(b) != w.size {
		return
	}
	select {
	case w.free <- b:
	default:
	}
}

// acquire waits for a free place in the window.
func (w *window) acquire(ctx context.Context) error {
	select {
	case w.slots <- struct{}{}:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// add records a chunk about to be published; its place was acquired.
func (w *window) add(ev pipeline.SegmentEvent, data []byte, now time.Time) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.pending[ev.File] = &inflight{ev: ev, data: data, published: now}
}

// confirm takes an archived event and reports whether it confirmed a
// chunk in flight. Anything else (WAL, other backups, other bytes or
// destinations, duplicates) is ignored.
func (w *window) confirm(ev pipeline.ArchivedEvent) bool {
	if ev.Kind != pipeline.KindBackup {
		return false
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	p, ok := w.pending[ev.File]
	if !ok || p.ev.SHA256 != ev.SHA256 || p.ev.Size != ev.Size || p.ev.SystemID != ev.SystemID || w.dest != "" && ev.Dest != w.dest {
		return false
	}
	delete(w.pending, ev.File)
	w.done[ev.File] = ev
	if p.busy == 0 {
		w.recycle(p.data)
	}
	p.data = nil
	<-w.slots
	select {
	case w.changed <- struct{}{}:
	default:
	}
	return true
}

// due returns the chunks published longer than after ago, marked as
// published again now with the next attempt; their bytes stay valid until
// release.
func (w *window) due(now time.Time, after time.Duration) []*inflight {
	w.mu.Lock()
	defer w.mu.Unlock()
	var out []*inflight
	for _, p := range w.pending {
		if now.Sub(p.published) >= after && p.busy == 0 {
			p.ev.Attempt++
			p.published = now
			p.busy++
			out = append(out, &inflight{ev: p.ev, data: p.data})
		}
	}
	// In the order they were cut (names sort so within an archive), not in
	// the map's: the simulation replays a seed exactly.
	sort.Slice(out, func(i, j int) bool { return out[i].ev.File < out[j].ev.File })
	return out
}

// release ends a republication of the chunk named file.
func (w *window) release(file string, data []byte) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if p, ok := w.pending[file]; ok {
		p.busy--
		return
	}
	w.recycle(data) // confirmed meanwhile
}

// inFlight is the number of chunks not yet confirmed.
func (w *window) inFlight() int {
	w.mu.Lock()
	defer w.mu.Unlock()
	return len(w.pending)
}

// confirmed returns a chunk's confirmation.
func (w *window) confirmed(file string) (pipeline.ArchivedEvent, bool) {
	w.mu.Lock()
	defer w.mu.Unlock()
	ev, ok := w.done[file]
	return ev, ok
}

// wait blocks until every chunk is confirmed, or ctx ends.
func (w *window) wait(ctx context.Context) error {
	for w.inFlight() > 0 {
		select {
		case <-w.changed:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	return nil
}

// hold keeps a chunk's bytes from being reused while a caller publishes
// them (Steps); release ends it.
func (w *window) hold(file string) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if p, ok := w.pending[file]; ok {
		p.busy++
	}
}
