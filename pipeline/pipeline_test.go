package pipeline

import (
	"encoding/binary"
	"encoding/json"
	"errors"
	"strings"
	"testing"
)

func TestSegmentNames(t *testing.T) {
	const mb16, mb1 = SegmentSize(16 << 20), SegmentSize(1 << 20)
	cases := []struct {
		lsn  LSN
		tli  uint32
		size SegmentSize
		name string
	}{
		{0x0, 1, mb16, "000000010000000000000000"},
		{0x1FFFFFF, 1, mb16, "000000010000000000000001"},
		{0x16B374D848, 1, mb16, "0000000100000016000000B3"},
		{0x1_FF00_0000, 2, mb16, "0000000200000001000000FF"},
		{0x1_FFF0_0000, 3, mb1, "000000030000000100000FFF"},
		{0x2_0000_0000, 1, mb1, "000000010000000200000000"},
		{0x4000_0000, 1, 1 << 30, "000000010000000000000001"},
	}
	for _, c := range cases {
		seg := SegmentOf(c.tli, c.lsn, c.size)
		if got := seg.Name(c.size); got != c.name {
			t.Errorf("SegmentOf(%d, %s, %d).Name() = %s, want %s", c.tli, c.lsn, c.size, got, c.name)
		}
		back, err := ParseSegmentName(c.name, c.size)
		if err != nil || back != seg {
			t.Errorf("ParseSegmentName(%s) = %+v, %v; want %+v", c.name, back, err, seg)
		}
		if s := seg.StartLSN(c.size); s > c.lsn || c.lsn >= seg.EndLSN(c.size) || s != c.size.Start(c.lsn) {
			t.Errorf("%s not in [%s, %s)", c.lsn, s, seg.EndLSN(c.size))
		}
	}
	for _, bad := range []string{"", "00000001000000000000000", "0000000100000000000000G0", "000000000000000000000001", "000000010000000000000100"} {
		if _, err := ParseSegmentName(bad, mb16); err == nil {
			t.Errorf("ParseSegmentName(%q) accepted", bad)
		}
	}
}

func TestLSN(t *testing.T) {
	for _, s := range []string{"0/0", "16/B374D848", "FFFFFFFF/FFFFFFFF"} {
		l, err := ParseLSN(s)
		if err != nil || l.String() != s {
			t.Errorf("ParseLSN(%q) = %s, %v", s, l, err)
		}
	}
	for _, s := range []string{"", "16", "x/1", "1/100000000"} {
		if _, err := ParseLSN(s); err == nil {
			t.Errorf("ParseLSN(%q) accepted", s)
		}
	}
	if err := SegmentSize(3 << 20).Validate(); err == nil {
		t.Error("3MB segment size accepted")
	}
}

func TestWatermark(t *testing.T) {
	const size = SegmentSize(1 << 20)
	seg := func(no uint64) Segment { return Segment{Timeline: 1, No: no} }
	cases := []struct {
		name    string
		confirm []Segment
		flush   LSN
		pending int
	}{
		{"none", nil, 10 << 20, 0},
		{"in order", []Segment{seg(10), seg(11), seg(12)}, 13 << 20, 0},
		{"gap holds", []Segment{seg(11), seg(12)}, 10 << 20, 2},
		{"gap closes", []Segment{seg(12), seg(11), seg(10)}, 13 << 20, 0},
		{"duplicates", []Segment{seg(10), seg(10), seg(11), seg(10)}, 12 << 20, 0},
		{"before start ignored", []Segment{seg(9), seg(3)}, 10 << 20, 0},
		{"other timeline ignored", []Segment{{Timeline: 2, No: 10}}, 10 << 20, 0},
	}
	for _, c := range cases {
		w := NewWatermark(seg(10), size)
		for _, s := range c.confirm {
			w.Confirm(s)
		}
		if w.Flush() != c.flush || w.Pending() != c.pending {
			t.Errorf("%s: flush %s pending %d, want %s %d", c.name, w.Flush(), w.Pending(), c.flush, c.pending)
		}
	}
}

func validEvent() SegmentEvent {
	return SegmentEvent{
		V: 1, Server: "main", SystemID: "7312345678901234567", Timeline: 1,
		File: "000000010000000000000003", Kind: KindSegment,
		StartLSN: 3 << 20, EndLSN: 4 << 20, Size: 1 << 20, SegSize: 1 << 20,
		SHA256: strings.Repeat("ab", 32), Object: "x",
	}
}

