package sim

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"os"
	"time"

	"github.com/walship/walship/sinks"
)

// bucket is the simulated S3: put-if-absent objects with metadata,
// outages, slow calls (other actors run meanwhile), replies lost after the
// write, and objects put there by someone else (conflicts).
type bucket struct {
	w        *World
	downTill time.Time
	objs     map[string]*stored
}

type stored struct {
	body    []byte
	meta    sinks.Metadata
	foreign bool // not walship's: a conflict
	raw     []byte
}

var _ sinks.Sink = (*bucketFor)(nil)

// bucketFor is the bucket as one archiver sees it.
type bucketFor struct {
	b *bucket
	a *arch
}

func (s *bucketFor) call(ctx context.Context) error {
	s.b.w.interfere(s.a.name)
	if err := ctx.Err(); err != nil {
		return err
	}
	if s.b.w.now.Before(s.b.downTill) {
		return errOutage
	}
	return nil
}

func (s *bucketFor) Put(ctx context.Context, key string, body []byte, meta sinks.Metadata) error {
	if err := s.call(ctx); err != nil {
		return err
	}
	if _, ok := s.b.objs[key]; ok {
		return fmt.Errorf("put %s: %w", key, sinks.ErrExists)
	}
	o := &stored{body: append([]byte(nil), body...), meta: meta}
	if err := s.b.w.checkObject(key, o); err != nil {
		s.b.w.fail("(c) bucket: %v", err)
	}
	s.b.objs[key] = o
	s.b.w.count("uploaded")
	return s.b.w.maybeLostReply()
}

func (s *bucketFor) Head(ctx context.Context, key string) (sinks.Metadata, error) {
	if err := s.call(ctx); err != nil {
		return sinks.Metadata{}, err
	}
	o, ok := s.b.objs[key]
	if !ok {
		return sinks.Metadata{}, fmt.Errorf("head %s: %w", key, os.ErrNotExist)
	}
	return o.meta, nil
}

func (s *bucketFor) Get(ctx context.Context, key string) (io.ReadCloser, sinks.Metadata, error) {
	if err := s.call(ctx); err != nil {
		return nil, sinks.Metadata{}, err
	}
	o, ok := s.b.objs[key]
	if !ok {
		return nil, sinks.Metadata{}, fmt.Errorf("get %s: %w", key, os.ErrNotExist)
	}
	return io.NopCloser(bytes.NewReader(o.body)), o.meta, nil
}
