package receiver

import (
	"reflect"
	"sort"
	"testing"

	"github.com/walship/walship/pipeline"
)

func seg(tli uint32, no uint64) pipeline.Segment { return pipeline.Segment{Timeline: tli, No: no} }

func complete(tli uint32, no uint64) spoolFile {
	s := seg(tli, no)
	return spoolFile{kind: pipeline.KindSegment, name: s.Name(mb), seg: s, size: int64(mb)}
}

func ended(tli uint32, no uint64, end pipeline.LSN) spoolFile {
	s := seg(tli, no)
	sp := &spool{size: mb}
	return spoolFile{kind: pipeline.KindPartial, name: sp.endedName(s, end), seg: s, end: end, size: int64(mb)}
}

func history(tli uint32) spoolFile {
	return spoolFile{kind: pipeline.KindHistory, name: pipeline.HistoryFileName(tli), tli: tli}
}

func names(fs []spoolFile) []string {
	out := []string{}
	for _, f := range fs {
		out = append(out, f.name)
	}
	sort.Strings(out)
	return out
}

func TestMakePlan(t *testing.T) {
	cases := []struct {
		name    string
		in      planInput
		tli     uint32
		start   pipeline.LSN
		pending []string
		remove  []string
		invalid []string
	}{
		{
			// Defect 1: a restart after a promotion. Everything of both
			// timelines stays pending; streaming continues on timeline 2.
			name: "after a promotion",
			in: planInput{slot: SlotState{Exists: true, RestartLSN: 5 << 20, Timeline: 1}, serverTLI: 2, serverPos: 9 << 20,
				spool: listing{
					complete:  []spoolFile{complete(1, 5), complete(1, 6), complete(2, 7)},
					ended:     []spoolFile{ended(1, 7, 7<<20+300)},
					histories: []spoolFile{history(2)},
				}},
			tli: 2, start: 8 << 20,
			pending: []string{"000000010000000000000005", "000000010000000000000006", "000000010000000000000007.partial.ended.0000000000700" + "12C", "000000020000000000000007", "00000002.history"},
		},
		{
			name: "archived segments go, the slot's timeline leads",
			in: planInput{slot: SlotState{Exists: true, RestartLSN: 6 << 20, Timeline: 1}, serverTLI: 3, serverPos: 9 << 20,
				spool: listing{complete: []spoolFile{complete(1, 4), complete(1, 5), complete(1, 6)},
					partials: []spoolFile{{name: "000000010000000000000007.partial", seg: seg(1, 7)}},
					other:    []string{".walship-tmp-x"}}},
			tli: 1, start: 7 << 20,
			pending: []string{"000000010000000000000006"},
			remove:  []string{".walship-tmp-x", "000000010000000000000004", "000000010000000000000005", "000000010000000000000007.partial"},
		},
		{
			// Defect 10: no known restart position removes nothing.
			name: "unknown restart position",
			in: planInput{slot: SlotState{Exists: true}, serverTLI: 1, serverPos: 9 << 20,
				spool: listing{complete: []spoolFile{complete(1, 4), complete(1, 5)}}},
			tli: 1, start: 6 << 20,
			pending: []string{"000000010000000000000004", "000000010000000000000005"},
		},
		{
			// Defect 5: a wrong-size segment moves the start back to it
			// and stays until it is written again.
			name: "wrong-size segment",
			in: planInput{slot: SlotState{Exists: true, RestartLSN: 5 << 20, Timeline: 1}, serverTLI: 1, serverPos: 9 << 20,
				spool: listing{complete: []spoolFile{complete(1, 5), {kind: pipeline.KindSegment, name: "000000010000000000000006", seg: seg(1, 6), size: 4096}, complete(1, 7)}}},
			tli: 1, start: 6 << 20,
			pending: []string{"000000010000000000000005", "000000010000000000000007"},
			invalid: []string{"000000010000000000000006"},
		},
		{
			name: "an ended segment the slot passed is archived",
			in: planInput{slot: SlotState{Exists: true, RestartLSN: 8 << 20, Timeline: 2}, serverTLI: 2, serverPos: 9 << 20,
				spool: listing{ended: []spoolFile{ended(1, 7, 7<<20+300)}, histories: []spoolFile{history(2)}}},
			tli: 2, start: 8 << 20,
			pending: []string{"00000002.history"},
			remove:  []string{"000000010000000000000007.partial.ended.000000000070012C"},
		},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			c.in.size = mb
			p := makePlan(c.in)
			if p.tli != c.tli || p.start != c.start {
				t.Errorf("start %d/%s, want %d/%s", p.tli, p.start, c.tli, c.start)
			}
			if p.floor != c.in.slot.RestartLSN {
				t.Errorf("floor %s, want the slot's %s", p.floor, c.in.slot.RestartLSN)
			}
			if got := names(p.pending); !reflect.DeepEqual(got, sorted(c.pending)) {
				t.Errorf("pending %v, want %v", got, sorted(c.pending))
			}
			rm := append([]string{}, p.remove...)
			sort.Strings(rm)
			if !reflect.DeepEqual(rm, sorted(c.remove)) {
				t.Errorf("remove %v, want %v", rm, sorted(c.remove))
			}
			if got := names(p.invalid); !reflect.DeepEqual(got, sorted(c.invalid)) {
				t.Errorf("invalid %v, want %v", got, sorted(c.invalid))
			}
		})
	}
}

func sorted(s []string) []string {
	out := append([]string{}, s...)
	sort.Strings(out)
	return out
}
