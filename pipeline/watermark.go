package pipeline

// Watermark tracks the end of the longest contiguous run of archived
// segments, starting from the oldest segment not known to be archived. That
// end is what the receiver reports as its flush position, so the slot never
// moves past WAL that is not in the bucket.
//
// Confirmations may arrive in any order and more than once. Confirmations for
// segments before the run's start, or for another timeline, are ignored. A
// Watermark is not safe for concurrent use.
type Watermark struct {
	size    SegmentSize
	next    Segment             // first segment not yet confirmed
	pending map[uint64]struct{} // confirmed segments past next
}

// NewWatermark starts a watermark whose first unconfirmed segment is first.
func NewWatermark(first Segment, size SegmentSize) *Watermark {
	return &Watermark{size: size, next: first, pending: make(map[uint64]struct{})}
}

// Confirm records that seg is archived and reports whether the flush
// position moved.
func (w *Watermark) Confirm(seg Segment) bool {
	if seg.Timeline != w.next.Timeline || seg.No < w.next.No {
		return false
	}
	w.pending[seg.No] = struct{}{}
	moved := false
	for {
		if _, ok := w.pending[w.next.No]; !ok {
			return moved
		}
		delete(w.pending, w.next.No)
		w.next = w.next.Next()
		moved = true
	}
}

// Flush is the position up to which every byte is archived.
func (w *Watermark) Flush() LSN { return w.next.StartLSN(w.size) }

// Next is the oldest segment not yet confirmed.
func (w *Watermark) Next() Segment { return w.next }

// Pending is how many segments past the run are confirmed and waiting for a
// gap to close.
func (w *Watermark) Pending() int { return len(w.pending) }
