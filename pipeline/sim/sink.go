package sim

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"os"
	"sort"
	"strings"
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
	ranges   map[string][]span // walship's range objects by segment name, sorted by from
	deletes  int               // objects deleted so far
}

type stored struct {
	body    []byte
	meta    sinks.Metadata
	foreign bool // not walship's: a conflict
	raw     []byte
}

var (
	_ sinks.Sink    = (*bucketFor)(nil)
	_ sinks.Lister  = (*bucketFor)(nil)
	_ sinks.Deleter = (*bucketFor)(nil)
)

// bucketFor is the bucket as one archiver sees it.
type bucketFor struct {
	b  *bucket
	a  *arch
	as string // "prune": deletes are checked as a prune's (e2)
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
	if seg, from, to, ok := s.b.w.parseRangeKey(key); ok {
		if err := s.b.w.checkRange(key, o, seg, from, to); err != nil {
			s.b.w.fail("(c) bucket: %v", err)
		}
		s.b.addRange(seg, from, to, key)
		s.b.w.count("ranges uploaded")
	} else if strings.HasPrefix(key, s.b.w.layout.BackupPrefix()) {
		if err := s.b.w.checkBackupPut(key, o); err != nil {
			s.b.w.fail("(c) bucket: %v", err)
		}
		s.b.w.count("backup objects uploaded")
	} else {
		if err := s.b.w.checkObject(key, o); err != nil {
			s.b.w.fail("(c) bucket: %v", err)
		}
		s.b.w.count("uploaded")
	}
	if s.b.w.bk.pruned[key] {
		s.b.w.count("pruned WAL archived again") // (e) a receiver's pending segment, its confirmation lost
	}
	s.b.objs[key] = o
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

// List lists the keys under prefix in lexical order, as they were when the
// call began (other actors may run while it waits).
func (s *bucketFor) List(ctx context.Context, prefix string, fn func(sinks.Object) error) error {
	if err := s.call(ctx); err != nil {
		return err
	}
	var objs []sinks.Object
	for k, o := range s.b.objs {
		if strings.HasPrefix(k, prefix) {
			objs = append(objs, sinks.Object{Key: k, Size: int64(len(o.body))})
		}
	}
	sort.Slice(objs, func(i, j int) bool { return objs[i].Key < objs[j].Key })
	for _, o := range objs {
		if err := fn(o); err != nil {
			return err
		}
	}
	return nil
}

// Delete removes the object at key; deleting what is not there succeeds,
// as on S3. Walship may delete only its range objects of segments the
// bucket holds whole (checkDelete).
func (s *bucketFor) Delete(ctx context.Context, key string) error {
	if err := s.call(ctx); err != nil {
		return err
	}
	switch s.as {
	case "prune":
		s.b.w.checkPruneDelete(key)
	case "backup":
		s.b.w.checkTakeBack(key)
	default:
		s.b.w.checkDelete(key)
	}
	if o, ok := s.b.objs[key]; ok {
		delete(s.b.objs, key)
		s.b.deletes++
		if !o.foreign {
			s.b.dropRange(key)
		}
		if s.as == "" {
			s.b.w.count("ranges deleted")
		}
	}
	return s.b.w.maybeLostReply()
}
