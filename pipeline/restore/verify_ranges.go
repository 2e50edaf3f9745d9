package restore

import (
	"context"
	"fmt"
	"sort"
	"strings"
	"sync"

	"github.com/walship/walship/compress"
	"github.com/walship/walship/crypt"
	"github.com/walship/walship/pipeline"
	"github.com/walship/walship/sinks"
)

// RangeEnd is where a timeline's archive ends when the segment after its
// last whole segment exists only as ranges (WAL of the segment being
// written): fetch --allow-partial serves its WAL up to End.
type RangeEnd struct {
	Segment string       `json:"segment"`
	End     pipeline.LSN `json:"end"`     // end of the contiguous WAL from the segment's start
	Objects int          `json:"objects"` // range objects of the segment
}

// verifyRanges lists the range objects (outside the WAL prefix) and adds
// to the report: per timeline, the trailing segment that exists only as
// ranges, as the archive's end (never a gap); the count of leftover
// ranges of segments archived whole or as .partial (the archiver deletes
// them; not a problem); and as problems, range keys that do not parse,
// trailing ranges that do not start at offset 0, and ranges beyond the
// segment after a timeline's last one. The trailing segment's ranges are
// checked like other objects: metadata, and with Deep their bytes.
func verifyRanges(ctx context.Context, sink sinks.Sink, layout sinks.Layout, objs []object, rep *Report, want Expect, o VerifyOptions) error {
	size := want.SegmentSize
	lister := sink.(sinks.Lister) // Verify checked
	root := layout.RangePrefix("")
	bySeg := map[pipeline.Segment][]rangeObject{}
	err := lister.List(ctx, root, func(ob sinks.Object) error {
		rep.RangeObjects++
		rest := strings.TrimPrefix(ob.Key, root)
		name, leaf, _ := strings.Cut(rest, "/")
		seg, err := pipeline.ParseSegmentName(name, size)
		leaf, codec := compress.SplitExt(leaf)
		from, to, ok := pipeline.ParseRangeSuffix(leaf)
		if err != nil || !ok || to > uint64(size) {
			rep.Problems = append(rep.Problems, Problem{ob.Key, "not a range key (<segment>/<from>-<to><ext>, inside the segment)"})
			return nil
		}
		bySeg[seg] = append(bySeg[seg], rangeObject{Key: ob.Key, Codec: codec, From: from, To: to, Size: ob.Size})
		return nil
	})
	if err != nil {
		return fmt.Errorf("list ranges under %s: %w", root, err)
	}
	archived := map[pipeline.Segment]bool{}
	for _, ob := range objs {
		if ob.kind == pipeline.KindSegment || ob.kind == pipeline.KindPartial {
			archived[ob.seg] = true
		}
	}
	tlIndex := map[uint32]int{}
	for i, tl := range rep.Timelines {
		tlIndex[tl.Timeline] = i
	}
	var segs []pipeline.Segment
	for seg := range bySeg {
		segs = append(segs, seg)
	}
	sort.Slice(segs, func(i, j int) bool {
		return segs[i].Timeline < segs[j].Timeline || segs[i].Timeline == segs[j].Timeline && segs[i].No < segs[j].No
	})
	var check []rangeCheck
	for _, seg := range segs {
		ranges := bySeg[seg]
		if archived[seg] {
			rep.LeftoverRanges += len(ranges)
			continue
		}
		i, ok := tlIndex[seg.Timeline]
		if !ok {
			rep.Timelines = append(rep.Timelines, Timeline{Timeline: seg.Timeline})
			i = len(rep.Timelines) - 1
			tlIndex[seg.Timeline] = i
		}
		tl := &rep.Timelines[i]
		var after pipeline.Segment // the segment after the timeline's last whole one
		if tl.Last != "" {
			last, _ := pipeline.ParseSegmentName(tl.Last, size)
			after = last.Next()
		}
		switch {
		case tl.Last != "" && seg.No < after.No:
			// Inside a gap, which is reported as one: ranges are only
			// served at the archive's end.
			continue
		case tl.RangeEnd != nil:
			rep.Problems = append(rep.Problems, Problem{layout.RangePrefix(seg.Name(size)),
				fmt.Sprintf("ranges of %s, after the ranges of %s where the timeline's archive ends", seg.Name(size), tl.RangeEnd.Segment)})
			continue
		case tl.Last != "" && seg.No > after.No:
			rep.Problems = append(rep.Problems, Problem{layout.RangePrefix(seg.Name(size)),
				fmt.Sprintf("ranges of %s, but %s before it is not archived", seg.Name(size), after.Name(size))})
			continue
		}
		sort.Slice(ranges, func(i, j int) bool {
			return ranges[i].From < ranges[j].From || ranges[i].From == ranges[j].From && ranges[i].To > ranges[j].To
		})
		_, end := cover(ranges, 0)
		if end == 0 {
			rep.Problems = append(rep.Problems, Problem{layout.RangePrefix(seg.Name(size)),
				fmt.Sprintf("ranges of %s do not start at offset 0: fetch --allow-partial cannot serve them", seg.Name(size))})
			continue
		}
		tl.RangeEnd = &RangeEnd{Segment: seg.Name(size), End: seg.StartLSN(size) + pipeline.LSN(end), Objects: len(ranges)}
		for _, r := range ranges {
			check = append(check, rangeCheck{seg, r})
		}
	}
	sort.Slice(rep.Timelines, func(i, j int) bool { return rep.Timelines[i].Timeline < rep.Timelines[j].Timeline })
	if o.Metadata || o.Deep {
		rep.Problems = append(rep.Problems, checkRanges(ctx, sink, layout, check, want, o, &rep.Checked)...)
	}
	return nil
}

