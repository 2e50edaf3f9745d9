package sim

import (
	"bytes"
	"crypto/sha256"
	"fmt"
	"path"
	"strconv"
	"strings"

	"github.com/walship/walship/compress"
	"github.com/walship/walship/crypt"
	"github.com/walship/walship/internal/walgen"
	"github.com/walship/walship/pipeline"
	"github.com/walship/walship/sinks"
)

// checkObject is invariant (c), at every upload: the key was free (the
// bucket refuses otherwise) and the object holds exactly the WAL, history
// or identity its name says, with matching metadata.
func (w *World) checkObject(key string, o *stored) error {
	if key == w.layout.IdentityKey() {
		id, err := sinks.ParseIdentity(key, o.body)
		if err != nil || id.SystemID != strconv.FormatUint(sysID, 10) || id.SegmentSize != uint64(w.size) {
			return fmt.Errorf("identity object %s: %+v %v", key, id, err)
		}
		return nil
	}
	file, ok := strings.CutSuffix(path.Base(key), w.codec.Ext())
	if !ok {
		return fmt.Errorf("%s: not a %s object", key, w.codec)
	}
	if w.layout.Key(file, w.codec.Ext()) != key {
		return fmt.Errorf("%s: not where the layout puts %s", key, file)
	}
	raw, err := w.decode(key, o)
	if err != nil {
		return err
	}
	want, end, err := w.expected(file)
	if err != nil {
		return fmt.Errorf("%s: %v", key, err)
	}
	if !bytes.Equal(raw, want.raw) {
		return fmt.Errorf("%s does not hold the bytes of %s", key, file)
	}
	m := o.meta
	if m.SHA256 != want.sum || m.RawSize != int64(len(raw)) || m.SystemID != strconv.FormatUint(sysID, 10) {
		return fmt.Errorf("%s: metadata %+v does not describe its bytes", key, m)
	}
	if end != 0 && m.EndLSN != end.String() {
		return fmt.Errorf("%s: end LSN %s in its metadata, the timeline ended at %s", key, m.EndLSN, end)
	}
	o.raw = raw
	return nil
}

// decode decrypts and decompresses a stored object: archivers that
// encrypt never store plaintext.
func (w *World) decode(key string, o *stored) ([]byte, error) {
	return w.decodeN(key, o, int(w.size))
}

// decodeN is decode with the raw size expected.
func (w *World) decodeN(key string, o *stored, size int) ([]byte, error) {
	body, err := crypt.Decrypt(o.meta.Encryption, o.body, w.ids)
	if err != nil {
		return nil, fmt.Errorf("%s: %v", key, err)
	}
	if len(w.ids) > 0 && o.meta.Encryption == "" {
		return nil, fmt.Errorf("%s: stored in plaintext by archivers that encrypt", key)
	}
	raw, err := compress.Decode(w.codec, body, size)
	if err != nil {
		return nil, fmt.Errorf("%s: %v", key, err)
	}
	return raw, nil
}

// content is a file's bytes and their SHA-256.
type content struct {
	raw []byte
	sum string
}

func newContent(raw []byte) content {
	s := sha256.Sum256(raw)
	return content{raw: raw, sum: pipeline.SHA256Hex(s[:])}
}

// expected is what the archive must hold for a WAL file name, and for a
// .partial where its WAL ends. Files do not change once they exist, so
// each is computed once.
func (w *World) expected(file string) (content, pipeline.LSN, error) {
	if c, ok := w.want[file]; ok {
		return c.c, c.end, nil
	}
	raw, end, err := w.expectedRaw(file)
	if err != nil {
		return content{}, 0, err
	}
	c := newContent(raw)
	w.want[file] = wanted{c, end}
	return c, end, nil
}

type wanted struct {
	c   content
	end pipeline.LSN
}

