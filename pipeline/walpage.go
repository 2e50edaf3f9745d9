package pipeline

import (
	"encoding/binary"
	"fmt"
)

// WAL page header layout (access/xlog_internal.h). Every page starts with a
// short header; the first page of a segment carries a long one.
const (
	walPageSize        = 8192
	xlpLongHeader      = 0x0002
	shortPageHeaderLen = 24 // XLogPageHeaderData, MAXALIGNed
	longPageHeaderLen  = 40 // XLogLongPageHeaderData
)

// walMagics are XLOG_PAGE_MAGIC for PostgreSQL 12 to 18 (from each
// release's src/include/access/xlog_internal.h); a page with another magic
// is from an unknown version or is not WAL at all.
var walMagics = map[uint16]int{
	0xD101: 12, 0xD106: 13, 0xD10D: 14, 0xD110: 15, 0xD113: 16, 0xD116: 17, 0xD118: 18,
}

// The PostgreSQL major versions walship reads the WAL of.
const (
	MinPGMajor = 12
	MaxPGMajor = 18
)

// SupportedPGMajor reports whether walship knows the WAL format of a
// PostgreSQL major version, and says which ones it knows when not.
func SupportedPGMajor(major int) error {
	if major < MinPGMajor || major > MaxPGMajor {
		return fmt.Errorf("PostgreSQL %d is not supported: walship reads the WAL of PostgreSQL %d to %d", major, MinPGMajor, MaxPGMajor)
	}
	return nil
}

// PageMagicMajor is the PostgreSQL major version whose WAL pages carry magic.
func PageMagicMajor(magic uint16) (int, bool) {
	v, ok := walMagics[magic]
	return v, ok
}

// CheckSegmentPages verifies the page headers of a complete WAL segment: each
// page's magic is a known PostgreSQL one and the same throughout, its page
// address is where the segment name says it is, and its timeline is not past
// the segment's. The first page must carry a long header that names the
// segment size. Pages that are all zero after the last written one are
// accepted: a segment ends early when the server switched WAL.
//
// It returns the index of the first page that fails and why.
func CheckSegmentPages(data []byte, seg Segment, size SegmentSize) error {
	if uint64(len(data)) != uint64(size) {
		return fmt.Errorf("segment %s: %d bytes, want %d", seg.Name(size), len(data), uint64(size))
	}
	return checkPages(data, seg, size, 0)
}

// CheckRangePages verifies the page headers that lie in bytes [from,
// from+len(data)) of a segment (a range, see KindRange) by the rules of
// CheckSegmentPages: every page whose header starts inside the range is
// checked (a header cut by the range's end, as far as it goes), the long
// header when the range starts at offset 0. The bytes before the range's
// first page header are WAL record data and are not checked here; the
// SHA-256 covers them.
func CheckRangePages(data []byte, seg Segment, size SegmentSize, from uint64) error {
	if len(data) == 0 || from >= uint64(size) || uint64(len(data)) > uint64(size)-from {
		return fmt.Errorf("segment %s: range [%d, %d) is not inside a %d-byte segment", seg.Name(size), from, from+uint64(len(data)), uint64(size))
	}
	return checkPages(data, seg, size, from)
}

// checkPages checks the header of every page that starts in data, which
// holds the segment's bytes from offset from on.
func checkPages(data []byte, seg Segment, size SegmentSize, from uint64) error {
	to := from + uint64(len(data))
	first := (from + walPageSize - 1) / walPageSize * walPageSize
	var magic uint16
	for off := first; off < to; off += walPageSize {
		page := data[off-from : min(off+walPageSize, to)-from]
		if off > 0 && allZero(page) {
			// Pages past a WAL switch are zero; once one is, all the rest must be.
			for rest := off + walPageSize; rest < to; rest += walPageSize {
				if !allZero(data[rest-from : min(rest+walPageSize, to)-from]) {
					return fmt.Errorf("segment %s: page at offset %d follows an empty page but is not empty", seg.Name(size), rest)
				}
			}
			return nil
		}
		m, err := checkPageHeader(page, off, seg, size, magic)
		if err != nil {
			return err
		}
		magic = m
	}
	return nil
}

// checkPageHeader checks the header of the page at offset off of segment
// seg; hdr holds the page from its start, possibly cut short by the end of
// a range, and only the fields it holds entirely are checked. magic is the
// magic of the pages checked before (0: none); it returns this page's.
func checkPageHeader(hdr []byte, off uint64, seg Segment, size SegmentSize, magic uint16) (uint16, error) {
	has := func(end int) bool { return len(hdr) >= end }
	if !has(2) {
		return magic, nil
	}
	m := binary.LittleEndian.Uint16(hdr[0:2])
	if _, ok := walMagics[m]; !ok {
		return 0, fmt.Errorf("segment %s: page at offset %d has magic %#04x, not a PostgreSQL 12-18 WAL page", seg.Name(size), off, m)
	}
	if magic != 0 && m != magic {
		return 0, fmt.Errorf("segment %s: page at offset %d has magic %#04x, an earlier page has %#04x", seg.Name(size), off, m, magic)
	}
	if has(4) && off == 0 && binary.LittleEndian.Uint16(hdr[2:4])&xlpLongHeader == 0 {
		return 0, fmt.Errorf("segment %s: first page lacks the long header", seg.Name(size))
	}
	if has(8) {
		if tli := binary.LittleEndian.Uint32(hdr[4:8]); tli == 0 || tli > seg.Timeline {
			return 0, fmt.Errorf("segment %s: page at offset %d has timeline %d, segment is on %d", seg.Name(size), off, tli, seg.Timeline)
		}
	}
	if has(16) {
		want := uint64(seg.StartLSN(size)) + off
		if addr := binary.LittleEndian.Uint64(hdr[8:16]); addr != want {
			return 0, fmt.Errorf("segment %s: page at offset %d has address %s, want %s", seg.Name(size), off, LSN(addr), LSN(want))
		}
	}
	if has(36) && off == 0 {
		if segSize := binary.LittleEndian.Uint32(hdr[32:36]); uint64(segSize) != uint64(size) {
			return 0, fmt.Errorf("segment %s: header says segment size %d, want %d", seg.Name(size), segSize, uint64(size))
		}
	}
	return m, nil
}

// SegmentSystemID reads the system identifier from a segment's long page
// header, so a segment can be tied to the cluster that wrote it.
func SegmentSystemID(data []byte) (uint64, bool) {
	if len(data) < longPageHeaderLen {
		return 0, false
	}
	if binary.LittleEndian.Uint16(data[2:4])&xlpLongHeader == 0 {
		return 0, false
	}
	return binary.LittleEndian.Uint64(data[24:32]), true
}

func allZero(b []byte) bool {
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}