type rangeCheck struct {
	seg pipeline.Segment
	r   rangeObject
}

// checkRanges checks each range's metadata against its key and the
// archive's identity, and with Deep downloads it and checks its SHA-256.
func checkRanges(ctx context.Context, sink sinks.Sink, layout sinks.Layout, check []rangeCheck, want Expect, o VerifyOptions, checked *int) []Problem {
	size := want.SegmentSize
	f := &Fetcher{Sink: sink, Layout: layout, Identities: o.Identities, identity: &sinks.Identity{SystemID: want.SystemID, SegmentSize: uint64(size)}}
	var mu sync.Mutex
	var probs []Problem
	var wg sync.WaitGroup
	sem := make(chan struct{}, max(o.Parallel, 1))
	add := func(key, format string, args ...any) {
		mu.Lock()
		probs = append(probs, Problem{key, fmt.Sprintf(format, args...)})
		mu.Unlock()
	}
	for _, c := range check {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			r, start := c.r, c.seg.StartLSN(size)
			meta, err := sink.Head(ctx, r.Key)
			if err != nil {
				add(r.Key, "cannot read metadata: %v", err)
				return
			}
			switch {
			case meta.SHA256 == "":
				add(r.Key, "no walship-sha256 metadata")
				return
			case meta.StartLSN != (start+pipeline.LSN(r.From)).String() || meta.EndLSN != (start+pipeline.LSN(r.To)).String():
				add(r.Key, "metadata LSNs %s-%s, the key says %s-%s", meta.StartLSN, meta.EndLSN, start+pipeline.LSN(r.From), start+pipeline.LSN(r.To))
			case meta.Timeline != c.seg.Timeline:
				add(r.Key, "metadata timeline %d, the segment's is %d", meta.Timeline, c.seg.Timeline)
			case meta.RawSize != int64(r.To-r.From):
				add(r.Key, "metadata walship-raw-size %d, the key says %d", meta.RawSize, r.To-r.From)
			case meta.Codec != "" && meta.Codec != string(r.Codec):
				add(r.Key, "metadata codec %s, extension says %s", meta.Codec, r.Codec)
			case meta.Encryption != "" && meta.Encryption != crypt.Scheme:
				add(r.Key, "metadata walship-encryption %q: not a scheme this walship knows", meta.Encryption)
			case want.SystemID != "" && meta.SystemID != want.SystemID:
				add(r.Key, "metadata system id %q, the archive's identity says %s", meta.SystemID, want.SystemID)
			}
			if !o.Deep {
				return
			}
			if _, err := f.downloadRange(ctx, c.seg, size, r, want); err != nil {
				add(r.Key, "%v", err)
				return
			}
			mu.Lock()
			*checked++
			mu.Unlock()
		}()
	}
	wg.Wait()
	return probs
}
