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
	start := uint64(seg.StartLSN(size))
	var magic uint16
	for off := 0; off < len(data); off += walPageSize {
		page := data[off : off+walPageSize]
		m := binary.LittleEndian.Uint16(page[0:2])
		if off > 0 && m == 0 && allZero(page) {
			// Pages past a WAL switch are zero; once one is, all the rest must be.
			for rest := off; rest < len(data); rest += walPageSize {
				if !allZero(data[rest : rest+walPageSize]) {
					return fmt.Errorf("segment %s: page at offset %d follows an empty page but is not empty", seg.Name(size), rest)
				}
			}
			return nil
		}
		if _, ok := walMagics[m]; !ok {
			return fmt.Errorf("segment %s: page at offset %d has magic %#04x, not a PostgreSQL 12-18 WAL page", seg.Name(size), off, m)
		}
		if off == 0 {
			magic = m
		} else if m != magic {
			return fmt.Errorf("segment %s: page at offset %d has magic %#04x, first page has %#04x", seg.Name(size), off, m, magic)
		}
		info := binary.LittleEndian.Uint16(page[2:4])
		tli := binary.LittleEndian.Uint32(page[4:8])
		addr := binary.LittleEndian.Uint64(page[8:16])
		if addr != start+uint64(off) {
			return fmt.Errorf("segment %s: page at offset %d has address %s, want %s", seg.Name(size), off, LSN(addr), LSN(start+uint64(off)))
		}
		if tli == 0 || tli > seg.Timeline {
			return fmt.Errorf("segment %s: page at offset %d has timeline %d, segment is on %d", seg.Name(size), off, tli, seg.Timeline)
		}
		if off == 0 {
			if info&xlpLongHeader == 0 {
				return fmt.Errorf("segment %s: first page lacks the long header", seg.Name(size))
			}
			if segSize := binary.LittleEndian.Uint32(page[32:36]); uint64(segSize) != uint64(size) {
				return fmt.Errorf("segment %s: header says segment size %d, want %d", seg.Name(size), segSize, uint64(size))
			}
		}
	}
	return nil
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
