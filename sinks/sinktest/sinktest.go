// Package sinktest is the conformance suite every sinks.Sink passes:
// put-if-absent, durability of bytes and metadata, not-found as
// os.ErrNotExist, concurrent puts to one key.
package sinktest

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/walship/walship/sinks"
)

// Run runs the suite against a fresh sink from newSink.
func Run(t *testing.T, newSink func(t *testing.T) sinks.Sink) {
	ctx := context.Background()
	meta := sinks.Metadata{SHA256: "0123abcd", StartLSN: "0/1000000", EndLSN: "0/2000000", Timeline: 1, SystemID: "7300000000000000001", Codec: "zstd", RawSize: 1 << 20, Encryption: "age"}

	t.Run("PutGetHead", func(t *testing.T) {
		s := newSink(t)
		body := bytes.Repeat([]byte("wal!"), 300000)
		key := "p/srv/wals/0000000100000000/000000010000000000000001.zst"
		if err := s.Put(ctx, key, body, meta); err != nil {
			t.Fatalf("put: %v", err)
		}
		rc, gm, err := s.Get(ctx, key)
		if err != nil {
			t.Fatalf("get: %v", err)
		}
		got, err := io.ReadAll(rc)
		rc.Close()
		if err != nil || !bytes.Equal(got, body) {
			t.Fatalf("get returned %d bytes (%v), want the %d put", len(got), err, len(body))
		}
		if gm != meta {
			t.Errorf("get metadata %+v, want %+v", gm, meta)
		}
		hm, err := s.Head(ctx, key)
		if err != nil || hm != meta {
			t.Errorf("head %+v, %v; want %+v", hm, err, meta)
		}
	})
	t.Run("PutIfAbsent", func(t *testing.T) {
		s := newSink(t)
		key := "k/obj"
		if err := s.Put(ctx, key, []byte("first"), meta); err != nil {
			t.Fatal(err)
		}
		other := meta
		other.SHA256 = "ffff"
		if err := s.Put(ctx, key, []byte("second"), other); !errors.Is(err, sinks.ErrExists) {
			t.Fatalf("second put: %v, want ErrExists", err)
		}
		rc, gm, err := s.Get(ctx, key)
		if err != nil {
			t.Fatal(err)
		}
		got, _ := io.ReadAll(rc)
		rc.Close()
		if string(got) != "first" || gm.SHA256 != meta.SHA256 {
			t.Errorf("object overwritten: %q %s", got, gm.SHA256)
		}
	})
	t.Run("NotFound", func(t *testing.T) {
		s := newSink(t)
		if _, err := s.Head(ctx, "missing/key"); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("head missing: %v, want os.ErrNotExist", err)
		}
		if _, _, err := s.Get(ctx, "missing/key"); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("get missing: %v, want os.ErrNotExist", err)
		}
	})
	t.Run("List", func(t *testing.T) {
		s := newSink(t)
		l, ok := s.(sinks.Lister)
		if !ok {
			t.Skip("sink does not list")
		}
		for _, k := range []string{"a/wals/2", "a/wals/1", "a/other", "b/wals/1"} {
			if err := s.Put(ctx, k, []byte(k), meta); err != nil {
				t.Fatal(err)
			}
		}
		var got []string
		before := time.Now().Add(-time.Hour)
		if err := l.List(ctx, "a/wals/", func(o sinks.Object) error {
			got = append(got, fmt.Sprint(o.Key, ":", o.Size))
			// Retention reports the recovery window's end by it.
			if o.Modified.Before(before) || o.Modified.After(time.Now().Add(time.Hour)) {
				t.Errorf("list %s: modified %v, want about now", o.Key, o.Modified)
			}
			return nil
		}); err != nil {
			t.Fatal(err)
		}
		if fmt.Sprint(got) != "[a/wals/1:8 a/wals/2:8]" {
			t.Errorf("list a/wals/ = %v", got)
		}
	})
	t.Run("ListAndDeleteRanges", func(t *testing.T) {
		// What the archiver does once a segment is archived: list the
		// segment's range prefix and delete what it finds, and only that.
		s := newSink(t)
		l, lok := s.(sinks.Lister)
		d, dok := s.(sinks.Deleter)
		if !lok || !dok {
			t.Skip("sink does not list or delete")
		}
		layout := sinks.BarmanCloud{Prefix: "pre", Server: "srv"}
		const seg = "000000010000000000000005"
		keep := []string{layout.RangeKey(seg+"0", 0, 0x100, ".zst"), layout.RangeKey("000000020000000000000005", 0, 0x100, ".zst"), layout.Key(seg, ".zst")}
		gone := []string{layout.RangeKey(seg, 0, 0x2000, ".zst"), layout.RangeKey(seg, 0x2000, 0x5000, ".zst"), layout.RangeKey(seg, 0, 0x5000, ".zst")}
		for _, k := range append(append([]string(nil), keep...), gone...) {
			if err := s.Put(ctx, k, []byte(k), meta); err != nil {
				t.Fatal(err)
			}
		}
		list := func() []string {
			var got []string
			if err := l.List(ctx, layout.RangePrefix(seg), func(o sinks.Object) error { got = append(got, o.Key); return nil }); err != nil {
				t.Fatal(err)
			}
			return got
		}
		if got := list(); fmt.Sprint(got) != fmt.Sprint([]string{gone[0], gone[2], gone[1]}) {
			t.Fatalf("list %s = %v", layout.RangePrefix(seg), got)
		}
		for _, k := range gone {
			if err := d.Delete(ctx, k); err != nil {
				t.Fatal(err)
			}
		}
		if err := d.Delete(ctx, gone[0]); err != nil {
			t.Errorf("deleting a deleted object: %v, want nil", err)
		}
		if got := list(); len(got) != 0 {
			t.Errorf("left after deleting: %v", got)
		}
		for _, k := range gone {
			if _, err := s.Head(ctx, k); !errors.Is(err, os.ErrNotExist) {
				t.Errorf("head %s after delete: %v, want os.ErrNotExist", k, err)
			}
		}
		for _, k := range keep {
			if _, err := s.Head(ctx, k); err != nil {
				t.Errorf("%s, not under the prefix, is gone: %v", k, err)
			}
		}
	})
	t.Run("ConcurrentPuts", func(t *testing.T) {
		s := newSink(t)
		var wg sync.WaitGroup
		var mu sync.Mutex
		wins := 0
		for i := 0; i < 8; i++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				err := s.Put(ctx, "race/obj", []byte(fmt.Sprint("writer", i)), meta)
				if err == nil {
					mu.Lock()
					wins++
					mu.Unlock()
				} else if !errors.Is(err, sinks.ErrExists) {
					t.Errorf("put: %v", err)
				}
			}()
		}
		wg.Wait()
		if wins != 1 {
			t.Errorf("%d puts succeeded on one key, want exactly 1", wins)
		}
	})
}
