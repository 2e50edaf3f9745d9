// Package file is the sink that writes archived WAL to a local directory
// (file:///path). Each object is a file at its key; its metadata is a JSON
// sidecar beside it (<key>.meta.json). Put is atomic and put-if-absent:
// under a lock on the object's directory, the sidecar is written first
// (atomically), then the body is written to a temporary file, fsynced and
// hard-linked into place, which fails if the key exists. An object that
// exists therefore always has its sidecar; a crash between the two leaves
// only a sidecar, which the next Put of that key replaces.
package file

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"

	"github.com/walship/walship/internal/fsutil"
	"github.com/walship/walship/sinks"
)

var _ sinks.Sink = (*Sink)(nil)
var _ sinks.Deleter = (*Sink)(nil)
var _ sinks.Lister = (*Sink)(nil)
var _ sinks.Syncer = (*Sink)(nil)

// Sink stores objects under a root directory.
type Sink struct {
	root string

	mu       sync.Mutex
	durable  map[string]bool // directories whose entries up to root are fsynced
	syncDirs func(dir string) error
}

// New opens a file sink rooted at dir, creating it if needed.
func New(dir string) (*Sink, error) {
	if !filepath.IsAbs(dir) {
		return nil, fmt.Errorf("file destination %q: use an absolute path, file:///path", dir)
	}
	if err := os.MkdirAll(dir, 0o750); err != nil {
		return nil, fmt.Errorf("file destination: %w", err)
	}
	if err := fsutil.SyncDir(filepath.Dir(dir)); err != nil {
		return nil, fmt.Errorf("file destination: %w", err)
	}
	return &Sink{root: dir, durable: map[string]bool{}, syncDirs: fsutil.SyncDir}, nil
}

// Open opens an existing file sink for reading; unlike New it never creates
// the directory, so an archive path that is not mounted is an error rather
// than an empty archive.
func Open(dir string) (*Sink, error) {
	if !filepath.IsAbs(dir) {
		return nil, fmt.Errorf("file destination %q: use an absolute path, file:///path", dir)
	}
	fi, err := os.Stat(dir)
	if err != nil {
		return nil, fmt.Errorf("file destination %s: %w: is the archive mounted?", dir, err)
	}
	if !fi.IsDir() {
		return nil, fmt.Errorf("file destination %s is not a directory", dir)
	}
	return &Sink{root: dir, durable: map[string]bool{}, syncDirs: fsutil.SyncDir}, nil
}

func (s *Sink) path(key string) (string, error) {
	if key == "" || strings.Contains(key, "..") || strings.HasPrefix(key, "/") {
		return "", fmt.Errorf("object key %q is not a clean relative path", key)
	}
	return filepath.Join(s.root, filepath.FromSlash(key)), nil
}

// lockName is the per-directory lock file Put holds.
const lockName = ".walship-lock"

// Put implements sinks.Sink.
func (s *Sink) Put(ctx context.Context, key string, body []byte, meta sinks.Metadata) error {
	p, err := s.path(key)
	if err != nil {
		return err
	}
	dir := filepath.Dir(p)
	if err := s.mkdirDurable(dir); err != nil {
		return fmt.Errorf("put %s: %w", key, err)
	}
	lk, err := fsutil.WaitLock(filepath.Join(dir, lockName))
	if err != nil {
		return fmt.Errorf("put %s: %w", key, err)
	}
	defer lk.Unlock()
	if _, err := os.Lstat(p); err == nil {
		return fmt.Errorf("put %s: %w", key, sinks.ErrExists)
	}
	// The sidecar first: once the object exists, its metadata does too.
	mb, _ := json.Marshal(meta.Map())
	if err := fsutil.WriteFile(p+".meta.json", mb, 0o640); err != nil {
		return fmt.Errorf("put %s metadata: %w", key, err)
	}
	tmp, err := writeTemp(dir, body)
	if err != nil {
		return fmt.Errorf("put %s: %w", key, err)
	}
	defer os.Remove(tmp)
	if err := os.Link(tmp, p); err != nil {
		if errors.Is(err, fs.ErrExist) {
			return fmt.Errorf("put %s: %w", key, sinks.ErrExists)
		}
		return fmt.Errorf("put %s: %w", key, err)
	}
	if err := fsutil.SyncDir(dir); err != nil {
		return fmt.Errorf("put %s: %w", key, err)
	}
	return nil
}

