package restore

import (
	"encoding/binary"
	"fmt"
)

// WAL layout (access/xlog_internal.h, access/xlogrecord.h), the same for
// PostgreSQL 12 to 17.
const (
	walPageSize    = 8192
	shortPageHdr   = 24 // XLogPageHeaderData, MAXALIGNed
	longPageHdr    = 40 // XLogLongPageHeaderData, MAXALIGNed
	recordHdr      = 24 // SizeOfXLogRecord
	maxRecordLen   = 1020 << 20
	xlpContRecord  = 0x0001 // XLP_FIRST_IS_CONTRECORD
	xlpLongHeader  = 0x0002
	rmXLOG         = 0    // RM_XLOG_ID
	xlogSwitchInfo = 0x40 // XLOG_SWITCH
)

// walStop is where the chain of WAL records in a segment stops.
type walStop struct {
	// Off is the offset just past the WAL the segment holds: its size when
	// the records run to (or past) its end, else where the next record
	// header would be and is zero.
	Off int
	// Switched means the last record is an XLOG_SWITCH: PostgreSQL left
	// the rest of the segment unused (zero pages since PostgreSQL 14).
	Switched bool
}

// walEnd follows the chain of WAL records through one segment, from the
// continuation the first page announces to the last record, using each
// page header's continuation length as PostgreSQL's reader does. It tells
// a complete segment (records to the end, or an XLOG_SWITCH) from one whose
// WAL stops early — a segment cut at a page boundary with a zero tail
// passes every page-header check but fails here.
//
// It reads only record headers (no CRCs) and assumes the page headers were
// checked already (pipeline.CheckSegmentPages).
func walEnd(data []byte) (walStop, error) {
	n := len(data)
	le16 := func(b []byte) uint16 { return binary.LittleEndian.Uint16(b) }
	le32 := func(b []byte) uint32 { return binary.LittleEndian.Uint32(b) }
	pageEnd := func(p int) int { return (p/walPageSize + 1) * walPageSize }
	// at maps the k-th byte of the record that starts at p to its offset,
	// skipping the next page's header; -1 past the segment.
	at := func(p, k int) int {
		q := p + k
		if end := pageEnd(p); q >= end {
			q += shortPageHdr
		}
		if q >= n {
			return -1
		}
		return q
	}
	p, rem := 0, 0 // rem: bytes of the current record still to skip
	for {
		if p >= n {
			return walStop{Off: n}, nil
		}
		if p%walPageSize == 0 {
			page := data[p : p+walPageSize]
			if allZero(page) {
				return walStop{Off: p}, nil // the WAL stops at this page boundary
			}
			// Trust the page header for what continues here: a record
			// abandoned at a crash (PostgreSQL 15's overwritten
			// continuation record) resumes the chain at the page's data.
			rem = 0
			if le16(page[2:4])&xlpContRecord != 0 {
				rem = int(le32(page[16:20]))
			}
			if p == 0 {
				p += longPageHdr
			} else {
				p += shortPageHdr
			}
		}
		if rem > 0 {
			space := pageEnd(p) - p
			if rem > space {
				rem -= space
				p = pageEnd(p)
				continue
			}
			p = align8(p + rem)
			rem = 0
			continue
		}
		if p%walPageSize == 0 {
			continue
		}
		// A record starts at p, 8-aligned, so xl_tot_len is on this page.
		tot := int(le32(data[p : p+4]))
		if tot == 0 {
			return walStop{Off: p}, nil
		}
		if tot < recordHdr || tot > maxRecordLen {
			return walStop{}, fmt.Errorf("record at offset %#x has length %d", p, tot)
		}
		info, rmid := at(p, 16), at(p, 17)
		if info < 0 || rmid < 0 {
			return walStop{Off: n}, nil // the header continues in the next segment
		}
		if data[rmid] == rmXLOG && data[info]&0xF0 == xlogSwitchInfo {
			return walStop{Off: p, Switched: true}, nil
		}
		rem = tot
	}
}

func align8(p int) int { return (p + 7) &^ 7 }

func allZero(b []byte) bool {
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}
