package sim

import (
	"bytes"
	"fmt"
	"path"
	"sort"
	"strconv"
	"strings"

	"github.com/walship/walship/internal/walgen"
	"github.com/walship/walship/pipeline"
)

// Ranges (pipeline.KindRange): WAL of the segment being written, uploaded
// before the segment completes, at layout.RangeKey. The bucket may hold
// overlapping ranges of one segment from different receiver runs (the same
// bytes where they overlap); they go once the whole segment is archived.

// span is one range object of a segment: bytes [from, to) of it.
type span struct {
	from, to uint64
	key      string
}

// parseRangeKey: key is where the layout puts bytes [from, to) of segment
// seg, with the archive's extension.
func (w *World) parseRangeKey(key string) (seg pipeline.Segment, from, to uint64, ok bool) {
	dir, leaf := path.Split(key)
	name := path.Base(dir)
	if !pipeline.IsSegmentName(name) || w.layout.RangePrefix(name) != dir {
		return seg, 0, 0, false
	}
	leaf, ok = strings.CutSuffix(leaf, w.codec.Ext())
	if !ok {
		return seg, 0, 0, false
	}
	if from, to, ok = pipeline.ParseRangeSuffix(leaf); !ok || to > uint64(w.size) {
		return seg, 0, 0, false
	}
	seg, err := pipeline.ParseSegmentName(name, w.size)
	if err != nil || w.layout.RangeKey(name, from, to, w.codec.Ext()) != key {
		return seg, 0, 0, false
	}
	return seg, from, to, true
}

// rangeBytes is the WAL that timeline seg.Timeline holds at [from, to) of
// segment seg; ok is false when the server has not written all of it on
// that timeline.
func (w *World) rangeBytes(seg pipeline.Segment, from, to uint64) ([]byte, bool) {
	start := seg.StartLSN(w.size)
	if seg.Timeline > w.tli() || w.hist.Owner(seg.Timeline, 0) == 0 || start+pipeline.LSN(to) > w.tlEnd(seg.Timeline) {
		return nil, false
	}
	buf := make([]byte, to-from)
	walgen.Fill(buf, start+pipeline.LSN(from), seg.Timeline, w.tlEnd(seg.Timeline), w.hist, sysID, w.size)
	return buf, true
}

// checkRange is invariant (c) for a range object: it holds exactly the
// server's WAL its key names, and its metadata describes those bytes.
func (w *World) checkRange(key string, o *stored, seg pipeline.Segment, from, to uint64) error {
	raw, err := w.decode(key, o)
	if err != nil {
		return err
	}
	want, ok := w.rangeBytes(seg, from, to)
	if !ok {
		return fmt.Errorf("%s: timeline %d's WAL ends at %s, before this range", key, seg.Timeline, w.tlEnd(seg.Timeline))
	}
	if !bytes.Equal(raw, want) {
		return fmt.Errorf("%s does not hold the bytes of %s", key, pipeline.RangeName(seg.Name(w.size), from, to))
	}
	m, start := o.meta, seg.StartLSN(w.size)
	c := newContent(want)
	if m.SHA256 != c.sum || m.RawSize != int64(len(raw)) || m.SystemID != strconv.FormatUint(sysID, 10) ||
		m.StartLSN != (start+pipeline.LSN(from)).String() || m.EndLSN != (start+pipeline.LSN(to)).String() || m.Timeline != seg.Timeline {
		return fmt.Errorf("%s: metadata %+v does not describe its bytes", key, m)
	}
	o.raw = raw
	return nil
}

// addRange records a walship range object in the bucket's index.
func (b *bucket) addRange(seg pipeline.Segment, from, to uint64, key string) {
	name := seg.Name(b.w.size)
	b.ranges[name] = append(b.ranges[name], span{from, to, key})
	sort.Slice(b.ranges[name], func(i, j int) bool { return b.ranges[name][i].from < b.ranges[name][j].from })
}