func (w *World) expectedRaw(file string) ([]byte, pipeline.LSN, error) {
	if tli, ok := pipeline.ParseHistoryFileName(file); ok {
		if tli > w.tli() || tli < 2 {
			return nil, 0, fmt.Errorf("history of timeline %d, which does not exist", tli)
		}
		return w.historyFile(tli), 0, nil
	}
	base, partial := strings.CutSuffix(file, ".partial")
	seg, err := pipeline.ParseSegmentName(base, w.size)
	if err != nil || seg.Timeline > w.tli() {
		return nil, 0, fmt.Errorf("%s: no such segment (%v)", file, err)
	}
	tlEnd, ended := w.hist.End(seg.Timeline)
	if partial {
		if !ended || tlEnd < seg.StartLSN(w.size) || tlEnd >= seg.EndLSN(w.size) {
			return nil, 0, fmt.Errorf("%s: timeline %d did not end inside this segment", file, seg.Timeline)
		}
		return walgen.Segment(seg, tlEnd, w.hist, sysID, w.size), tlEnd, nil
	}
	if seg.EndLSN(w.size) > w.tlEnd(seg.Timeline) {
		return nil, 0, fmt.Errorf("%s: the server has not finished this segment (timeline ends at %s)", file, w.tlEnd(seg.Timeline))
	}
	return walgen.Segment(seg, seg.EndLSN(w.size), w.hist, sysID, w.size), 0, nil
}

// walshipObject is the object at key if it is walship's.
func (w *World) walshipObject(key string) *stored {
	if o, ok := w.bkt.objs[key]; ok && !o.foreign {
		return o
	}
	return nil
}

// coverage is how far into segment n the bucket holds the WAL of the
// server's current line of timelines, as recovery reads it: an object of
// timeline t counts from the segment where t began, up to where t ended
// (its bytes after that are not the current line's). Ranges count too, as
// `fetch --allow-partial` serves them: the contiguous reach of a
// timeline's range objects of the segment from its start.
func (w *World) coverage(n uint64) pipeline.LSN {
	start := pipeline.LSN(n * uint64(w.size))
	best := start
	for _, t := range w.hist {
		if n < uint64(t.Begin)/uint64(w.size) {
			// Recovery never reads a timeline's file for a segment before
			// that timeline began (XLogFileReadAnyTLI).
			continue
		}
		seg := pipeline.Segment{Timeline: t.TLI, No: n}
		tEnd, ended := w.hist.End(t.TLI)
		if w.walshipObject(w.layout.Key(seg.Name(w.size), w.codec.Ext())) != nil {
			c := seg.EndLSN(w.size)
			if ended {
				c = min(c, tEnd)
			}
			best = max(best, c)
		}
		if ended && w.walshipObject(w.layout.Key(seg.Name(w.size)+".partial", w.codec.Ext())) != nil {
			best = max(best, min(tEnd, seg.EndLSN(w.size)))
		}
		if r := w.rangeReach(seg.Name(w.size)); r > 0 {
			c := start + pipeline.LSN(r)
			if ended {
				c = min(c, tEnd)
			}
			best = max(best, c)
		}
	}
	return best
}

// contiguousEnd is the end of the WAL the bucket holds without a hole,
// from the segment where the slot was created; when the slot was recreated
// after a gap, from the recreated slot's segment.
func (w *World) contiguousEnd() pipeline.LSN {
	var end pipeline.LSN
	// Prune deletes WAL below the oldest kept backup: coverage counts from
	// the floor of what it deleted (e3).
	w.contig = max(w.contig, uint64(w.bk.walFloor)/uint64(w.size))
	for n := w.contig; ; n++ {
		c := w.coverage(n)
		if c < pipeline.LSN((n+1)*uint64(w.size)) {
			end = c
			break
		}
		w.contig = n + 1
	}
	if end >= w.gapFloor {
		return end
	}
	for n := max(uint64(w.gapFloor), uint64(w.bk.walFloor)) / uint64(w.size); ; n++ {
		c := w.coverage(n)
		if c < pipeline.LSN((n+1)*uint64(w.size)) {
			return max(end, c)
		}
	}
}

