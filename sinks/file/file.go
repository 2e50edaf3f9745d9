// Package file is the sink that writes archived WAL to a local directory
// (file:///path). Each object is a file at its key; its metadata is a JSON
// sidecar beside it (<key>.meta.json). Put is atomic and put-if-absent: the
// body is written to a temporary file, fsynced, then hard-linked into place,
// which fails if the key exists.
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

	"github.com/walship/walship/internal/fsutil"
	"github.com/walship/walship/sinks"
)

var _ sinks.Sink = (*Sink)(nil)
var _ sinks.Deleter = (*Sink)(nil)
var _ sinks.Lister = (*Sink)(nil)

// Sink stores objects under a root directory.
type Sink struct {
	root string
}

// New opens a file sink rooted at dir, creating it if needed.
func New(dir string) (*Sink, error) {
	if !filepath.IsAbs(dir) {
		return nil, fmt.Errorf("file destination %q: use an absolute path, file:///path", dir)
	}
	if err := os.MkdirAll(dir, 0o750); err != nil {
		return nil, fmt.Errorf("file destination: %w", err)
	}
	return &Sink{root: dir}, nil
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
	return &Sink{root: dir}, nil
}

func (s *Sink) path(key string) (string, error) {
	if key == "" || strings.Contains(key, "..") || strings.HasPrefix(key, "/") {
		return "", fmt.Errorf("object key %q is not a clean relative path", key)
	}
	return filepath.Join(s.root, filepath.FromSlash(key)), nil
}

// Put implements sinks.Sink.
func (s *Sink) Put(ctx context.Context, key string, body []byte, meta sinks.Metadata) error {
	p, err := s.path(key)
	if err != nil {
		return err
	}
	dir := filepath.Dir(p)
	_, statErr := os.Stat(dir)
	if err := os.MkdirAll(dir, 0o750); err != nil {
		return fmt.Errorf("put %s: %w", key, err)
	}
	if statErr != nil {
		// New directories must survive a crash too: fsync each parent up
		// to the root.
		for d := dir; d != s.root && strings.HasPrefix(d, s.root); d = filepath.Dir(d) {
			if err := fsutil.SyncDir(filepath.Dir(d)); err != nil {
				return fmt.Errorf("put %s: %w", key, err)
			}
		}
	}
	if _, err := os.Lstat(p); err == nil {
		return fmt.Errorf("put %s: %w", key, sinks.ErrExists)
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
	// The data is in place; the sidecar follows. A crash between the two
	// leaves an object without metadata, which readers treat as unverified
	// and check by content.
	mb, _ := json.Marshal(meta.Map())
	mt, err := writeTemp(dir, mb)
	if err != nil {
		return fmt.Errorf("put %s metadata: %w", key, err)
	}
	if err := os.Rename(mt, p+".meta.json"); err != nil {
		os.Remove(mt)
		return fmt.Errorf("put %s metadata: %w", key, err)
	}
	if err := fsutil.SyncDir(dir); err != nil {
		return fmt.Errorf("put %s: %w", key, err)
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
	os.Remove(p + ".meta.json")
	if err := os.Remove(p); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("delete %s: %w", key, err)
	}
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
	f, err := os.CreateTemp(dir, ".walship-tmp-*")
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
	var objs []sinks.Object
	err := filepath.WalkDir(s.root, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			if errors.Is(err, fs.ErrNotExist) {
				return nil
			}
			return err
		}
		if d.IsDir() || strings.HasSuffix(path, ".meta.json") || strings.HasPrefix(d.Name(), ".walship-tmp-") {
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
		objs = append(objs, sinks.Object{Key: key, Size: info.Size()})
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
