package pipeline

import "testing"

// Every range of a good segment passes, wherever it starts and ends: at a
// page boundary, inside a page, inside a header.
func TestCheckRangePagesGood(t *testing.T) {
	const size = SegmentSize(1 << 20)
	seg := Segment{Timeline: 2, No: 5}
	good := fakeSegment(seg, size, 42)
	for _, r := range [][2]uint64{
		{0, 100}, {0, walPageSize}, {0, 3*walPageSize + 17}, {100, 3*walPageSize + 10},
		{2 * walPageSize, 2*walPageSize + 5}, {2 * walPageSize, 2*walPageSize + 12},
		{walPageSize - 1, walPageSize + 1}, {uint64(size) - 10, uint64(size)}, {0, uint64(size)},
	} {
		if err := CheckRangePages(good[r[0]:r[1]], seg, size, r[0]); err != nil {
			t.Errorf("range [%d, %d) of a good segment: %v", r[0], r[1], err)
		}
	}
	// The previous timeline's pages are fine, as in a whole segment.
	b := append([]byte(nil), good...)
	b[walPageSize+4] = 1
	if err := CheckRangePages(b[:2*walPageSize], seg, size, 0); err != nil {
		t.Errorf("older timeline page rejected: %v", err)
	}
	// Zero pages after a WAL switch, to the range's end.
	clear(b[4*walPageSize:])
	if err := CheckRangePages(b[3*walPageSize+8:6*walPageSize+3], seg, size, 3*walPageSize+8); err != nil {
		t.Errorf("zero pages after a switch rejected: %v", err)
	}
}

func TestCheckRangePagesCorrupt(t *testing.T) {
	const size = SegmentSize(1 << 20)
	seg := Segment{Timeline: 2, No: 5}
	good := fakeSegment(seg, size, 42)
	p := uint64(walPageSize)
	cases := []struct {
		name     string
		from, to uint64
		mutate   func([]byte)
		seg      Segment
	}{
		{"magic", p + 1, 4 * p, func(b []byte) { b[3*p] = 0x55 }, seg},
		{"other known magic", 0, 4 * p, func(b []byte) { b[2*p] = 0x13; b[2*p+1] = 0xD1 }, seg},
		{"address", p, 8 * p, func(b []byte) { b[7*p+9]++ }, seg},
		{"timeline", 0, 3 * p, func(b []byte) { b[2*p+4] = 3 }, seg},
		{"no long header", 0, 100, func(b []byte) { b[2] = 0 }, seg},
		{"segment size", 0, 100, func(b []byte) { b[33]++ }, seg},
		{"wrong segment", p, 3 * p, nil, Segment{Timeline: 2, No: 6}},
		{"later timeline's segment name", p, 3 * p, func(b []byte) {}, Segment{Timeline: 1, No: 5}},
		{"cut header, bad magic", 2 * p, 2*p + 2, func(b []byte) { b[2*p]++ }, seg},
		{"cut header, bad address", 2 * p, 2*p + 16, func(b []byte) { b[2*p+15]++ }, seg},
		{"zero then data", 3 * p, 6 * p, func(b []byte) { clear(b[4*p : 5*p]) }, seg},
		{"zero page at the start", 0, p, func(b []byte) { clear(b[:p]) }, seg},
	}
	for _, c := range cases {
		b := append([]byte(nil), good...)
		if c.mutate != nil {
			c.mutate(b)
		}
		if err := CheckRangePages(b[c.from:c.to], c.seg, size, c.from); err == nil {
			t.Errorf("%s: corrupt range [%d, %d) accepted", c.name, c.from, c.to)
		}
		// A whole segment with the same damage fails too: one check.
		if c.from == 0 || c.mutate == nil {
			if err := CheckSegmentPages(b, c.seg, size); err == nil {
				t.Errorf("%s: corrupt segment accepted", c.name)
			}
		}
	}
	// Damage outside the range's page headers is the SHA-256's business.
	b := append([]byte(nil), good...)
	b[5*p] = 0x55
	b[p+100] = 0x55
	if err := CheckRangePages(b[p+50:5*p], seg, size, p+50); err != nil {
		t.Errorf("damage outside the range's headers: %v", err)
	}
	for _, r := range [][2]uint64{{0, 0}, {uint64(size), uint64(size) + 1}, {uint64(size) - 1, uint64(size) + 1}} {
		data := make([]byte, r[1]-r[0])
		if err := CheckRangePages(data, seg, size, r[0]); err == nil {
			t.Errorf("range [%d, %d) outside a %d-byte segment accepted", r[0], r[1], size)
		}
	}
}

func FuzzCheckRangePages(f *testing.F) {
	const size = SegmentSize(1 << 20)
	seg := Segment{Timeline: 1}
	good := fakeSegment(seg, size, 7)
	f.Add(good[:3*walPageSize+5], uint32(0), uint32(3*walPageSize+5))
	f.Add(good[walPageSize-3:walPageSize+20], uint32(walPageSize-3), uint32(23))
	f.Add([]byte{0x10, 0xD1, 2, 0}, uint32(0), uint32(1))
	f.Fuzz(func(t *testing.T, data []byte, from, n uint32) {
		_ = CheckRangePages(data, seg, size, uint64(from)) // never panics
		// Any range cut from a good segment passes.
		lo := uint64(from) % uint64(size)
		hi := lo + 1 + uint64(n)%(uint64(size)-lo)
		if err := CheckRangePages(good[lo:hi], seg, size, lo); err != nil {
			t.Fatalf("range [%d, %d) of a good segment: %v", lo, hi, err)
		}
	})
}