// checkFlush is invariant (a) on every flush reported to the server, and
// that it never goes back below the slot.
func (w *World) checkFlush(flush pipeline.LSN) {
	if c := w.contiguousEnd(); flush > max(c, w.initial, w.gapFloor) {
		w.fail("(a) flush %s reported, but the bucket holds the WAL contiguously only to %s", flush, c)
	}
	// Recovery follows a timeline only through its history file: WAL of a
	// timeline past its switch point is of no use to a restore (it stays
	// on the parent timeline and ends at the switch) until the bucket holds
	// that timeline's history. The WAL check of (a) reads the timeline line
	// from the simulation, not from the bucket, so this is checked apart.
	for _, t := range w.hist[1:] {
		if flush > t.Begin && t.Begin >= w.gapFloor {
			key := w.layout.Key(pipeline.HistoryFileName(t.TLI), w.codec.Ext())
			if w.walshipObject(key) == nil {
				w.fail("(a) flush %s reported past timeline %d's switch point %s, but the bucket has no %s: a restore cannot follow the timeline",
					flush, t.TLI, t.Begin, pipeline.HistoryFileName(t.TLI))
			}
		}
	}
	if flush < w.slot {
		w.fail("flush %s reported below the slot's restart_lsn %s: the server would move the slot back onto WAL it may have removed", flush, w.slot)
	}
}

// checkWrite: the write position reported is durable in the spool: the
// open segment's directory entry and its bytes up to write survive a
// crash, and are the server's.
func (w *World) checkWrite(h *host, write pipeline.LSN) {
	off := w.size.Offset(write)
	if off == 0 {
		return
	}
	tli := h.core.Timeline()
	seg := pipeline.SegmentOf(tli, write, w.size)
	name := path.Join(spoolDir, seg.Name(w.size)+".partial")
	data, ok := h.fs.durableBytes(name)
	if !ok || int64(len(data)) < off {
		w.fail("write %s reported, but a crash would leave %s with %d durable bytes (entry durable: %v)", write, path.Base(name), len(data), ok)
	}
	if cap(w.wbuf) < int(off) {
		w.wbuf = make([]byte, w.size)
	}
	want := w.wbuf[:off]
	walgen.Fill(want, seg.StartLSN(w.size), tli, w.tlEnd(tli), w.hist, sysID, w.size)
	if !bytes.Equal(data[:off], want) {
		w.fail("write %s reported, but %s's durable bytes are not the server's WAL", write, path.Base(name))
	}
}

// checkRemove is invariant (b): a WAL file leaves the spool only when the
// bucket holds its bytes (or the same bytes replace it).
func (w *World) checkRemove(name string, data, replacement []byte) {
	if replacement != nil && bytes.Equal(data, replacement) {
		return
	}
	base := path.Base(name)
	var file string
	var end pipeline.LSN // where the file's WAL ends
	switch {
	case pipeline.IsSegmentName(base):
		file = base
		seg, _ := pipeline.ParseSegmentName(base, w.size)
		end = seg.EndLSN(w.size)
	case len(base) > 24 && pipeline.IsSegmentName(base[:24]) && strings.HasPrefix(base[24:], ".partial.ended"):
		file = base[:24] + ".partial"
		e, _ := strconv.ParseUint(strings.TrimPrefix(base[24:], ".partial.ended."), 16, 64)
		end = pipeline.LSN(e)
	case strings.HasSuffix(base, ".history"):
		file = base
	case strings.HasSuffix(base, ".range"):
		if seg, from, to, ok := w.rangeSpoolFile(base); ok {
			w.checkRemoveRange(base, data, seg, from, to)
		}
		return
	default:
		return // .partial being written, temporary files, the lock
	}
	if end != 0 && end <= w.initial {
		return // WAL from before the slot was created: the archive begins after it
	}
	if want, _, err := w.expected(file); err != nil || !bytes.Equal(data, want.raw) {
		return // damaged: its WAL is still on the server, and (a) watches that
	}
	key := w.layout.Key(file, w.codec.Ext())
	o := w.walshipObject(key)
	if o == nil && w.bk.pruned[key] && end != 0 && end <= w.bk.walFloor {
		return // the bucket held it; prune deleted it since, below the floor
	}
	if o == nil || !bytes.Equal(o.raw, data) {
		w.fail("(b) spool file %s removed, but the bucket does not hold its bytes at %s (object: %v)", base, key, o != nil)
	}
}
