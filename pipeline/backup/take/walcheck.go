package take

import (
	"context"
	"errors"
	"fmt"
	"os"

	"github.com/walship/walship/compress"
	"github.com/walship/walship/pipeline"
	"github.com/walship/walship/pipeline/restore"
	"github.com/walship/walship/sinks"
)

// walCheck finds whether the bucket holds the WAL a backup needs, from
// its start to its end LSN, as recovery would read it. Each segment is
// looked for on the timeline that owns it on the path from the backup's
// start timeline to its end timeline (PostgreSQL reads a segment from the
// newest timeline that began at or before it): whole, or — for the
// segment the backup ended in, on its end timeline — as that timeline's
// .partial (it ended later inside the segment) or ranges (sub-segment
// uploads) reaching the end LSN; and the history file of every timeline
// after the first (recovery follows the switch by it). An old timeline's
// .partial never stands
// for a segment its child owns: it stops at the switch. A whole segment
// counts only when its object carries this system's identifier: someone
// else's object at the key (the archivers' conflict) does not hold this
// server's WAL. It only reads.
type walCheck struct {
	sink   sinks.Sink
	layout sinks.Layout
	sysID  string
	size   pipeline.SegmentSize
	legs   []leg // oldest first; the last is the end timeline
	start  pipeline.LSN
	end    pipeline.LSN
	next   uint64 // first segment number not yet found
}

// leg is a timeline on the backup's path and where it began.
type leg struct {
	tli   uint32
	begin pipeline.LSN
}

// timelinePath is the backup's path from startTLI to endTLI, read from
// endTLI's history (its ancestors and their switch points, oldest first;
// unused when the two are equal).
func timelinePath(startTLI, endTLI uint32, hist []pipeline.HistoryEntry) ([]leg, error) {
	if startTLI == endTLI {
		return []leg{{tli: endTLI}}, nil
	}
	var all []leg
	begin := pipeline.LSN(0)
	for _, e := range hist {
		all = append(all, leg{tli: e.Parent, begin: begin})
		begin = e.Switch
	}
	all = append(all, leg{tli: endTLI, begin: begin})
	for i, l := range all {
		if l.tli == startTLI {
			return all[i:], nil
		}
	}
	return nil, fmt.Errorf("the backup began on timeline %d, which timeline %d's history does not descend from", startTLI, endTLI)
}

func newWALCheck(sink sinks.Sink, layout sinks.Layout, sysID string, size pipeline.SegmentSize, path []leg, start, end pipeline.LSN) *walCheck {
	return &walCheck{sink: sink, layout: layout, sysID: sysID, size: size, legs: path, start: start, end: end,
		next: pipeline.SegmentOf(path[0].tli, start, size).No}
}

// owner is the timeline recovery reads segment n from.
func (c *walCheck) owner(n uint64) uint32 {
	for i := len(c.legs) - 1; i > 0; i-- {
		if pipeline.SegmentOf(c.legs[i].tli, c.legs[i].begin, c.size).No <= n {
			return c.legs[i].tli
		}
	}
	return c.legs[0].tli
}

// missing returns the first WAL file the bucket still lacks, or "" when it
// holds everything. Segments found once are not looked up again.
func (c *walCheck) missing(ctx context.Context) (string, error) {
	endTLI := c.legs[len(c.legs)-1].tli
	last := pipeline.SegmentOf(endTLI, c.end-1, c.size).No
	for ; c.next <= last; c.next++ {
		tli := c.owner(c.next)
		name := pipeline.Segment{Timeline: tli, No: c.next}.Name(c.size)
		ok, err := c.whole(ctx, name, false)
		if err != nil {
			return "", err
		}
		if !ok && c.next == last && tli == endTLI {
			if ok, err = c.whole(ctx, name, true); err != nil {
				return "", err
			}
			if !ok {
				reach, err := restore.RangesReach(ctx, c.sink, c.layout, name, c.size)
				if err != nil {
					return "", err
				}
				ok = reach >= uint64(c.size.Offset(c.end-1))+1
			}
		}
		if !ok {
			return name, nil
		}
	}
	// Recovery learns where each timeline after the first began from its
	// history file: without it, it stays on the old timeline, which ends
	// before the backup does.
	for _, l := range c.legs[1:] {
		name := pipeline.HistoryFileName(l.tli)
		ok, err := c.whole(ctx, name, false)
		if err != nil {
			return "", err
		}
		if !ok {
			return name, nil
		}
	}
	return "", nil
}

// whole reports whether the segment (or, with partial, its .partial) is
// in the bucket with any codec's extension and this system's identifier.
func (c *walCheck) whole(ctx context.Context, name string, partial bool) (bool, error) {
	if partial {
		name += ".partial"
	}
	for _, codec := range compress.Codecs() {
		meta, err := c.sink.Head(ctx, c.layout.Key(name, codec.Ext()))
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
	return false, nil
}
