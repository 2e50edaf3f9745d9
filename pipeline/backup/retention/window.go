package retention

import (
	"sort"
	"time"

	"github.com/walship/walship/pipeline"
	"github.com/walship/walship/pipeline/backup"
)

// Window is how far a complete backup can be recovered with the WAL the
// bucket holds: from its start, continuously, along the timelines that
// recovery_target_timeline = 'latest' would follow, to EndLSN.
type Window struct {
	EndLSN   pipeline.LSN `json:"end_lsn"`
	Timeline uint32       `json:"timeline"` // the timeline EndLSN is on
	// EndTime is when the newest WAL object of the window was stored: the
	// time recovery can reach, as closely as the bucket tells it.
	EndTime time.Time `json:"end_time"`
	// Gap: the bucket holds WAL past EndLSN that recovery cannot reach;
	// GapAt is the first missing segment.
	Gap   bool   `json:"gap"`
	GapAt string `json:"gap_at,omitempty"`
	// Broken: the WAL from the backup's start to its end is not all
	// there, so the backup cannot be restored at all.
	Broken bool `json:"broken,omitempty"`
}

// leg is a stretch of one timeline that recovery replays: until is where
// the timeline was left for the next (0: the last one, open-ended).
type leg struct {
	tli   uint32
	until pipeline.LSN
}

// legs is the path recovery takes from a backup's start: its timeline up
// to the switch point, the next, ... to the newest timeline whose history
// passes through the backup's start and leaves its end timeline at or
// after its end.
func (st *State) legs(c *backup.Catalog) []leg {
	best, bestK := c.Timeline, -1
	var bestH []pipeline.HistoryEntry
	for t, h := range st.histories {
		if t <= best {
			continue
		}
		k := -1
		for i, e := range h {
			if e.Parent == c.Timeline && e.Switch >= c.StartLSN {
				k = i
				break
			}
		}
		if k < 0 {
			continue
		}
		// A branch that leaves the end timeline before the backup's end
		// is not followed: replay would switch to it before reaching the
		// backup's end ("WAL ends before end of online backup"). A PITR
		// to a point inside a later backup makes such a branch.
		if t != c.EndTimeline {
			ok := false
			for _, e := range h[k:] {
				if e.Parent == c.EndTimeline && e.Switch >= c.EndLSN {
					ok = true
				}
			}
			if !ok {
				continue
			}
		}
		best, bestK, bestH = t, k, h
	}
	var out []leg
	if bestK >= 0 {
		for _, e := range bestH[bestK:] {
			out = append(out, leg{e.Parent, e.Switch})
		}
	}
	return append(out, leg{best, 0})
}

// Window computes a complete backup's recovery window.
func (st *State) Window(c *backup.Catalog) Window {
	size := st.SegSize
	w := Window{EndLSN: c.StartLSN, Timeline: c.Timeline, Broken: true}
	if size == 0 {
		return w
	}
	whole := map[pipeline.Segment]walObject{}
	partial := map[pipeline.Segment]walObject{}
	for _, o := range st.wal {
		if o.kind == pipeline.KindSegment {
			whole[o.seg] = o
		} else {
			partial[o.seg] = o
		}
	}
	legs := st.legs(c)
	cur := c.StartLSN
	var newest time.Time
	seen := func(t time.Time) {
		if t.After(newest) {
			newest = t
		}
	}
	finish := func(i int, seg pipeline.Segment) Window {
		w.EndLSN, w.Timeline, w.EndTime = cur, legs[i].tli, newest
		w.Broken = cur < c.EndLSN
		for _, o := range st.wal {
			for _, l := range legs[i:] {
				if o.seg.Timeline == l.tli && o.seg.No > seg.No {
					w.Gap, w.GapAt = true, seg.Name(size)
				}
			}
		}
		return w
	}
	for i, l := range legs {
		seg := pipeline.SegmentOf(l.tli, cur, size)
		for l.until == 0 || seg.StartLSN(size) < l.until {
			if o, ok := whole[seg]; ok {
				seen(o.Modified)
				cur = seg.EndLSN(size)
				seg = seg.Next()
				continue
			}
			if o, ok := partial[seg]; ok && l.until != 0 && seg == pipeline.SegmentOf(l.tli, l.until-1, size) {
				seen(o.Modified)
				cur = l.until
				break
			}
			if l.until == 0 {
				// The archive may end in ranges of the segment being written.
				if reach, t := st.rangeReach(seg); seg.StartLSN(size)+reach > cur {
					cur = seg.StartLSN(size) + reach
					seen(t)
				}
			}
			return finish(i, seg)
		}
		if l.until != 0 && cur > l.until {
			cur = l.until
		}
	}
	last := legs[len(legs)-1]
	return finish(len(legs)-1, pipeline.SegmentOf(last.tli, cur, size))
}

// rangeReach is how far the ranges of seg cover it contiguously from its
// start, and the newest of those ranges' store time.
func (st *State) rangeReach(seg pipeline.Segment) (pipeline.LSN, time.Time) {
	var rs []walObject
	for _, r := range st.ranges {
		if r.seg == seg {
			rs = append(rs, r)
		}
	}
	sort.Slice(rs, func(i, j int) bool { return rs[i].from < rs[j].from })
	var reach uint64
	var t time.Time
	for _, r := range rs {
		if r.from <= reach && r.to > reach {
			reach = r.to
			if r.Modified.After(t) {
				t = r.Modified
			}
		}
	}
	return pipeline.LSN(reach), t
}
