package pipeline

import (
	"strings"
	"testing"
)

func TestParseHistory(t *testing.T) {
	h, err := ParseHistory([]byte("1\t0/3000158\tno recovery target specified\n\n2\t0/5A00000\tat restore point \"x\"\n"))
	if err != nil {
		t.Fatal(err)
	}
	if len(h) != 2 || h[0] != (HistoryEntry{1, 0x3000158}) || h[1] != (HistoryEntry{2, 0x5A00000}) {
		t.Fatalf("parsed %+v", h)
	}
	if p, at, ok := SwitchPoint(h); !ok || p != 2 || at != 0x5A00000 {
		t.Errorf("SwitchPoint = %d %s %v", p, at, ok)
	}
	for _, bad := range []string{"1", "x\t0/1", "0\t0/1", "1\tzz", "2\t0/5\n1\t0/6", "1\t0/6\n2\t0/5"} {
		if _, err := ParseHistory([]byte(bad)); err == nil {
			t.Errorf("ParseHistory(%q) accepted", bad)
		}
	}
	if tli, ok := ParseHistoryFileName("0000000A.history"); !ok || tli != 10 {
		t.Errorf("ParseHistoryFileName: %d %v", tli, ok)
	}
	for _, bad := range []string{"00000000.history", "0000000a.history", "A.history", "0000000A.histor"} {
		if _, ok := ParseHistoryFileName(bad); ok {
			t.Errorf("ParseHistoryFileName(%q) accepted", bad)
		}
	}
}

func FuzzParseHistory(f *testing.F) {
	f.Add([]byte("1\t0/3000158\tno recovery target specified\n"))
	f.Add([]byte("1\t0/3000158\tx\n2\t0/5000000\ty\n"))
	f.Add([]byte("# comment\n\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		h, err := ParseHistory(data)
		if err != nil {
			return
		}
		for i := 1; i < len(h); i++ {
			if h[i].Parent <= h[i-1].Parent || h[i].Switch < h[i-1].Switch {
				t.Fatalf("accepted out-of-order history %+v", h)
			}
		}
	})
}

// Defect 8 of issue 8: versions walship cannot read are refused with one
// line naming the range; PostgreSQL 18's page magic is known.
func TestSupportedPGMajor(t *testing.T) {
	for v := MinPGMajor; v <= MaxPGMajor; v++ {
		if err := SupportedPGMajor(v); err != nil {
			t.Errorf("PostgreSQL %d refused: %v", v, err)
		}
	}
	for _, v := range []int{9, 11, 19, 0} {
		err := SupportedPGMajor(v)
		if err == nil || !strings.Contains(err.Error(), "12 to 18") {
			t.Errorf("PostgreSQL %d: %v", v, err)
		}
	}
	if v, ok := PageMagicMajor(0xD118); !ok || v != 18 {
		t.Errorf("0xD118 is PostgreSQL %d %v, want 18", v, ok)
	}
}
