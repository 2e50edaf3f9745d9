package sim

import (
	"context"
	"hash/fnv"
	"math/rand/v2"
	"path"
	"strconv"
	"strings"
	"testing"

	"github.com/walship/walship/compress"
	"github.com/walship/walship/pipeline"
	"github.com/walship/walship/sinks"
)

// rangeWorld is a set-up world, quiet (no interference, no lost replies,
// plain objects), whose server has written past segment seg.
func rangeWorld(t *testing.T) (*World, *bucketFor, pipeline.Segment) {
	t.Helper()
	w := &World{opt: Options{Seed: 5, Steps: 1}, rng: rand.New(rand.NewPCG(5, 5)), busy: map[string]bool{}, want: map[string]wanted{}}
	w.digest = hashWriter{fnv.New64a()}
	w.res = Result{Faults: map[string]int{}, Counts: map[string]int{}}
	w.setup()
	w.faultsOn, w.depth, w.codec, w.ids = false, 1, compress.None, nil
	w.end = w.budget
	seg := pipeline.SegmentOf(1, w.initial, w.size).Next()
	return w, &bucketFor{b: w.bkt, a: w.archs[0]}, seg
}

// try runs fn and returns the invariant it broke, if any.
func try(w *World, fn func()) (err error) {
	defer func() {
		if p := recover(); p != nil && p != errStop {
			panic(p)
		}
		err, w.err = w.err, nil
	}()
	fn()
	return nil
}

func rangeMeta(w *World, seg pipeline.Segment, from, to uint64, raw []byte) sinks.Metadata {
	s := seg.StartLSN(w.size)
	return sinks.Metadata{SHA256: newContent(raw).sum, StartLSN: (s + pipeline.LSN(from)).String(), EndLSN: (s + pipeline.LSN(to)).String(),
		Timeline: seg.Timeline, SystemID: strconv.FormatUint(sysID, 10), Codec: "none", RawSize: int64(len(raw))}
}

func putRange(w *World, s *bucketFor, seg pipeline.Segment, from, to uint64) error {
	raw, _ := w.rangeBytes(seg, from, to)
	return try(w, func() {
		s.Put(context.Background(), w.layout.RangeKey(seg.Name(w.size), from, to, ""), raw, rangeMeta(w, seg, from, to, raw))
	})
}

// TestRangeInvariants: the checks the simulation adds for ranges fail
// when they must.
func TestRangeInvariants(t *testing.T) {
	w, s, seg := rangeWorld(t)
	ctx, name, start := context.Background(), seg.Name(w.size), seg.StartLSN(w.size)

	if err := putRange(w, s, seg, 0, 0x2000); err != nil {
		t.Fatal(err)
	}
	if err := putRange(w, s, seg, 0x1000, 0x3000); err != nil {
		t.Fatal(err)
	}
	if err := putRange(w, s, seg, 0x4000, 0x5000); err != nil {
		t.Fatal(err)
	}
	if got := w.coverage(seg.No); got != start+0x3000 {
		t.Errorf("coverage %s, want %s: the contiguous reach of the ranges from the segment's start", got, start+0x3000)
	}

	raw, _ := w.rangeBytes(seg, 0x5000, 0x6000)
	bad := append([]byte(nil), raw...)
	bad[100] ^= 1
	for what, put := range map[string]func(){
		"other bytes": func() {
			s.Put(ctx, w.layout.RangeKey(name, 0x5000, 0x6000, ""), bad, rangeMeta(w, seg, 0x5000, 0x6000, bad))
		},
		"metadata off by a byte": func() {
			m := rangeMeta(w, seg, 0x5000, 0x6000, raw)
			m.EndLSN = (start + 0x6001).String()
			s.Put(ctx, w.layout.RangeKey(name, 0x5000, 0x6000, ""), raw, m)
		},
		"bytes at another offset": func() {
			s.Put(ctx, w.layout.RangeKey(name, 0x6000, 0x7000, ""), raw, rangeMeta(w, seg, 0x6000, 0x7000, raw))
		},
		"beyond the server's WAL": func() {
			far := pipeline.SegmentOf(1, w.end, w.size).Next()
			s.Put(ctx, w.layout.RangeKey(far.Name(w.size), 0, 0x1000, ""), raw[:0x1000], rangeMeta(w, far, 0, 0x1000, raw[:0x1000]))
		},
		"delete a WAL segment": func() { s.Delete(ctx, w.layout.Key(name, "")) },
		"delete a range of a segment not archived whole": func() {
			s.Delete(ctx, w.layout.RangeKey(name, 0, 0x2000, ""))
		},
	} {
		if err := try(w, put); err == nil || !strings.Contains(err.Error(), "(c)") {
			t.Errorf("%s: %v, want invariant (c) broken", what, err)
		}
	}

	// A range spool file may go when the bucket holds that range...
	remove := func(from, to uint64) func() {
		b, _ := w.rangeBytes(seg, from, to)
		return func() { w.checkRemove(path.Join(spoolDir, pipeline.RangeName(name, from, to)+".range"), b, nil) }
	}
	if err := try(w, remove(0, 0x2000)); err != nil {
		t.Errorf("range the bucket holds removed from the spool: %v", err)
	}
	// ...and not when it holds only an overlapping one.
	if err := try(w, remove(0, 0x3000)); err == nil || !strings.Contains(err.Error(), "(b)") {
		t.Errorf("range the bucket does not hold removed from the spool: %v, want (b) broken", err)
	}

	// The whole segment archived: every range of it may go, in the spool
	// and the bucket.
	whole, _, err := w.expected(name)
	if err != nil {
		t.Fatal(err)
	}
	if err := try(w, func() {
		s.Put(ctx, w.layout.Key(name, ""), whole.raw, sinks.Metadata{SHA256: whole.sum, SystemID: strconv.FormatUint(sysID, 10), RawSize: int64(len(whole.raw))})
	}); err != nil {
		t.Fatal(err)
	}
	if err := try(w, remove(0, 0x3000)); err != nil {
		t.Errorf("range of an archived segment removed from the spool: %v", err)
	}
	var keys []string
	if err := s.List(ctx, w.layout.RangePrefix(name), func(o sinks.Object) error { keys = append(keys, o.Key); return nil }); err != nil {
		t.Fatal(err)
	}
	if len(keys) != 3 {
		t.Fatalf("listed %v, want the 3 ranges", keys)
	}
	for _, k := range keys {
		if err := try(w, func() { s.Delete(ctx, k) }); err != nil {
			t.Errorf("delete %s: %v", k, err)
		}
	}
	if len(w.bkt.ranges) != 0 {
		t.Errorf("range index after deleting every range: %v", w.bkt.ranges)
	}
	if got := w.coverage(seg.No); got != seg.EndLSN(w.size) {
		t.Errorf("coverage %s with the whole segment, want %s", got, seg.EndLSN(w.size))
	}
}