// mkdirDurable creates dir and makes its entry, and each parent's up to
// the root, durable before any object in it is reported stored. Every
// caller waits for the fsyncs until one of them has done them all, so a
// second writer cannot skip them while the first is still at work.
func (s *Sink) mkdirDurable(dir string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.durable[dir] {
		return nil
	}
	if err := os.MkdirAll(dir, 0o750); err != nil {
		return err
	}
	for d := dir; d != s.root && strings.HasPrefix(d, s.root); d = filepath.Dir(d) {
		if err := s.syncDirs(filepath.Dir(d)); err != nil {
			return err
		}
	}
	s.durable[dir] = true
	return nil
}

// Sync implements sinks.Syncer: it fsyncs the object's directory and each
// parent up to the root, so an object another writer linked (and died
// before fsyncing) survives a crash once it is confirmed.
func (s *Sink) Sync(ctx context.Context, key string) error {
	p, err := s.path(key)
	if err != nil {
		return err
	}
	dir := filepath.Dir(p)
	for d := dir; strings.HasPrefix(d, s.root); d = filepath.Dir(d) {
		if err := s.syncDirs(d); err != nil {
			return fmt.Errorf("sync %s: %w", key, err)
		}
		if d == s.root {
			break
		}
	}
	return nil
}

// Head implements sinks.Sink.
func (s *Sink) Head(ctx context.Context, key string) (sinks.Metadata, error) {
	p, err := s.path(key)
	if err != nil {
		return sinks.Metadata{}, err
	}
	if _, err := os.Stat(p); err != nil {
		return sinks.Metadata{}, fmt.Errorf("head %s: %w", key, err)
	}
	return readMeta(p), nil
}

// Get implements sinks.Sink.
func (s *Sink) Get(ctx context.Context, key string) (io.ReadCloser, sinks.Metadata, error) {
	p, err := s.path(key)
	if err != nil {
		return nil, sinks.Metadata{}, err
	}
	f, err := os.Open(p)
	if err != nil {
		return nil, sinks.Metadata{}, fmt.Errorf("get %s: %w", key, err)
	}
	return f, readMeta(p), nil
}

// Delete implements sinks.Deleter.
func (s *Sink) Delete(ctx context.Context, key string) error {
	p, err := s.path(key)
	if err != nil {
		return err
	}
	// The object first, then its sidecar: an object never lacks one.
	if err := os.Remove(p); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("delete %s: %w", key, err)
	}
	os.Remove(p + ".meta.json")
	return nil
}

func readMeta(p string) sinks.Metadata {
	b, err := os.ReadFile(p + ".meta.json")
	if err != nil {
		return sinks.Metadata{}
	}
	var m map[string]string
	if json.Unmarshal(b, &m) != nil {
		return sinks.Metadata{}
	}
	return sinks.MetadataFromMap(m)
}

func writeTemp(dir string, body []byte) (string, error) {
	f, err := os.CreateTemp(dir, fsutil.TempPrefix+"*")
	if err != nil {
		return "", err
	}
	_, err = io.Copy(f, bytes.NewReader(body))
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		os.Remove(f.Name())
		return "", err
	}
	return f.Name(), nil
}

// List implements sinks.Lister. Sidecars and temporary files are not
// objects and are skipped.
func (s *Sink) List(ctx context.Context, prefix string, fn func(sinks.Object) error) error {
	// Walk only the directory the prefix's last "/" names: listing one
	// segment's ranges must not walk the whole archive.
	top := s.root
	if i := strings.LastIndex(prefix, "/"); i > 0 {
		p, err := s.path(prefix[:i])
		if err != nil {
			return fmt.Errorf("list %s: %w", prefix, err)
		}
		top = p
	}
	var objs []sinks.Object
	err := filepath.WalkDir(top, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			if errors.Is(err, fs.ErrNotExist) {
				return nil
			}
			return err
		}
		if d.IsDir() || strings.HasSuffix(path, ".meta.json") || strings.HasPrefix(d.Name(), ".walship-") {
			return nil
		}
		rel, _ := filepath.Rel(s.root, path)
		key := filepath.ToSlash(rel)
		if !strings.HasPrefix(key, prefix) {
			return nil
		}
		info, err := d.Info()
		if err != nil {
			return err
		}
		objs = append(objs, sinks.Object{Key: key, Size: info.Size(), Modified: info.ModTime()})
		return nil
	})
	if err != nil {
		return fmt.Errorf("list %s: %w", prefix, err)
	}
	sort.Slice(objs, func(i, j int) bool { return objs[i].Key < objs[j].Key })
	for _, o := range objs {
		if err := fn(o); err != nil {
			return err
		}
	}
	return nil
}
