package restore

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"sort"
	"strconv"
	"strings"

	"github.com/walship/walship/compress"
	"github.com/walship/walship/pipeline"
	"github.com/walship/walship/sinks"
)

// errRangeVanished is a range the listing named and a GET did not find:
// an archiver deleted it after archiving the whole segment. Transient.
var errRangeVanished = errors.New("range vanished between the listing and its GET")

// rangeObject is one listed range of a segment: bytes [From, To) of it.
type rangeObject struct {
	Key      string
	Codec    compress.Codec
	From, To uint64
	Size     int64 // stored (compressed) size, from the listing
}

// listRanges lists the range objects of segment under the layout's range
// prefix, in the order of their offsets. Keys that do not parse as
// <from>-<to><ext>, or that reach past the segment, are not ranges and are
// skipped. An error of the listing is returned as it is: never "none".
func listRanges(ctx context.Context, sink sinks.Sink, layout sinks.Layout, segment string, size pipeline.SegmentSize) ([]rangeObject, error) {
	lister, ok := sink.(sinks.Lister)
	if !ok {
		return nil, errors.New("this destination cannot be listed, so its ranges cannot be read")
	}
	prefix := layout.RangePrefix(segment)
	var out []rangeObject
	err := lister.List(ctx, prefix, func(ob sinks.Object) error {
		leaf, ok := strings.CutPrefix(ob.Key, prefix)
		if !ok || strings.Contains(leaf, "/") {
			return nil
		}
		leaf, codec := compress.SplitExt(leaf)
		from, to, ok := pipeline.ParseRangeSuffix(leaf)
		if !ok || to > uint64(size) {
			return nil
		}
		out = append(out, rangeObject{Key: ob.Key, Codec: codec, From: from, To: to, Size: ob.Size})
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("list ranges of %s: %w", segment, err)
	}
	sort.Slice(out, func(i, j int) bool {
		if out[i].From != out[j].From {
			return out[i].From < out[j].From
		}
		return out[i].To > out[j].To
	})
	return out, nil
}

// RangesReach is the end offset of the contiguous WAL that segment's
// ranges in the sink hold from its start (0: none). A listing error is
// returned, never "none".
func RangesReach(ctx context.Context, sink sinks.Sink, layout sinks.Layout, segment string, size pipeline.SegmentSize) (uint64, error) {
	ranges, err := listRanges(ctx, sink, layout, segment, size)
	if err != nil {
		return 0, err
	}
	_, end := cover(ranges, 0)
	return end, nil
}

// cover picks, from ranges sorted by offset, the fewest that cover the
// longest contiguous run from offset 0, in order, and returns them with
// the end of that run (0 and none when no range starts at 0). Ranges of
// different receiver runs may overlap; each chosen one starts at or
// before the end of the previous one.
func cover(ranges []rangeObject, from uint64) ([]rangeObject, uint64) {
	var chosen []rangeObject
	end, i := from, 0
	for {
		best := -1
		for ; i < len(ranges) && ranges[i].From <= end; i++ {
			if ranges[i].To > end && (best < 0 || ranges[i].To > ranges[best].To) {
				best = i
			}
		}
		if best < 0 {
			return chosen, end
		}
		chosen = append(chosen, ranges[best])
		end = ranges[best].To
	}
}

// checkRange verifies one range's raw bytes against its metadata and its
// key: SHA-256 and size, system identifier (the metadata's, and the long
// page header's for a range at offset 0), timeline and LSNs.
func checkRange(seg pipeline.Segment, size pipeline.SegmentSize, r rangeObject, raw []byte, meta sinks.Metadata, want Expect) error {
	bad := func(format string, args ...any) error {
		return fmt.Errorf("%w: %s: %s", ErrCorrupt, r.Key, fmt.Sprintf(format, args...))
	}
	if err := CheckMeta(r.Key, meta); err != nil {
		return err
	}
	if meta.SHA256 == "" {
		return bad("no walship-sha256 metadata, so it cannot be verified")
	}
	sum := sha256.Sum256(raw)
	if got := pipeline.SHA256Hex(sum[:]); got != meta.SHA256 {
		return bad("sha256 %s, metadata says %s", got, meta.SHA256)
	}
	if int64(len(raw)) != meta.RawSize || uint64(len(raw)) != r.To-r.From {
		return bad("%d bytes, metadata walship-raw-size says %d, the key says %d", len(raw), meta.RawSize, r.To-r.From)
	}
	start := seg.StartLSN(size)
	switch {
	case meta.SystemID == "":
		return bad("no walship-system-id metadata")
	case want.SystemID != "" && meta.SystemID != want.SystemID:
		return bad("metadata walship-system-id %s, this cluster is %s: the archive belongs to another cluster", meta.SystemID, want.SystemID)
	case meta.Timeline != seg.Timeline:
		return bad("metadata walship-timeline %d, the segment's is %d", meta.Timeline, seg.Timeline)
	case meta.StartLSN != (start+pipeline.LSN(r.From)).String() || meta.EndLSN != (start+pipeline.LSN(r.To)).String():
		return bad("metadata LSNs %s-%s, the key says %s-%s", meta.StartLSN, meta.EndLSN, start+pipeline.LSN(r.From), start+pipeline.LSN(r.To))
	}
	if r.From == 0 && len(raw) >= longPageHdr {
		if sys := strconv.FormatUint(binary.LittleEndian.Uint64(raw[24:32]), 10); sys != meta.SystemID {
			return bad("written by system %s, metadata walship-system-id says %s", sys, meta.SystemID)
		}
	}
	return nil
}

// downloadRange reads and verifies one range. A range gone since the
// listing wraps errRangeVanished.
func (f *Fetcher) downloadRange(ctx context.Context, seg pipeline.Segment, size pipeline.SegmentSize, r rangeObject, want Expect) ([]byte, error) {
	rc, meta, err := f.Sink.Get(ctx, r.Key)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil, fmt.Errorf("%s: %w", r.Key, errRangeVanished)
		}
		return nil, err
	}
	defer rc.Close()
	if err := CheckMeta(r.Key, meta); err != nil {
		return nil, err
	}
	var buf bytes.Buffer
	n, err := buf.ReadFrom(io.LimitReader(rc, maxRawSize+1<<20+1))
	if err != nil {
		if strings.Contains(err.Error(), "checksum did not match") {
			return nil, fmt.Errorf("%w: %s: %v", ErrCorrupt, r.Key, err)
		}
		return nil, fmt.Errorf("read %s: %w", r.Key, err)
	}
	if n > maxRawSize+1<<20 {
		return nil, fmt.Errorf("%w: %s is larger than any WAL file", ErrCorrupt, r.Key)
	}
	raw, err := open(r.Key, r.Codec, buf.Bytes(), meta, f.Identities)
	if err != nil {
		return nil, err
	}
	if err := checkRange(seg, size, r, raw, meta, want); err != nil {
		return nil, err
	}
	return raw, nil
}

