package unpack

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/walship/walship/compress"
	"github.com/walship/walship/internal/backoff"
	"github.com/walship/walship/pipeline/backup"
	"github.com/walship/walship/pipeline/restore"
)

// fetched is one downloaded, decoded and checked chunk.
type fetched struct {
	data []byte
	err  error
}

// fetchAll downloads the chunks of archives in order, Jobs at a time,
// and hands them out in order: one future per chunk. At most about 2*Jobs
// chunks are held at once.
func (r *restorer) fetchAll(ctx context.Context, wg *sync.WaitGroup, archives []backup.Archive) <-chan chan fetched {
	out := make(chan chan fetched, r.o.Jobs)
	sem := make(chan struct{}, r.o.Jobs)
	wg.Add(1)
	go func() {
		defer wg.Done()
		defer close(out)
		for _, a := range archives {
			for _, ch := range a.Chunks {
				f := make(chan fetched, 1)
				select {
				case out <- f:
				case <-ctx.Done():
					return
				}
				select {
				case sem <- struct{}{}:
				case <-ctx.Done():
					f <- fetched{err: ctx.Err()}
					return
				}
				wg.Add(1)
				go func(ch backup.Chunk) {
					defer wg.Done()
					data, err := r.chunk(ctx, ch)
					f <- fetched{data, err}
					<-sem
				}(ch)
			}
		}
	}()
	return out
}

// chunkReader reads an archive's chunks, in order, as one stream.
type chunkReader struct {
	ctx     context.Context
	futures <-chan chan fetched
	left    int // chunks of this archive not yet taken
	taken   func([]byte)
	cur     []byte
	err     error
}

func (c *chunkReader) Read(p []byte) (int, error) {
	for len(c.cur) == 0 {
		if c.err != nil {
			return 0, c.err
		}
		if c.left == 0 {
			return 0, io.EOF
		}
		var f chan fetched
		var ok bool
		select {
		case f, ok = <-c.futures:
		case <-c.ctx.Done():
			c.err = c.ctx.Err()
			return 0, c.err
		}
		if !ok {
			c.err = fmt.Errorf("chunk list ended early")
			return 0, c.err
		}
		res := <-f
		if res.err != nil {
			c.err = res.err
			return 0, c.err
		}
		c.left--
		c.cur = res.data
		c.taken(res.data)
	}
	n := copy(p, c.cur)
	c.cur = c.cur[n:]
	return n, nil
}

// chunk downloads one chunk and returns its checked raw bytes, retrying
// transient errors.
func (r *restorer) chunk(ctx context.Context, ch backup.Chunk) ([]byte, error) {
	bo := backoff.New(200*time.Millisecond, 5*time.Second)
	var err error
	for start := time.Now(); ; {
		var data []byte
		data, err = r.chunkOnce(ctx, ch)
		if err == nil || restore.Permanent(err) || errors.Is(err, os.ErrNotExist) || ctx.Err() != nil {
			if errors.Is(err, os.ErrNotExist) {
				err = fmt.Errorf("%w: backup %s: chunk %s is missing", restore.ErrCorrupt, r.cat.ID, ch.Key)
			}
			return data, err
		}
		if time.Since(start) > r.o.RetryFor || !bo.Wait(ctx) {
			return nil, fmt.Errorf("download %s (retried for %s): %w", ch.Key, time.Since(start).Round(time.Second), err)
		}
	}
}

func (r *restorer) chunkOnce(ctx context.Context, ch backup.Chunk) ([]byte, error) {
	rc, meta, err := r.o.Sink.Get(ctx, ch.Key)
	if err != nil {
		return nil, err
	}
	defer rc.Close()
	limit := ch.StoredSize
	if limit <= 0 {
		limit = ch.Size
	}
	limit += limit/8 + 1<<20
	var buf bytes.Buffer
	if ch.StoredSize > 0 {
		buf.Grow(int(ch.StoredSize) + bytes.MinRead)
	}
	n, err := buf.ReadFrom(io.LimitReader(rc, limit+1))
	if err != nil {
		if strings.Contains(err.Error(), "checksum did not match") {
			return nil, fmt.Errorf("%w: %s: %v", restore.ErrCorrupt, ch.Key, err)
		}
		return nil, fmt.Errorf("read %s: %w", ch.Key, err)
	}
	if n > limit {
		return nil, fmt.Errorf("%w: %s is larger than its chunk could be stored in", restore.ErrCorrupt, ch.Key)
	}
	if r.cat.Encryption != "" && meta.Encryption == "" {
		return nil, fmt.Errorf("%w: %s is stored in plaintext, but backup %s is encrypted", restore.ErrCorrupt, ch.Key, r.cat.ID)
	}
	codec, _ := compress.ParseCodec(r.cat.Codec)
	raw, err := restore.Open(ch.Key, codec, buf.Bytes(), meta, r.o.Identities)
	if err != nil {
		return nil, err
	}
	sum := sha256.Sum256(raw)
	if got := hex.EncodeToString(sum[:]); int64(len(raw)) != ch.Size || got != ch.SHA256 {
		return nil, fmt.Errorf("%w: %s: %d bytes with SHA-256 %s, the catalogue says %d bytes with %s", restore.ErrCorrupt, ch.Key, len(raw), got, ch.Size, ch.SHA256)
	}
	return raw, nil
}
