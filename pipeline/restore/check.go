package restore

import (
	"crypto/sha256"
	"encoding/binary"
	"fmt"
	"strconv"
	"strings"

	"github.com/walship/walship/pipeline"
	"github.com/walship/walship/sinks"
)

// maxRawSize bounds any WAL file: PostgreSQL's largest segment is 1 GiB.
const maxRawSize = 1 << 30

// Expect is what restored bytes must belong to; zero fields are unknown.
type Expect struct {
	// SystemID is the cluster's system identifier, decimal, from the data
	// directory's pg_control or the archive's identity object.
	SystemID string
	// SegmentSize is the cluster's WAL segment size, from the identity
	// object.
	SegmentSize pipeline.SegmentSize
}

// CheckMeta validates an object's metadata before its bytes are read, so
// a corrupt value cannot size a buffer.
func CheckMeta(file string, meta sinks.Metadata) error {
	if meta.RawSize < 0 || meta.RawSize > maxRawSize {
		return fmt.Errorf("%w: %s: metadata walship-raw-size %d is not a WAL file size", ErrCorrupt, file, meta.RawSize)
	}
	return nil
}

// Check verifies the raw bytes of the WAL file named file (a segment,
// <segment>.partial, <tli>.history) against the object's metadata and
// against what the restore expects, and returns the bytes to hand to
// PostgreSQL: a .partial shorter than a segment comes back zero-padded.
//
// Every file: walship-sha256 and walship-raw-size match the bytes, the
// system identifier in the metadata is the expected one. A segment or
// .partial also: the long page header names the same system and a valid
// segment size; the name, walship-timeline, walship-start-lsn and
// walship-end-lsn agree; every page header is valid (magic, address,
// timeline), zero pages only at the end. A full segment's WAL records
// must run to its end or stop at an XLOG_SWITCH; a .partial's pages must
// be WAL up to its end LSN and zero after it. A history file must parse.
func Check(file string, raw []byte, meta sinks.Metadata, want Expect) ([]byte, error) {
	bad := func(format string, args ...any) ([]byte, error) {
		return nil, fmt.Errorf("%w: %s: %s", ErrCorrupt, file, fmt.Sprintf(format, args...))
	}
	if err := CheckMeta(file, meta); err != nil {
		return nil, err
	}
	if meta.SHA256 == "" {
		return bad("no walship-sha256 metadata, so it cannot be verified")
	}
	sum := sha256.Sum256(raw)
	if got := pipeline.SHA256Hex(sum[:]); got != meta.SHA256 {
		return bad("sha256 %s, metadata says %s", got, meta.SHA256)
	}
	if int64(len(raw)) != meta.RawSize {
		return bad("%d bytes, metadata walship-raw-size says %d", len(raw), meta.RawSize)
	}
	if want.SystemID != "" && meta.SystemID != "" && meta.SystemID != want.SystemID {
		return bad("metadata walship-system-id %s, this cluster is %s: the archive belongs to another cluster", meta.SystemID, want.SystemID)
	}
	if tli, ok := historyTimeline(file); ok {
		entries, err := ParseHistory(raw)
		if err != nil {
			return bad("%v", err)
		}
		if len(entries) == 0 || entries[len(entries)-1].Parent >= tli {
			return bad("history does not end with an older parent timeline")
		}
		return raw, nil
	}
	base, partial := strings.CutSuffix(file, ".partial")
	if !pipeline.IsSegmentName(base) {
		return raw, nil
	}
	return checkSegment(file, base, partial, raw, meta, want)
}

func checkSegment(file, base string, partial bool, raw []byte, meta sinks.Metadata, want Expect) ([]byte, error) {
	bad := func(format string, args ...any) ([]byte, error) {
		return nil, fmt.Errorf("%w: %s: %s", ErrCorrupt, file, fmt.Sprintf(format, args...))
	}
	if len(raw) < longPageHdr || binary.LittleEndian.Uint16(raw[2:4])&xlpLongHeader == 0 {
		return bad("does not start with a WAL long page header")
	}
	size := pipeline.SegmentSize(binary.LittleEndian.Uint32(raw[32:36]))
	if err := size.Validate(); err != nil {
		return bad("page header: %v", err)
	}
	if want.SegmentSize != 0 && size != want.SegmentSize {
		return bad("segment size %d, the archive's is %d", uint64(size), uint64(want.SegmentSize))
	}
	if partial && uint64(len(raw)) < uint64(size) {
		raw = append(raw, make([]byte, uint64(size)-uint64(len(raw)))...)
	}
	if uint64(len(raw)) != uint64(size) {
		return bad("%d bytes, its page header says segments are %d", len(raw), uint64(size))
	}
	seg, err := pipeline.ParseSegmentName(base, size)
	if err != nil {
		return bad("%v", err)
	}
	sys := strconv.FormatUint(binary.LittleEndian.Uint64(raw[24:32]), 10)
	switch {
	case meta.SystemID == "":
		return bad("no walship-system-id metadata")
	case sys != meta.SystemID:
		return bad("written by system %s, metadata walship-system-id says %s", sys, meta.SystemID)
	case want.SystemID != "" && sys != want.SystemID:
		return bad("written by system %s, this cluster is %s: the archive belongs to another cluster", sys, want.SystemID)
	case meta.Timeline != seg.Timeline:
		return bad("metadata walship-timeline %d, the name says %d", meta.Timeline, seg.Timeline)
	}
	start, err := pipeline.ParseLSN(meta.StartLSN)
	if err != nil || start != seg.StartLSN(size) {
		return bad("metadata walship-start-lsn %q, the name says %s", meta.StartLSN, seg.StartLSN(size))
	}
	end, err := pipeline.ParseLSN(meta.EndLSN)
	switch {
	case err != nil:
		return bad("metadata walship-end-lsn %q: %v", meta.EndLSN, err)
	case !partial && end != seg.EndLSN(size):
		return bad("metadata walship-end-lsn %s, a whole segment ends at %s", end, seg.EndLSN(size))
	case partial && (end <= start || end > seg.EndLSN(size)):
		return bad("metadata walship-end-lsn %s is outside the segment (%s to %s)", end, start, seg.EndLSN(size))
	}
	if err := pipeline.CheckSegmentPages(raw, seg, size); err != nil {
		return bad("%v", err)
	}
	stop, err := walEnd(raw)
	if err != nil {
		return bad("%v", err)
	}
	if !partial {
		if !stop.Switched && stop.Off < len(raw) {
			return bad("its WAL stops at %s without a WAL switch: the segment is truncated", start+pipeline.LSN(stop.Off))
		}
		return raw, nil
	}
	// A .partial holds WAL up to its end LSN and nothing after it. An end
	// LSN at the segment's end means the end is unknown (a receiver that
	// restarted): then any zero tail is accepted.
	e := int(end - start)
	if e < len(raw) {
		if stop.Off < e && !stop.Switched {
			return bad("its WAL stops at %s, metadata walship-end-lsn says %s", start+pipeline.LSN(stop.Off), end)
		}
		if !allZero(raw[e:]) {
			return bad("bytes after its end LSN %s are not zero", end)
		}
	}
	return raw, nil
}

// historyTimeline reports whether file is a timeline history file name.
func historyTimeline(file string) (uint32, bool) {
	h, ok := strings.CutSuffix(file, ".history")
	if !ok || len(h) != 8 {
		return 0, false
	}
	t, err := strconv.ParseUint(h, 16, 32)
	return uint32(t), err == nil
}