// fromRanges serves a segment that is archived neither whole nor as a
// .partial from its ranges: the longest contiguous WAL from the segment's
// start that the ranges hold, stitched, zero-padded to the segment's size
// and checked as a .partial ending there. No range at offset 0 is "not
// found". Overlapping ranges (from different receiver runs) must hold
// the same bytes where they overlap, or the fetch aborts.
//
// An archiver deletes a segment's ranges once the whole file is durable,
// so when there are no ranges, or a listed one is gone, the whole file (or
// its .partial) is looked up again and served if it is there now.
func (f *Fetcher) fromRanges(ctx context.Context, name string) ([]byte, error) {
	id, err := f.Identity(ctx)
	if err != nil {
		return nil, err
	}
	size := pipeline.SegmentSize(id.SegmentSize)
	if size.Validate() != nil {
		return nil, fmt.Errorf("%w: %s has no valid wal_segment_size (%d), so ranges of %s cannot be placed", ErrCorrupt, f.Layout.IdentityKey(), id.SegmentSize, name)
	}
	seg, err := pipeline.ParseSegmentName(name, size)
	if err != nil {
		return nil, fmt.Errorf("%w: %s: %v", ErrCorrupt, name, err)
	}
	want, err := f.expect(ctx)
	if err != nil {
		return nil, err
	}
	want.SegmentSize = size
	ranges, err := listRanges(ctx, f.Sink, f.Layout, name, size)
	if err != nil {
		return nil, err
	}
	chosen, end := cover(ranges, 0)
	// A timeline that began inside this segment: its file below the switch
	// point is its parent's WAL, which the bucket may hold further than
	// this timeline's own ranges (the receiver's first range of a new
	// timeline can end below the switch; a restarted receiver cuts from
	// 0). Recovery reads this timeline's file and never falls back to the
	// parent's, so the parent's copy fills in below the switch.
	var base []byte
	var baseEnd uint64
	if sw, parent, ok, err := f.beganInside(ctx, seg, size); err != nil {
		return nil, err
	} else if ok && end < sw {
		p, err := f.Read(ctx, pipeline.Segment{Timeline: parent, No: seg.No}.Name(size))
		if err != nil && !errors.Is(err, ErrNotFound) {
			return nil, err
		}
		// The parent's copy is zero-padded: it counts to its last byte
		// that is not zero (its own ranges may not reach the switch yet;
		// zeros after that are what the buffer holds anyway).
		if n := dataEnd(p, sw); err == nil && n > end {
			base, baseEnd = p[:n], n
			chosen, end = cover(ranges, baseEnd)
			end = max(end, baseEnd)
		}
	}
	// An ended timeline's ranges past its end (what a promoted cascading
	// standby received but did not replay) are no timeline's WAL.
	if stop, ok, err := f.endedInside(ctx, seg, size); err != nil {
		return nil, err
	} else if ok && end > stop {
		end = stop
		if baseEnd > stop {
			base, baseEnd = base[:stop], stop
		}
		var kept []rangeObject
		for _, r := range chosen {
			if r.From < stop {
				kept = append(kept, r)
			}
		}
		chosen = kept
	}
	if len(chosen) == 0 && base != nil {
		// Only the parent's copy: the segment may have been archived whole
		// (and its ranges deleted) since it was looked up.
		switch data, err := f.recheckWhole(ctx, name, nil); {
		case err == nil:
			return data, nil
		case !errors.Is(err, ErrNotFound):
			return nil, err
		}
		chosen, end = nil, baseEnd
	}
	if len(chosen) == 0 && base == nil {
		// None, or none at offset 0: the whole file may have been archived
		// and its ranges deleted since it was looked up.
		return f.recheckWhole(ctx, name, nil)
	}
	buf := make([]byte, size)
	copy(buf, base)
	have, prev := baseEnd, "the parent timeline's copy"
	for _, r := range chosen {
		raw, err := f.downloadRange(ctx, seg, size, r, want)
		if errors.Is(err, errRangeVanished) {
			return f.recheckWhole(ctx, name, err)
		}
		if err != nil {
			return nil, err
		}
		if r.From < have {
			if i := firstDiff(buf[r.From:have], raw[:have-r.From]); i >= 0 {
				return nil, fmt.Errorf("%w: %s: ranges %s and %s hold different bytes at offset %#x: refusing to choose one",
					ErrCorrupt, name, prev, r.Key, r.From+uint64(i))
			}
		}
		copy(buf[r.From:], raw[:min(uint64(len(raw)), end-r.From)])
		have, prev = min(r.To, end), r.Key
	}
	sum := sha256.Sum256(buf[:end])
	meta := sinks.Metadata{SHA256: pipeline.SHA256Hex(sum[:]), StartLSN: seg.StartLSN(size).String(),
		EndLSN: (seg.StartLSN(size) + pipeline.LSN(end)).String(), Timeline: seg.Timeline, SystemID: want.SystemID, RawSize: int64(end)}
	if _, err := Check(name+".partial", buf[:end], meta, want); err != nil {
		return nil, fmt.Errorf("ranges of %s stitched to offset %#x: %w", name, end, err)
	}
	return buf, nil
}

