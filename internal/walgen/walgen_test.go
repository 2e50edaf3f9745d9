package walgen

import (
	"bytes"
	"testing"

	"github.com/walship/walship/pipeline"
)

const mb = pipeline.SegmentSize(1 << 20)

func TestSegmentsPassThePageCheck(t *testing.T) {
	h := History{{1, 0}, {2, 5<<20 + 12345}}
	// A whole segment on each timeline, the switch segment on both sides.
	for _, c := range []struct {
		seg pipeline.Segment
		end pipeline.LSN
	}{
		{pipeline.Segment{Timeline: 1, No: 3}, 1 << 40},
		{pipeline.Segment{Timeline: 1, No: 5}, 5<<20 + 12345}, // the old timeline's partial
		{pipeline.Segment{Timeline: 2, No: 5}, 1 << 40},
		{pipeline.Segment{Timeline: 2, No: 6}, 6<<20 + 100000}, // the server is in the middle of it
	} {
		data := Segment(c.seg, c.end, h, 42, mb)
		if err := pipeline.CheckSegmentPages(data, c.seg, mb); err != nil {
			t.Errorf("%s: %v", c.seg.Name(mb), err)
		}
		if id, ok := pipeline.SegmentSystemID(data); !ok || id != 42 {
			t.Errorf("%s: system id %d %v", c.seg.Name(mb), id, ok)
		}
	}
	// Timeline 2's copy of segment 5 is timeline 1's up to the switch, and
	// differs after it.
	a := Segment(pipeline.Segment{Timeline: 1, No: 5}, 1<<40, h, 42, mb)
	b := Segment(pipeline.Segment{Timeline: 2, No: 5}, 1<<40, h, 42, mb)
	if !bytes.Equal(a[:12345], b[:12345]) || bytes.Equal(a[12345:], b[12345:]) {
		t.Error("timeline 2 does not inherit timeline 1's WAL up to the switch, or does after it")
	}
	// Fill of any sub-range equals the same range of the whole segment.
	whole := Segment(pipeline.Segment{Timeline: 2, No: 6}, 6<<20+100000, h, 42, mb)
	part := make([]byte, 77777)
	Fill(part, 6<<20+5000, 2, 6<<20+100000, h, 42, mb)
	if !bytes.Equal(part, whole[5000:5000+77777]) {
		t.Error("Fill of a sub-range differs from the whole segment")
	}
}
