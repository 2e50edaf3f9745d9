package restore

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"io"
	"os"
	"strconv"
	"strings"
	"sync"
	"testing"

	"github.com/walship/walship/compress"
	"github.com/walship/walship/pipeline"
	"github.com/walship/walship/sinks"
)

// Review 3: fuzzing of what the read side parses from the bucket. Run
// with go test -fuzz=FuzzReview3<name> -fuzztime=15s ./pipeline/restore.

// Range key leaves and history files must never panic; a parsed range
// suffix round-trips through pipeline.RangeName.
func FuzzReview3RangeSuffixAndHistory(f *testing.F) {
	f.Add("00000000-00004000", []byte("1\t0/5006000\tno recovery target specified\n"))
	f.Add("0000000A-FFFFFFFF", []byte("1\t0/1\n2\t0/1\n"))
	f.Add("", []byte("# x\n\n"))
	f.Fuzz(func(t *testing.T, leaf string, hist []byte) {
		if from, to, ok := pipeline.ParseRangeSuffix(leaf); ok {
			if from >= to || pipeline.RangeName("S", from, to) != "S."+leaf {
				t.Errorf("%q parsed as %d-%d", leaf, from, to)
			}
		}
		compress.SplitExt(leaf)
		h, err := pipeline.ParseHistory(hist)
		if err == nil {
			pipeline.SwitchPoint(h)
		}
		sum := sha(hist)
		Check("00000002.history", hist, sinks.Metadata{SHA256: sum, RawSize: int64(len(hist))}, Expect{})
	})
}

// A .partial built from a real segment with bytes changed and any end:
// Check (page headers, walEnd) must answer, never panic.
func FuzzReview3CheckPartial(f *testing.F) {
	const size = pipeline.SegmentSize(1 << 20)
	seg := pipeline.Segment{Timeline: 1, No: 5}
	base := fakeSegment(seg, size)
	f.Add(uint32(0x6000), uint32(0x10), []byte{0xFF, 0xFF, 0xFF, 0xFF})
	f.Add(uint32(0x2002), uint32(0x2000), []byte{1})
	f.Add(uint32(40), uint32(40), []byte{})
	f.Fuzz(func(t *testing.T, end, at uint32, patch []byte) {
		e := uint64(end) % uint64(size+1)
		if e == 0 {
			return
		}
		raw := append([]byte(nil), base[:e]...)
		if len(raw) > 0 {
			copy(raw[uint64(at)%uint64(len(raw)):], patch)
		}
		m := segMeta(seg, size, raw, seg.StartLSN(size)+pipeline.LSN(e))
		Check(seg.Name(size)+".partial", raw, m, Expect{SystemID: strconv.FormatUint(testSysID, 10), SegmentSize: size})
	})
}

// Stitching: any set of ranges (odd offsets, overlaps, duplicates, past
// the segment, reaching its end), optionally a history that makes
// timeline 1 end in the segment: the fetch never panics, never says "not
// found" when a range starts at 0, and serves exactly the segment's first
// bytes up to the contiguous end (capped at the switch), zeros after.
func FuzzReview3Stitch(f *testing.F) {
	raw5 := fakeSegment(pipeline.Segment{Timeline: 1, No: 5}, 1<<20)
	f.Add([]byte{0, 0, 0x40, 0, 0x20, 0, 0x60, 0}, uint32(0))
	f.Add([]byte{0, 0, 0, 0x10, 0, 0x10, 0, 0x20}, uint32(0x6000))
	f.Add([]byte{0, 0, 0xFF, 0xFF, 0, 0, 0, 1}, uint32(1))
	f.Fuzz(func(t *testing.T, spec []byte, sw uint32) {
		if len(spec) > 64 {
			return
		}
		r := memRangeArchive(t, raw5)
		var ranges []rangeObject
		seen := map[[2]uint64]bool{}
		for i := 0; i+4 <= len(spec); i += 4 {
			// offsets in 8-byte units, so ends fall where a flush can
			from := uint64(binary.BigEndian.Uint16(spec[i:])) * 8
			to := uint64(binary.BigEndian.Uint16(spec[i+2:]))*8 + 0x40
			if to > uint64(r.size) {
				to = uint64(r.size)
			}
			if from >= to || seen[[2]uint64{from, to}] {
				continue
			}
			seen[[2]uint64{from, to}] = true
			r.putRange(from, to, nil)
			ranges = append(ranges, rangeObject{From: from, To: to})
		}
		stop := uint64(r.size)
		if s := uint64(sw) % uint64(r.size); sw != 0 && s >= 0x40 { // a switch point is a record's end
			stop = s
			at := r.seg.StartLSN(r.size) + pipeline.LSN(s)
			h := []byte("1\t" + at.String() + "\tx\n")
			r.put(pipeline.HistoryFileName(2), h, sinks.Metadata{SHA256: sha(h), Timeline: 2,
				SystemID: strconv.FormatUint(testSysID, 10), Codec: "zstd", RawSize: int64(len(h))})
		}
		sortRanges(ranges)
		_, end := cover(ranges, 0)
		end = min(end, stop)
		f := r.fetcher()
		f.AllowPartial = true
		got, err := f.Read(context.Background(), r.seg.Name(r.size))
		if end == 0 {
			if err == nil {
				t.Fatalf("served %s from no range at 0", r.seg.Name(r.size))
			}
			return
		}
		if errors.Is(err, ErrNotFound) {
			t.Fatalf("not found, but ranges cover [0, %#x)", end)
		}
		if err != nil {
			// Every range holds the segment's true bytes, cut on 8-byte
			// boundaries: nothing is corrupt.
			t.Fatalf("ranges covering [0, %#x) of the true WAL: %v", end, err)
		}
		if !bytes.Equal(got, r.want(end)) {
			t.Fatalf("served bytes are not the segment's first %#x bytes and zeros", end)
		}
	})
}