// beganInside reads the history of seg's timeline from the bucket: when
// the timeline began inside seg, it returns the switch point's offset and
// the parent timeline. No history file in the bucket: ok false.
func (f *Fetcher) beganInside(ctx context.Context, seg pipeline.Segment, size pipeline.SegmentSize) (sw uint64, parent uint32, ok bool, err error) {
	if seg.Timeline < 2 {
		return 0, 0, false, nil
	}
	hist, err := f.history(ctx, seg.Timeline)
	if err != nil || hist == nil {
		return 0, 0, false, err
	}
	parent, at, ok := pipeline.SwitchPoint(hist)
	if !ok || pipeline.SegmentOf(seg.Timeline, at, size) != seg || size.Offset(at) == 0 {
		return 0, 0, false, nil
	}
	return uint64(size.Offset(at)), parent, true, nil
}

// endedInside looks, in the history files of the timelines after seg's
// (probed upwards until eight in a row are missing: a timeline walship
// never streamed, an abandoned branch, leaves a hole that a restore naming
// its target timeline jumps), for where seg's timeline ended inside seg; the earliest such
// switch, when several timelines branched from it there. A restore that
// follows seg's own timeline past such a branch (recovery_target_timeline
// naming it) then gets its ranges cut at the branch: never WAL of a line
// recovery may not follow.
func (f *Fetcher) endedInside(ctx context.Context, seg pipeline.Segment, size pipeline.SegmentSize) (uint64, bool, error) {
	var stop uint64
	found := false
	for tli, missing := seg.Timeline+1, 0; tli > seg.Timeline && missing < 8; tli++ {
		hist, err := f.history(ctx, tli)
		if err != nil {
			return 0, false, err
		}
		if hist == nil {
			missing++
			continue
		}
		missing = 0
		for _, e := range hist {
			if e.Parent == seg.Timeline && pipeline.SegmentOf(seg.Timeline, e.Switch, size) == seg {
				if off := uint64(size.Offset(e.Switch)); !found || off < stop {
					stop, found = off, true
				}
			}
		}
	}
	return stop, found, nil
}

