package e2e

import (
	"os"
	"path/filepath"
	"strings"

	"github.com/walship/walship/pipeline"
)

// rangeObj is one range object in the bucket: bytes [from, to) of its
// segment (offsets), stored in size bytes.
type rangeObj struct {
	from, to uint64
	size     int64
}

// rangesOnDisk lists the range objects in the bucket (the S3 gateway's
// directory, so it works while S3 is cut off), by segment. Read it before
// the whole segments: an archiver deletes a segment's ranges only after
// the segment is archived whole, so that order never misses both.
func rangesOnDisk(st *stack) (map[pipeline.Segment][]rangeObj, error) {
	dir := filepath.Join(st.s3.Root, st.s3.Bucket, st.prefix, st.server, "walship-partial")
	out := map[pipeline.Segment][]rangeObj{}
	err := filepath.WalkDir(dir, func(p string, d os.DirEntry, err error) error {
		if err != nil {
			if os.IsNotExist(err) {
				return nil
			}
			return err
		}
		if d.IsDir() {
			return nil
		}
		seg, err := pipeline.ParseSegmentName(filepath.Base(filepath.Dir(p)), segSize)
		if err != nil {
			return nil
		}
		leaf := d.Name()
		if i := strings.IndexByte(leaf, '.'); i >= 0 {
			leaf = leaf[:i]
		}
		from, to, ok := pipeline.ParseRangeSuffix(leaf)
		if !ok {
			return nil
		}
		info, err := d.Info()
		if err != nil {
			if os.IsNotExist(err) {
				return nil
			}
			return err
		}
		out[seg] = append(out[seg], rangeObj{from: from, to: to, size: info.Size()})
		return nil
	})
	return out, err
}

// reachOf is how far from its start the ranges cover a segment,
// contiguously (0: not at all).
func reachOf(rs []rangeObj) uint64 {
	var end uint64
	for moved := true; moved; {
		moved = false
		for _, r := range rs {
			if r.from <= end && r.to > end {
				end, moved = r.to, true
			}
		}
	}
	return end
}

// extendByRanges moves end, the end of the whole segments the bucket holds
// contiguously (a segment boundary), over the ranges of the segment that
// starts there: the owner timeline's, and those (or the .partial, ended)
// of a timeline that ended inside it, up to where it ended (its WAL before
// that is the line's; fetch fills a new timeline's file with it).
func extendByRanges(end pipeline.LSN, ranges map[pipeline.Segment][]rangeObj, ended map[pipeline.Segment]bool, switches []pipeline.LSN) pipeline.LSN {
	if segSize.Offset(end) != 0 {
		return end
	}
	n := uint64(end) / uint64(segSize)
	best := end
	owner := timelineOf(n, switches)
	for tli := uint32(1); tli <= owner; tli++ {
		seg := pipeline.Segment{Timeline: tli, No: n}
		reach := end + pipeline.LSN(reachOf(ranges[seg]))
		if tli < owner {
			at := switches[tli-1] // where timeline tli ended
			if uint64(at)/uint64(segSize) != n {
				continue
			}
			if ended[seg] {
				reach = at
			}
			reach = min(reach, at)
		}
		best = max(best, reach)
	}
	return best
}
