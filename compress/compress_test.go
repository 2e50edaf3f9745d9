package compress

import (
	"bytes"
	"io"
	"math/rand/v2"
	"testing"
)

func sample(n int) []byte {
	r := rand.New(rand.NewPCG(1, 2))
	b := make([]byte, n)
	for i := range b {
		if i%7 == 0 {
			b[i] = byte(r.IntN(256))
		}
	}
	return b
}

func TestRoundTrip(t *testing.T) {
	src := sample(1 << 20)
	for _, c := range []Codec{None, Zstd, Gzip, Snappy} {
		e, err := NewEncoder(c, 0)
		if err != nil {
			t.Fatal(err)
		}
		for i := 0; i < 2; i++ { // twice: the encoder is reused
			out, err := e.Encode(src)
			if err != nil {
				t.Fatalf("%s: %v", c, err)
			}
			if c != None && len(out) >= len(src) {
				t.Errorf("%s: %d bytes from %d", c, len(out), len(src))
			}
			r, err := NewReader(c, bytes.NewReader(out))
			if err != nil {
				t.Fatal(err)
			}
			got, err := io.ReadAll(r)
			r.Close()
			if err != nil || !bytes.Equal(got, src) {
				t.Fatalf("%s: round trip differs (%v)", c, err)
			}
		}
		if got, ok := CodecForExt(c.Ext()); !ok || got != c {
			t.Errorf("CodecForExt(%q) = %s", c.Ext(), got)
		}
	}
	if _, err := ParseCodec("lz4"); err == nil {
		t.Error("lz4 accepted")
	}
	if _, err := NewEncoder(Zstd, 9); err == nil {
		t.Error("zstd level 9 accepted")
	}
}

func BenchmarkEncode(b *testing.B) {
	src := sample(16 << 20)
	for _, c := range []Codec{Zstd, Gzip, Snappy} {
		b.Run(string(c), func(b *testing.B) {
			e, _ := NewEncoder(c, 0)
			b.SetBytes(int64(len(src)))
			b.ReportAllocs()
			for b.Loop() {
				if _, err := e.Encode(src); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