// dropRange forgets a deleted range object.
func (b *bucket) dropRange(key string) {
	seg, _, _, ok := b.w.parseRangeKey(key)
	if !ok {
		return
	}
	name := seg.Name(b.w.size)
	spans := b.ranges[name]
	for i, s := range spans {
		if s.key == key {
			b.ranges[name] = append(spans[:i:i], spans[i+1:]...)
			break
		}
	}
	if len(b.ranges[name]) == 0 {
		delete(b.ranges, name)
	}
}

// rangeReach is how far from its start the bucket's range objects of
// segment name hold its WAL without a hole (an offset; 0: not at all):
// what `fetch --allow-partial` serves.
func (w *World) rangeReach(name string) uint64 {
	var reach uint64
	for _, s := range w.bkt.ranges[name] { // sorted by from
		if s.from > reach {
			break
		}
		reach = max(reach, s.to)
	}
	return reach
}

// checkDelete: walship deletes only its own range objects, and only of a
// segment the bucket holds whole (or as the .partial of an ended
// timeline), with walship's metadata.
func (w *World) checkDelete(key string) {
	seg, _, _, ok := w.parseRangeKey(key)
	if !ok {
		w.fail("(c) delete %s: not a range key: walship deletes only its own range objects", key)
	}
	name := seg.Name(w.size)
	whole, partial := w.layout.Key(name, w.codec.Ext()), w.layout.Key(name+".partial", w.codec.Ext())
	if (w.bk.pruned[whole] || w.bk.pruned[partial]) && seg.EndLSN(w.size) <= w.bk.walFloor {
		return // the bucket held it whole; prune deleted it since
	}
	if w.walshipObject(whole) == nil && w.walshipObject(partial) == nil {
		w.fail("(c) delete %s: the bucket does not hold segment %s whole (nor its .partial)", key, name)
	}
}

// rangeSpoolFile parses a spool range file's name: <segment>.<from>-<to>.range.
func (w *World) rangeSpoolFile(base string) (seg pipeline.Segment, from, to uint64, ok bool) {
	rest, ok := strings.CutSuffix(base, ".range")
	if !ok || len(rest) < 26 || rest[24] != '.' || !pipeline.IsSegmentName(rest[:24]) {
		return seg, 0, 0, false
	}
	if from, to, ok = pipeline.ParseRangeSuffix(rest[25:]); !ok || to > uint64(w.size) {
		return seg, 0, 0, false
	}
	seg, err := pipeline.ParseSegmentName(rest[:24], w.size)
	return seg, from, to, err == nil
}

// checkRemoveRange is invariant (b) for a range spool file: it goes only
// when the bucket holds that range with its bytes, or the whole segment
// (or its .partial) covering it.
func (w *World) checkRemoveRange(base string, data []byte, seg pipeline.Segment, from, to uint64) {
	start := seg.StartLSN(w.size)
	if start+pipeline.LSN(to) <= w.initial {
		return // WAL from before the slot was created
	}
	if want, ok := w.rangeBytes(seg, from, to); !ok || !bytes.Equal(data, want) {
		return // damaged: its WAL is still on the server, and (a) watches that
	}
	name := seg.Name(w.size)
	key := w.layout.RangeKey(name, from, to, w.codec.Ext())
	if o := w.walshipObject(key); o != nil && bytes.Equal(o.raw, data) {
		return
	}
	if (w.bk.pruned[key] || w.bk.pruned[w.layout.Key(name, w.codec.Ext())] || w.bk.pruned[w.layout.Key(name+".partial", w.codec.Ext())]) && seg.EndLSN(w.size) <= w.bk.walFloor {
		return // the bucket held it; prune deleted it since, below the floor
	}
	if w.walshipObject(w.layout.Key(name, w.codec.Ext())) != nil {
		return // checkObject: it holds the server's segment
	}
	if e, ended := w.hist.End(seg.Timeline); ended && start+pipeline.LSN(to) <= e && w.walshipObject(w.layout.Key(name+".partial", w.codec.Ext())) != nil {
		return
	}
	w.fail("(b) spool file %s removed, but the bucket holds neither that range at %s nor segment %s", base, key, name)
}