func TestEventRoundTrip(t *testing.T) {
	e := validEvent()
	b, err := json.Marshal(&e)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(b), `"start_lsn":"0/300000"`) {
		t.Errorf("lsn not in postgres notation: %s", b)
	}
	got, err := DecodeSegmentEvent(b)
	if err != nil || got != e {
		t.Fatalf("round trip: %+v, %v", got, err)
	}
	if e.MsgID() != "7312345678901234567/000000010000000000000003/segment" {
		t.Errorf("msg id %s", e.MsgID())
	}
	for name, mutate := range map[string]func(*SegmentEvent){
		"version":  func(e *SegmentEvent) { e.V = 2 },
		"server":   func(e *SegmentEvent) { e.Server = "a.b" },
		"sysid":    func(e *SegmentEvent) { e.SystemID = "x" },
		"sha":      func(e *SegmentEvent) { e.SHA256 = "00" },
		"name/lsn": func(e *SegmentEvent) { e.StartLSN = 4 << 20 },
		"timeline": func(e *SegmentEvent) { e.Timeline = 2 },
		"size":     func(e *SegmentEvent) { e.Size = 100 },
		"kind":     func(e *SegmentEvent) { e.Kind = "x" },
		"segsize":  func(e *SegmentEvent) { e.SegSize = 3 },
		"history":  func(e *SegmentEvent) { e.Kind = KindHistory },
	} {
		e := validEvent()
		mutate(&e)
		b, _ := json.Marshal(&e)
		if _, err := DecodeSegmentEvent(b); !errors.Is(err, ErrMalformed) {
			t.Errorf("%s: want ErrMalformed, got %v", name, err)
		}
	}
}

func FuzzDecodeSegmentEvent(f *testing.F) {
	e := validEvent()
	b, _ := json.Marshal(&e)
	f.Add(b)
	f.Add([]byte(`{"v":1}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		ev, err := DecodeSegmentEvent(data)
		if err == nil {
			if verr := ev.Validate(); verr != nil {
				t.Fatalf("decoded event fails validation: %v", verr)
			}
		}
	})
}

// fakeSegment builds a segment whose page headers are what PostgreSQL writes.
func fakeSegment(seg Segment, size SegmentSize, sysid uint64) []byte {
	data := make([]byte, size)
	for off := 0; off < len(data); off += walPageSize {
		p := data[off:]
		binary.LittleEndian.PutUint16(p[0:], 0xD110)
		binary.LittleEndian.PutUint32(p[4:], seg.Timeline)
		binary.LittleEndian.PutUint64(p[8:], uint64(seg.StartLSN(size))+uint64(off))
		if off == 0 {
			binary.LittleEndian.PutUint16(p[2:], xlpLongHeader)
			binary.LittleEndian.PutUint64(p[24:], sysid)
			binary.LittleEndian.PutUint32(p[32:], uint32(size))
			binary.LittleEndian.PutUint32(p[36:], walPageSize)
		}
	}
	return data
}

func TestCheckSegmentPages(t *testing.T) {
	const size = SegmentSize(1 << 20)
	seg := Segment{Timeline: 2, No: 5}
	good := fakeSegment(seg, size, 42)
	if err := CheckSegmentPages(good, seg, size); err != nil {
		t.Fatalf("good segment: %v", err)
	}
	if id, ok := SegmentSystemID(good); !ok || id != 42 {
		t.Errorf("system id %d %v", id, ok)
	}
	cases := map[string]func([]byte){
		"magic":      func(b []byte) { b[walPageSize*3] = 0x55 },
		"address":    func(b []byte) { b[walPageSize*7+9]++ },
		"timeline":   func(b []byte) { b[walPageSize*2+4] = 3 },
		"short":      nil,
		"wrong name": nil,
		"seg size":   func(b []byte) { b[33]++ },
		"zero then data": func(b []byte) {
			clear(b[walPageSize*4 : walPageSize*5])
		},
	}
	for name, mutate := range cases {
		b := append([]byte(nil), good...)
		s := seg
		switch name {
		case "short":
			b = b[:len(b)-walPageSize]
		case "wrong name":
			s = Segment{Timeline: 2, No: 6}
		default:
			mutate(b)
		}
		if err := CheckSegmentPages(b, s, size); err == nil {
			t.Errorf("%s: corrupted segment accepted", name)
		}
	}
	// A page from the previous timeline is fine: a new timeline's first
	// segment starts with the old timeline's WAL.
	b := append([]byte(nil), good...)
	b[walPageSize+4] = 1
	if err := CheckSegmentPages(b, seg, size); err != nil {
		t.Errorf("older timeline page rejected: %v", err)
	}
}

func FuzzCheckSegmentPages(f *testing.F) {
	f.Add([]byte{0x10, 0xD1, 2, 0})
	f.Fuzz(func(t *testing.T, head []byte) {
		const size = SegmentSize(1 << 20)
		data := make([]byte, size)
		copy(data, head)
		_ = CheckSegmentPages(data, Segment{Timeline: 1}, size)
	})
}