// history reads a timeline's history file from the bucket; nil when there
// is none.
func (f *Fetcher) history(ctx context.Context, tli uint32) ([]pipeline.HistoryEntry, error) {
	data, err := f.Read(ctx, pipeline.HistoryFileName(tli))
	if errors.Is(err, ErrNotFound) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	hist, err := pipeline.ParseHistory(data)
	if err != nil {
		return nil, fmt.Errorf("%w: %s: %v", ErrCorrupt, pipeline.HistoryFileName(tli), err)
	}
	return hist, nil
}

// recheckWhole looks a segment up again, whole then .partial, after its
// ranges were missing or vanished; it serves what it finds. Found nothing:
// with cause (a range vanished, yet no whole file replaced it: a listing
// that lags, or a retention job), a transient error; without, not found.
func (f *Fetcher) recheckWhole(ctx context.Context, name string, cause error) ([]byte, error) {
	fo, err := f.locate(ctx, name, true)
	switch {
	case err == nil:
		return f.Download(ctx, fo)
	case errors.Is(err, ErrNotFound) && cause != nil:
		return nil, cause
	}
	return nil, err
}

// dataEnd is the end of p's bytes below limit, without its zero tail.
func dataEnd(p []byte, limit uint64) uint64 {
	n := min(uint64(len(p)), limit)
	for n > 0 && p[n-1] == 0 {
		n--
	}
	return n
}

func firstDiff(a, b []byte) int {
	for i := range a {
		if a[i] != b[i] {
			return i
		}
	}
	return -1
}
