package restore

// Third adversarial review of the read side of ranges: each test here
// demonstrates one finding of /tmp/review3-findings.txt and fails until it
// is fixed.

import (
	"bytes"
	"context"
	"errors"
	"strconv"
	"strings"
	"testing"

	"github.com/walship/walship/pipeline"
	"github.com/walship/walship/sinks"
)

// putHistory stores <tli>.history with the given body.
func (r *rangeArchive) putHistory(tli uint32, body string) {
	r.t.Helper()
	h := []byte(body)
	r.put(pipeline.HistoryFileName(tli), h, sinks.Metadata{SHA256: sha(h), Timeline: tli,
		SystemID: strconv.FormatUint(testSysID, 10), Codec: "zstd", RawSize: int64(len(h))})
}

// putRangeOf stores bytes [from, to) of raw as a range of seg.
func (r *rangeArchive) putRangeOf(seg pipeline.Segment, raw []byte, from, to uint64) {
	r.t.Helper()
	body := raw[from:to]
	z, err := r.enc.Encode(body)
	if err != nil {
		r.t.Fatal(err)
	}
	m := r.rangeMeta(from, to, body)
	m.Timeline = seg.Timeline
	m.StartLSN = (seg.StartLSN(r.size) + pipeline.LSN(from)).String()
	m.EndLSN = (seg.StartLSN(r.size) + pipeline.LSN(to)).String()
	if err := r.sink.Put(context.Background(), r.layout.RangeKey(seg.Name(r.size), from, to, ".zst"), append([]byte(nil), z...), m); err != nil {
		r.t.Fatal(err)
	}
}

// Finding R3-1: the parent fill hides a whole segment archived during the
// fetch. fetch --allow-partial of a new timeline's first segment
// (00000002…05, timeline 2 began at 0x6000 inside it) looks the whole
// file up, finds nothing, then lists its ranges. An archiver that
// archives 00000002…05 whole in between deletes its ranges, so the
// listing is empty; fromRanges then fills from the parent's WAL below the
// switch point and, because base != nil, serves that (timeline 1's WAL to
// 0x6000, zeros after) instead of re-checking the whole file as it does
// when there is no base. The bucket now holds the whole segment; recovery
// (not in standby mode) ends at the switch point and promotes there,
// dropping every byte of timeline 2.
func TestReview3ParentFillHidesWholeArchivedMeanwhile(t *testing.T) {
	r := newRangeArchive(t)
	const sw = 0x6000
	at := r.seg.StartLSN(r.size) + sw
	r.put(r.seg.Name(r.size)+".partial", r.raw[:sw], segMeta(r.seg, r.size, r.raw[:sw], at))
	r.putHistory(2, "1\t"+at.String()+"\tno recovery target specified\n")
	seg2 := pipeline.Segment{Timeline: 2, No: r.seg.No}
	raw2 := fakeSegment(seg2, r.size) // stands for timeline 2's whole file
	r.putRangeOf(seg2, raw2, 0, 0x8000)
	prefix2 := r.layout.RangePrefix(seg2.Name(r.size))
	r.hs.beforeList = func() {
		// The archiver: 00000002…05 whole, then its ranges deleted.
		r.hs.beforeList = nil
		r.put(seg2.Name(r.size), raw2, segMeta(seg2, r.size, raw2, 0))
		r.hs.Sink.List(context.Background(), prefix2, func(ob sinks.Object) error {
			return r.hs.Sink.Delete(context.Background(), ob.Key)
		})
	}
	f := r.fetcher()
	f.AllowPartial = true
	got, err := f.Read(context.Background(), seg2.Name(r.size))
	if err != nil {
		t.Fatalf("fetch %s: %v", seg2.Name(r.size), err)
	}
	if !bytes.Equal(got, raw2) {
		n := len(got)
		for n > 0 && got[n-1] == 0 {
			n--
		}
		t.Errorf("served %s with %#x bytes of data (the parent's copy below the switch point); the bucket holds it whole (%d bytes)", seg2.Name(r.size), n, len(raw2))
	}
}

// Finding R3-2: endedInside only reads the history of timeline+1. The
// timeline after an ended one is the server's answer, not +1 (DESIGN:
// "never assume +1"): PostgreSQL picks one past the newest history it
// finds in the archive, so a PITR branch (00000002.history, branching from
// timeline 1 at segment 3) makes the next promotion timeline 3. Then
// 00000003.history says timeline 1 ended at 0x6000 inside segment 5, but
// fetch --allow-partial of 00000001…05 - what a standby following timeline
// 1 asks for while timeline 3's file is not in the bucket (R2-3) - reads
// only 00000002.history, finds no switch in segment 5, and serves timeline
// 1's ranges to their end, past the switch point the bucket states.
func TestReview3EndedTimelineNextIsNotPlusOne(t *testing.T) {
	for _, c := range []struct {
		name string
		tl2  bool
	}{{"timeline 2 a PITR branch", true}, {"no timeline 2 in the bucket", false}} {
		t.Run(c.name, func(t *testing.T) {
			r := newRangeArchive(t)
			const sw = 0x6000
			at := r.seg.StartLSN(r.size) + sw
			if c.tl2 {
				r.putHistory(2, "1\t0/300000\tbefore 2024-01-01 00:00:00+00\n")
			}
			r.putHistory(3, "1\t"+at.String()+"\tno recovery target specified\n")
			r.putRange(0, 0x4000, nil)
			r.putRange(0x4000, 0x8000, nil) // past timeline 1's end
			got, err := r.fetch()
			if err != nil {
				t.Fatal(err)
			}
			for i := sw; i < len(got); i++ {
				if got[i] != 0 {
					t.Fatalf("served %s with WAL at offset %#x, past timeline 1's end %s (offset %#x) that 00000003.history states",
						r.seg.Name(r.size), i, at, sw)
				}
			}
		})
	}
}

// Checked, safe: a history that names its own timeline (or a later one)
// as parent does not recurse - Check refuses it - and the fetch aborts
// rather than saying "not found".
func TestReview3SelfParentHistoryAborts(t *testing.T) {
	r := newRangeArchive(t)
	seg2 := pipeline.Segment{Timeline: 2, No: r.seg.No}
	at := r.seg.StartLSN(r.size) + 0x6000
	r.putHistory(2, "2\t"+at.String()+"\tself\n")
	raw2 := fakeSegment(seg2, r.size)
	r.putRangeOf(seg2, raw2, 0, 0x2000)
	lists := 0
	r.hs.beforeList = func() {
		if lists++; lists > 20 {
			t.Fatal("fromRanges recursed")
		}
	}
	f := r.fetcher()
	f.AllowPartial = true
	_, err := f.Read(context.Background(), seg2.Name(r.size))
	if err == nil || errors.Is(err, ErrNotFound) || !strings.Contains(err.Error(), "history") {
		t.Errorf("%v, want an abort naming the history", err)
	}
}
