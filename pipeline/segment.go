package pipeline

import (
	"fmt"
	"strconv"
	"strings"
)

// LSN is a PostgreSQL write-ahead log position, a byte offset in the WAL
// stream. It is the same representation as pglogrepl.LSN so the two convert
// freely.
type LSN uint64

// String formats the LSN as PostgreSQL does: two hex halves, "16/B374D848".
func (l LSN) String() string { return fmt.Sprintf("%X/%X", uint32(l>>32), uint32(l)) }

// ParseLSN parses PostgreSQL's "X/Y" notation.
func ParseLSN(s string) (LSN, error) {
	hi, lo, ok := strings.Cut(s, "/")
	if !ok {
		return 0, fmt.Errorf("parse lsn %q: want X/Y", s)
	}
	h, err := strconv.ParseUint(hi, 16, 32)
	if err != nil {
		return 0, fmt.Errorf("parse lsn %q: %w", s, err)
	}
	l, err := strconv.ParseUint(lo, 16, 32)
	if err != nil {
		return 0, fmt.Errorf("parse lsn %q: %w", s, err)
	}
	return LSN(h<<32 | l), nil
}

// SegmentSize is a cluster's WAL segment size in bytes: a power of two from
// 1 MiB to 1 GiB, read from the server (SHOW wal_segment_size), never assumed.
type SegmentSize uint64

// Validate reports whether s is a size PostgreSQL can have.
func (s SegmentSize) Validate() error {
	if s < 1<<20 || s > 1<<30 || s&(s-1) != 0 {
		return fmt.Errorf("wal segment size %d is not a power of two between 1MB and 1GB", uint64(s))
	}
	return nil
}

// MinEventSegmentSize is the smallest segment size events may carry: eight
// WAL pages. PostgreSQL's own minimum is 1 MiB and is enforced where a size
// comes from a server or an archive (Validate); the event format admits
// smaller segments so that the deterministic simulation, whose logic does
// not depend on the size, can run thousands of seeds a minute.
const MinEventSegmentSize = 64 << 10

// ValidateEvent is Validate with the event format's lower bound.
func (s SegmentSize) ValidateEvent() error {
	if s < MinEventSegmentSize || s > 1<<30 || s&(s-1) != 0 {
		return fmt.Errorf("wal segment size %d is not a power of two between 64kB and 1GB", uint64(s))
	}
	return nil
}

// segmentsPerXLogID is how many segments one "xlogid" (the high 32 bits of an
// LSN) holds; it is the modulus of the last 8 hex digits of a file name.
func (s SegmentSize) segmentsPerXLogID() uint64 { return 0x100000000 / uint64(s) }

// Start rounds l down to the start of its segment.
func (s SegmentSize) Start(l LSN) LSN { return l - l%LSN(s) }

// Offset is l's byte offset inside its segment.
func (s SegmentSize) Offset(l LSN) int64 { return int64(uint64(l) % uint64(s)) }

// Segment identifies one WAL segment file: a timeline and a segment number
// (the LSN of its first byte divided by the segment size).
type Segment struct {
	Timeline uint32
	No       uint64
}

// SegmentOf is the segment of timeline tli that contains l.
func SegmentOf(tli uint32, l LSN, size SegmentSize) Segment {
	return Segment{Timeline: tli, No: uint64(l) / uint64(size)}
}

// StartLSN is the position of the segment's first byte.
func (g Segment) StartLSN(size SegmentSize) LSN { return LSN(g.No * uint64(size)) }

// EndLSN is the position just past the segment's last byte.
func (g Segment) EndLSN(size SegmentSize) LSN { return LSN((g.No + 1) * uint64(size)) }

// Next is the following segment on the same timeline.
func (g Segment) Next() Segment { return Segment{Timeline: g.Timeline, No: g.No + 1} }

// Name is the 24-hex-digit file name PostgreSQL gives the segment.
func (g Segment) Name(size SegmentSize) string {
	per := size.segmentsPerXLogID()
	return fmt.Sprintf("%08X%08X%08X", g.Timeline, g.No/per, g.No%per)
}

// ParseSegmentName parses a 24-hex-digit WAL file name. It rejects names
// whose low part is out of range for the segment size.
func ParseSegmentName(name string, size SegmentSize) (Segment, error) {
	if len(name) != 24 {
		return Segment{}, fmt.Errorf("wal file name %q: want 24 hex digits", name)
	}
	var parts [3]uint64
	for i := range parts {
		v, err := strconv.ParseUint(name[i*8:i*8+8], 16, 32)
		if err != nil {
			return Segment{}, fmt.Errorf("wal file name %q: not hex", name)
		}
		parts[i] = v
	}
	per := size.segmentsPerXLogID()
	if parts[0] == 0 {
		return Segment{}, fmt.Errorf("wal file name %q: timeline 0", name)
	}
	if parts[2] >= per {
		return Segment{}, fmt.Errorf("wal file name %q: segment %X out of range for %d-byte segments", name, parts[2], uint64(size))
	}
	return Segment{Timeline: uint32(parts[0]), No: parts[1]*per + parts[2]}, nil
}

// IsSegmentName reports whether name looks like a WAL segment file name
// (24 upper-case hex digits), without checking ranges.
func IsSegmentName(name string) bool {
	if len(name) != 24 {
		return false
	}
	for _, c := range name {
		if !(c >= '0' && c <= '9' || c >= 'A' && c <= 'F') {
			return false
		}
	}
	return true
}

// HistoryFileName is the name of timeline tli's history file.
func HistoryFileName(tli uint32) string { return fmt.Sprintf("%08X.history", tli) }
