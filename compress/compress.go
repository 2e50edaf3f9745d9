// Package compress turns raw WAL into the bytes walship stores and back. A
// Codec names an algorithm and the file extension restore tools expect;
// encoders are reusable and hold their state between segments so the
// archive path does not allocate per segment.
package compress

import (
	"bytes"
	"compress/gzip"
	"fmt"
	"io"
	"strings"

	"github.com/klauspost/compress/snappy"
	"github.com/klauspost/compress/zstd"
)

// Codec identifies a compression algorithm.
type Codec string

// The codecs walship writes and reads.
const (
	None   Codec = "none"
	Zstd   Codec = "zstd"
	Gzip   Codec = "gzip"
	Snappy Codec = "snappy"
)

// Codecs lists every codec, the default first: the order restore tries
// extensions in when it does not know which one an object has.
func Codecs() []Codec { return []Codec{Zstd, Gzip, Snappy, None} }

// ParseCodec validates a codec name from the command line.
func ParseCodec(s string) (Codec, error) {
	switch c := Codec(s); c {
	case None, Zstd, Gzip, Snappy:
		return c, nil
	}
	return "", fmt.Errorf("compression %q: use zstd, gzip, snappy or none", s)
}

// Ext is the file extension restore tools expect for the codec.
func (c Codec) Ext() string {
	switch c {
	case Zstd:
		return ".zst"
	case Gzip:
		return ".gz"
	case Snappy:
		return ".snappy"
	}
	return ""
}

// CodecForExt is the codec whose extension ext is ("" for none).
func CodecForExt(ext string) (Codec, bool) {
	for _, c := range Codecs() {
		if c.Ext() == ext {
			return c, true
		}
	}
	return "", false
}

// SplitExt splits a stored file name into the name and the codec its
// extension names; a name without a codec's extension is stored as is.
func SplitExt(name string) (string, Codec) {
	for _, c := range Codecs() {
		if c.Ext() == "" {
			continue
		}
		if f, ok := strings.CutSuffix(name, c.Ext()); ok {
			return f, c
		}
	}
	return name, None
}

// Encoder compresses whole buffers with one codec. It is not safe for
// concurrent use; give each worker its own.
type Encoder struct {
	codec Codec
	zstd  *zstd.Encoder
	gzip  *gzip.Writer
	buf   bytes.Buffer
	zbuf  []byte
}

// NewEncoder builds an encoder. level is codec-specific: zstd 1-4
// (fastest, default, better, best), gzip 1-9; 0 means the codec's default
// for WAL: zstd fastest and gzip 1, throughput over ratio.
func NewEncoder(c Codec, level int) (*Encoder, error) {
	e := &Encoder{codec: c}
	switch c {
	case None, Snappy:
	case Zstd:
		zl := zstd.SpeedFastest
		if level != 0 {
			if level < 1 || level > 4 {
				return nil, fmt.Errorf("zstd compression level %d: use 1 (fastest) to 4 (best)", level)
			}
			zl = zstd.EncoderLevel(level)
		}
		// One goroutine per encoder: the archiver parallelises across
		// segments, and a single-threaded encoder keeps memory small.
		enc, err := zstd.NewWriter(nil, zstd.WithEncoderLevel(zl), zstd.WithEncoderConcurrency(1),
			zstd.WithEncoderCRC(true), zstd.WithWindowSize(4<<20))
		if err != nil {
			return nil, fmt.Errorf("zstd encoder: %w", err)
		}
		e.zstd = enc
	case Gzip:
		gl := gzip.BestSpeed
		if level != 0 {
			if level < 1 || level > 9 {
				return nil, fmt.Errorf("gzip compression level %d: use 1 to 9", level)
			}
			gl = level
		}
		w, err := gzip.NewWriterLevel(nil, gl)
		if err != nil {
			return nil, fmt.Errorf("gzip encoder: %w", err)
		}
		e.gzip = w
	default:
		return nil, fmt.Errorf("compression %q: use zstd, gzip, snappy or none", c)
	}
	return e, nil
}

// Codec is the encoder's codec.
func (e *Encoder) Codec() Codec { return e.codec }

// Encode compresses src and returns the compressed bytes. The result is
// valid until the next call to Encode.
func (e *Encoder) Encode(src []byte) ([]byte, error) {
	e.buf.Reset()
	switch e.codec {
	case None:
		return src, nil
	case Zstd:
		e.zbuf = e.zstd.EncodeAll(src, e.zbuf[:0]) // reuses the grown buffer
		return e.zbuf, nil
	case Gzip:
		e.gzip.Reset(&e.buf)
		if _, err := e.gzip.Write(src); err != nil {
			return nil, fmt.Errorf("gzip: %w", err)
		}
		if err := e.gzip.Close(); err != nil {
			return nil, fmt.Errorf("gzip: %w", err)
		}
	case Snappy:
		w := snappy.NewBufferedWriter(&e.buf)
		if _, err := w.Write(src); err != nil {
			return nil, fmt.Errorf("snappy: %w", err)
		}
		if err := w.Close(); err != nil {
			return nil, fmt.Errorf("snappy: %w", err)
		}
	}
	return e.buf.Bytes(), nil
}

// NewReader decompresses r with codec c. The caller closes the result.
func NewReader(c Codec, r io.Reader) (io.ReadCloser, error) {
	switch c {
	case None:
		return io.NopCloser(r), nil
	case Zstd:
		d, err := zstd.NewReader(r, zstd.WithDecoderConcurrency(1), zstd.WithDecoderMaxMemory(2<<30))
		if err != nil {
			return nil, fmt.Errorf("zstd: %w", err)
		}
		return d.IOReadCloser(), nil
	case Gzip:
		g, err := gzip.NewReader(r)
		if err != nil {
			return nil, fmt.Errorf("gzip: %w", err)
		}
		return g, nil
	case Snappy:
		return io.NopCloser(snappy.NewReader(r)), nil
	}
	return nil, fmt.Errorf("compression %q: unknown codec", c)
}

// Decode decompresses a whole buffer. sizeHint, the expected raw size,
// avoids regrowing the output (0 if unknown).
func Decode(c Codec, src []byte, sizeHint int) ([]byte, error) {
	switch c {
	case None:
		return src, nil
	case Zstd:
		d, err := zstd.NewReader(nil, zstd.WithDecoderConcurrency(1), zstd.WithDecoderMaxMemory(2<<30))
		if err != nil {
			return nil, fmt.Errorf("zstd: %w", err)
		}
		defer d.Close()
		out, err := d.DecodeAll(src, make([]byte, 0, sizeHint))
		if err != nil {
			return nil, fmt.Errorf("zstd: %w", err)
		}
		return out, nil
	}
	r, err := NewReader(c, bytes.NewReader(src))
	if err != nil {
		return nil, err
	}
	defer r.Close()
	var buf bytes.Buffer
	buf.Grow(sizeHint + bytes.MinRead)
	if _, err := buf.ReadFrom(r); err != nil {
		return nil, fmt.Errorf("%s: %w", c, err)
	}
	return buf.Bytes(), nil
}
