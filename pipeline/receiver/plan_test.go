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
	return spoolFile{kind: pipeline.KindSegment, name: s.Name(mb), seg: s, size: int64(mb), valid: true}
}

func damaged(tli uint32, no uint64) spoolFile {
	f := complete(tli, no)
	f.valid, f.size = false, 4096
	return f
}

func ended(tli uint32, no uint64, end pipeline.LSN) spoolFile {
	s := seg(tli, no)
	sp := &spool{size: mb}
	return spoolFile{kind: pipeline.KindPartial, name: sp.endedName(s, end), seg: s, end: end, size: int64(mb), valid: true}
}

func history(tli uint32) spoolFile {
	return spoolFile{kind: pipeline.KindHistory, name: pipeline.HistoryFileName(tli), tli: tli, valid: true}
}

func names(fs []spoolFile) []string {
	out := []string{}
	for _, f := range fs {
		out = append(out, f.name)
	}
	sort.Strings(out)
	return out
}

// Timeline 2 began at 0/700012C, inside segment 7.
var tl2 = []pipeline.HistoryEntry{{Parent: 1, Switch: 7<<20 + 300}}

func TestMakePlan(t *testing.T) {
	cases := []struct {
		name    string
		in      planInput
		tli     uint32
		start   pipeline.LSN
		pending []string
		remove  []string
		damaged []string
	}{
		{
			// Defect 1: a restart after a promotion. Everything of both
			// timelines stays pending; streaming continues on timeline 2.
			name: "after a promotion",
			in: planInput{slot: SlotState{Exists: true, RestartLSN: 5 << 20, Timeline: 1}, serverTLI: 2, serverPos: 9 << 20, serverHistory: tl2,
				spool: listing{
					complete:  []spoolFile{complete(1, 5), complete(1, 6), complete(2, 7)},
					ended:     []spoolFile{ended(1, 7, 7<<20+300)},
					histories: []spoolFile{history(2)},
				}},
			tli: 2, start: 8 << 20,
			pending: []string{"000000010000000000000005", "000000010000000000000006", "000000010000000000000007.partial.ended.000000000070012C", "000000020000000000000007", "00000002.history"},
		},
		{
			// The slot says nothing about what the bucket holds: files
			// behind it stay pending (the archivers find them in the
			// bucket, or archive them).
			name: "files behind the slot stay",
			in: planInput{slot: SlotState{Exists: true, RestartLSN: 6 << 20, Timeline: 1}, serverTLI: 3, serverPos: 9 << 20,
				serverHistory: []pipeline.HistoryEntry{{Parent: 1, Switch: 10 << 20}, {Parent: 2, Switch: 11 << 20}},
				spool: listing{complete: []spoolFile{complete(1, 4), complete(1, 5), complete(1, 6)},
					partials: []spoolFile{{name: "000000010000000000000007.partial", seg: seg(1, 7)}},
					other:    []string{".walship-tmp-x", "000000010000000000000009.sha256"}}},
			tli: 1, start: 7 << 20,
			pending: []string{"000000010000000000000004", "000000010000000000000005", "000000010000000000000006"},
			remove:  []string{".walship-tmp-x", "000000010000000000000007.partial", "000000010000000000000009.sha256"},
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
			// Defect 5: a damaged segment moves the start back to it and
			// stays until it is written again.
			name: "damaged segment",
			in: planInput{slot: SlotState{Exists: true, RestartLSN: 5 << 20, Timeline: 1}, serverTLI: 1, serverPos: 9 << 20,
				spool: listing{complete: []spoolFile{complete(1, 5), damaged(1, 6), complete(1, 7)}}},
			tli: 1, start: 6 << 20,
			pending: []string{"000000010000000000000005", "000000010000000000000007"},
			damaged: []string{"000000010000000000000006"},
		},
		{
			// A segment missing from the spool is never taken for
			// archived: the server sends it again.
			name: "segment missing from the spool",
			in: planInput{slot: SlotState{Exists: true, RestartLSN: 5 << 20, Timeline: 1}, serverTLI: 1, serverPos: 9 << 20,
				spool: listing{complete: []spoolFile{complete(1, 5), complete(1, 7)}}},
			tli: 1, start: 6 << 20,
			pending: []string{"000000010000000000000005", "000000010000000000000007"},
		},
		{
			name: "damaged segment the server no longer has",
			in: planInput{slot: SlotState{Exists: true, RestartLSN: 8 << 20, Timeline: 1}, serverTLI: 1, serverPos: 9 << 20,
				spool: listing{complete: []spoolFile{damaged(1, 5)}}},
			tli: 1, start: 8 << 20,
			remove:  []string{"000000010000000000000005"},
			damaged: []string{"000000010000000000000005"},
		},
		{
			name: "ended segment behind the slot stays pending",
			in: planInput{slot: SlotState{Exists: true, RestartLSN: 8 << 20, Timeline: 2}, serverTLI: 2, serverPos: 9 << 20, serverHistory: tl2,
				spool: listing{ended: []spoolFile{ended(1, 7, 7<<20+300)}, histories: []spoolFile{history(2)}}},
			tli: 2, start: 8 << 20,
			pending: []string{"000000010000000000000007.partial.ended.000000000070012C", "00000002.history"},
		},
		{
			// PostgreSQL 12-14 do not say the slot's timeline; the
			// server's history does: the slot is on timeline 1, before the
			// switch, so streaming starts there and the server ends timeline
			// 1 at the switch, which walship follows.
			name: "slot timeline unknown",
			in:   planInput{slot: SlotState{Exists: true, RestartLSN: 5<<20 + 40}, serverTLI: 2, serverPos: 9 << 20, serverHistory: tl2},
			tli:  1, start: 5 << 20,
		},
		{
			name: "damaged ended segment is written again",
			in: planInput{slot: SlotState{Exists: true, RestartLSN: 6 << 20, Timeline: 1}, serverTLI: 2, serverPos: 9 << 20, serverHistory: tl2,
				spool: listing{complete: []spoolFile{complete(1, 6), complete(2, 7)},
					ended: []spoolFile{func() spoolFile { f := ended(1, 7, 7<<20+300); f.valid = false; return f }()}}},
			tli: 1, start: 7 << 20,
			pending: []string{"000000010000000000000006", "000000020000000000000007"},
			damaged: []string{"000000010000000000000007.partial.ended.000000000070012C"},
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
			if got := names(p.damaged); !reflect.DeepEqual(got, sorted(c.damaged)) {
				t.Errorf("damaged %v, want %v", got, sorted(c.damaged))
			}
		})
	}
}

func sorted(s []string) []string {
	out := append([]string{}, s...)
	sort.Strings(out)
	return out
}