func sortRanges(rs []rangeObject) {
	for i := 1; i < len(rs); i++ {
		for j := i; j > 0 && (rs[j].From < rs[j-1].From || rs[j].From == rs[j-1].From && rs[j].To > rs[j-1].To); j-- {
			rs[j], rs[j-1] = rs[j-1], rs[j]
		}
	}
}

// memSink is an in-memory sink (a fuzz iteration on the file sink costs
// seconds of fsyncs on a shared machine).
type memSink struct {
	mu   sync.Mutex
	objs map[string]memObj
}

type memObj struct {
	body []byte
	meta sinks.Metadata
}

func (m *memSink) Put(_ context.Context, key string, body []byte, meta sinks.Metadata) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if _, ok := m.objs[key]; ok {
		return sinks.ErrExists
	}
	m.objs[key] = memObj{append([]byte(nil), body...), meta}
	return nil
}

func (m *memSink) Head(_ context.Context, key string) (sinks.Metadata, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	o, ok := m.objs[key]
	if !ok {
		return sinks.Metadata{}, os.ErrNotExist
	}
	return o.meta, nil
}

func (m *memSink) Get(_ context.Context, key string) (io.ReadCloser, sinks.Metadata, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	o, ok := m.objs[key]
	if !ok {
		return nil, sinks.Metadata{}, os.ErrNotExist
	}
	return io.NopCloser(bytes.NewReader(o.body)), o.meta, nil
}

func (m *memSink) List(_ context.Context, prefix string, fn func(sinks.Object) error) error {
	m.mu.Lock()
	var keys []string
	for k := range m.objs {
		if strings.HasPrefix(k, prefix) {
			keys = append(keys, k)
		}
	}
	m.mu.Unlock()
	sortStrings(keys)
	for _, k := range keys {
		if err := fn(sinks.Object{Key: k, Size: int64(len(m.objs[k].body))}); err != nil {
			return err
		}
	}
	return nil
}

func sortStrings(s []string) {
	for i := 1; i < len(s); i++ {
		for j := i; j > 0 && s[j] < s[j-1]; j-- {
			s[j], s[j-1] = s[j-1], s[j]
		}
	}
}

// memRangeArchive is newRangeArchive's segment 5 on a memSink.
func memRangeArchive(t *testing.T, raw5 []byte) *rangeArchive {
	const size = pipeline.SegmentSize(1 << 20)
	enc, _ := compress.NewEncoder(compress.Zstd, 0)
	a := &archive{t: t, sink: &memSink{objs: map[string]memObj{}}, layout: sinks.BarmanCloud{Prefix: "p", Server: "s"}, enc: enc}
	a.identity(testSysID, size)
	return &rangeArchive{archive: a, size: size, seg: pipeline.Segment{Timeline: 1, No: 5}, raw: raw5}
}
