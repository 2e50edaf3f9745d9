// Package walgen generates WAL-shaped bytes for tests and the simulation:
// every 8 KiB page has a valid PostgreSQL 15 page header (the first page of
// a segment a long one), and a few bytes per page identify the timeline
// and position that wrote them, so bytes from the wrong timeline or place
// never compare equal. It knows timeline histories: a timeline's WAL before
// its switch point is its parent's.
package walgen

import (
	"encoding/binary"

	"github.com/walship/walship/pipeline"
)

const (
	pageSize = 8192
	magic    = 0xD110 // PostgreSQL 15
	stride   = 256    // a marker every stride bytes
)

// Timeline is one timeline of a history: it begins at Begin (0 for the
// first), branching from the timeline before it in the history.
type Timeline struct {
	TLI   uint32
	Begin pipeline.LSN
}

// History is a line of timelines, oldest first; each begins where its
// predecessor ended.
type History []Timeline

// Owner is the timeline that wrote position x as timeline tli sees it: the
// newest timeline of tli's line that began at or before x.
func (h History) Owner(tli uint32, x pipeline.LSN) uint32 {
	owner := uint32(0)
	for _, t := range h {
		if t.TLI > tli {
			break
		}
		if t.Begin <= x {
			owner = t.TLI
		}
	}
	return owner
}

// End is where tli ended in h (its successor's begin), or ok false for the
// newest timeline.
func (h History) End(tli uint32) (pipeline.LSN, bool) {
	for i, t := range h {
		if t.TLI == tli && i+1 < len(h) {
			return h[i+1].Begin, true
		}
	}
	return 0, false
}

// Fill writes into buf the WAL that timeline tli holds at [at, at+len(buf)),
// zero at and after end (where tli's WAL stops: the server's end of WAL, or
// the switch point for a timeline that ended). sysID and size go in the
// long page headers.
func Fill(buf []byte, at pipeline.LSN, tli uint32, end pipeline.LSN, h History, sysID uint64, size pipeline.SegmentSize) {
	clear(buf)
	stop := at + pipeline.LSN(len(buf))
	if end < stop {
		stop = end
	}
	var page [pageSize]byte
	for p := at - at%pageSize; p < stop; p += pageSize {
		clear(page[:])
		writePage(page[:], p, tli, h, sysID, size)
		lo, hi := max(p, at), min(p+pageSize, stop)
		copy(buf[lo-at:hi-at], page[lo-p:hi-p])
	}
}

// Segment returns the whole segment seg as timeline seg.Timeline holds it,
// zero from end on.
func Segment(seg pipeline.Segment, end pipeline.LSN, h History, sysID uint64, size pipeline.SegmentSize) []byte {
	buf := make([]byte, size)
	Fill(buf, seg.StartLSN(size), seg.Timeline, end, h, sysID, size)
	return buf
}

func writePage(page []byte, addr pipeline.LSN, tli uint32, h History, sysID uint64, size pipeline.SegmentSize) {
	owner := h.Owner(tli, addr)
	binary.LittleEndian.PutUint16(page[0:2], magic)
	hdr := 24
	if addr%pipeline.LSN(size) == 0 {
		binary.LittleEndian.PutUint16(page[2:4], 0x0002) // XLP_LONG_HEADER
		binary.LittleEndian.PutUint64(page[24:32], sysID)
		binary.LittleEndian.PutUint32(page[32:36], uint32(size))
		binary.LittleEndian.PutUint32(page[36:40], pageSize)
		hdr = 40
	}
	binary.LittleEndian.PutUint32(page[4:8], owner)
	binary.LittleEndian.PutUint64(page[8:16], uint64(addr))
	for off := stride; off < pageSize; off += stride {
		if off < hdr {
			continue
		}
		x := addr + pipeline.LSN(off)
		binary.LittleEndian.PutUint64(page[off:off+8], mix(uint64(h.Owner(tli, x)), uint64(x)))
	}
}

func mix(a, b uint64) uint64 {
	x := a*0x9E3779B97F4A7C15 ^ b
	x ^= x >> 31
	x *= 0xBF58476D1CE4E5B9
	x ^= x >> 29
	return x | 1 // never zero: a written marker is never mistaken for a hole
}
