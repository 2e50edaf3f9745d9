package take

import (
	"context"
	"errors"
	"fmt"
	"os"
	"sort"
	"strings"

	"github.com/walship/walship/compress"
	"github.com/walship/walship/pipeline"
	"github.com/walship/walship/sinks"
)

// walCheck finds whether the bucket holds the WAL a backup needs, from
// its start to its end LSN, as restore would read it: whole segments, an
// ended timeline's .partial, or, for the segment the backup ended in,
// ranges (sub-segment uploads) reaching the end LSN. A whole segment
// counts only when its object carries this system's identifier: someone
// else's object at the key (the archivers' conflict) does not hold this
// server's WAL. It only reads.
type walCheck struct {
	sink      sinks.Sink
	layout    sinks.Layout
	sysID     string
	size      pipeline.SegmentSize
	timelines []uint32 // the end timeline first, then the start timeline
	start     pipeline.LSN
	end       pipeline.LSN
	next      uint64 // first segment number not yet found
}

func newWALCheck(sink sinks.Sink, layout sinks.Layout, sysID string, size pipeline.SegmentSize, startTLI, endTLI uint32, start, end pipeline.LSN) *walCheck {
	tls := []uint32{endTLI}
	if startTLI != endTLI {
		tls = append(tls, startTLI)
	}
	return &walCheck{sink: sink, layout: layout, sysID: sysID, size: size, timelines: tls, start: start, end: end,
		next: pipeline.SegmentOf(endTLI, start, size).No}
}

// missing returns the first WAL file the bucket still lacks, or "" when it
// holds everything. Segments found once are not looked up again.
func (c *walCheck) missing(ctx context.Context) (string, error) {
	last := pipeline.SegmentOf(c.timelines[0], c.end-1, c.size).No
	for ; c.next <= last; c.next++ {
		found := false
		var name string
		for _, tli := range c.timelines {
			name = pipeline.Segment{Timeline: tli, No: c.next}.Name(c.size)
			ok, err := c.whole(ctx, name)
			if err != nil {
				return "", err
			}
			if !ok && c.next == last {
				reach, err := c.rangesReach(ctx, name)
				if err != nil {
					return "", err
				}
				ok = reach >= uint64(c.size.Offset(c.end-1))+1
			}
			if ok {
				found = true
				break
			}
		}
		if !found {
			return pipeline.Segment{Timeline: c.timelines[0], No: c.next}.Name(c.size), nil
		}
	}
	return "", nil
}

// whole reports whether the segment, or its .partial, is in the bucket
// with any codec's extension.
func (c *walCheck) whole(ctx context.Context, name string) (bool, error) {
	for _, n := range []string{name, name + ".partial"} {
		for _, codec := range compress.Codecs() {
			meta, err := c.sink.Head(ctx, c.layout.Key(n, codec.Ext()))
			if err == nil && meta.SystemID == c.sysID {
				return true, nil
			}
			if err == nil {
				continue // not this server's WAL: the archivers report the conflict
			}
			if !errors.Is(err, os.ErrNotExist) {
				return false, err
			}
		}
	}
	return false, nil
}

// rangesReach is the end offset of the contiguous WAL that segment's
// ranges hold from its start (0: none, or the sink cannot list).
func (c *walCheck) rangesReach(ctx context.Context, segment string) (uint64, error) {
	lister, ok := c.sink.(sinks.Lister)
	if !ok {
		return 0, nil
	}
	prefix := c.layout.RangePrefix(segment)
	type span struct{ from, to uint64 }
	var spans []span
	err := lister.List(ctx, prefix, func(o sinks.Object) error {
		leaf, ok := strings.CutPrefix(o.Key, prefix)
		if !ok || len(leaf) < 17 || strings.Contains(leaf, "/") {
			return nil
		}
		if from, to, ok := pipeline.ParseRangeSuffix(leaf[:17]); ok {
			spans = append(spans, span{from, to})
		}
		return nil
	})
	if err != nil {
		return 0, fmt.Errorf("list ranges of %s: %w", segment, err)
	}
	sort.Slice(spans, func(i, j int) bool { return spans[i].from < spans[j].from })
	reach := uint64(0)
	for _, s := range spans {
		if s.from > reach {
			break
		}
		reach = max(reach, s.to)
	}
	return reach, nil
}
