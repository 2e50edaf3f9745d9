package take

import (
	"crypto/sha256"
	"hash"

	"github.com/walship/walship/pipeline"
)

// chunk is one piece of an archive's stream, its bytes owned by the
// window until confirmed.
type chunk struct {
	archive string
	seq     int
	data    []byte
	sha256  string
}

// chunker cuts one archive's stream into chunks of a fixed size (the last
// one shorter) and hashes the whole stream. Each full chunk goes to emit,
// which takes ownership of its bytes; get supplies empty buffers.
type chunker struct {
	archive string
	size    int
	seq     int
	buf     []byte
	total   int64
	whole   hash.Hash
	get     func() []byte
	emit    func(chunk) error
}

func newChunker(archive string, size int, get func() []byte, emit func(chunk) error) *chunker {
	return &chunker{archive: archive, size: size, whole: sha256.New(), get: get, emit: emit}
}

// Write implements io.Writer.
func (c *chunker) Write(p []byte) (int, error) {
	n := len(p)
	c.whole.Write(p)
	c.total += int64(n)
	for len(p) > 0 {
		if c.buf == nil {
			c.buf = c.get()[:0]
		}
		k := min(len(p), c.size-len(c.buf))
		c.buf = append(c.buf, p[:k]...)
		p = p[k:]
		if len(c.buf) == c.size {
			if err := c.flush(); err != nil {
				return n - len(p), err
			}
		}
	}
	return n, nil
}

func (c *chunker) flush() error {
	sum := sha256.Sum256(c.buf)
	ch := chunk{archive: c.archive, seq: c.seq, data: c.buf, sha256: pipeline.SHA256Hex(sum[:])}
	c.buf = nil
	c.seq++
	return c.emit(ch)
}

// Close emits what is left: the last, short chunk, or an empty one when
// the stream was empty (an archive has at least one chunk).
func (c *chunker) Close() error {
	if len(c.buf) > 0 || c.seq == 0 {
		if c.buf == nil {
			c.buf = c.get()[:0]
		}
		return c.flush()
	}
	return nil
}

// Sum is the SHA-256 of the whole stream written so far.
func (c *chunker) Sum() string { return pipeline.SHA256Hex(c.whole.Sum(nil)) }

func hashHex(b []byte) string {
	sum := sha256.Sum256(b)
	return pipeline.SHA256Hex(sum[:])
}
