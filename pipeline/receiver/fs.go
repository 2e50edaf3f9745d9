package receiver

import (
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sort"
	"time"

	"golang.org/x/sys/unix"

	"github.com/walship/walship/internal/fsutil"
)

// FS is the file system the spool lives on. The receiver uses the
// operating system's (OSFS); the simulation gives one that forgets, when it
// crashes, whatever was not fsynced, as a real disk may.
type FS interface {
	MkdirAll(dir string) error
	// Create creates name or truncates it, preallocated to size bytes.
	Create(name string, size int64) (File, error)
	Open(name string) (io.ReadCloser, error)
	// ReadDir lists a directory's regular files, by name.
	ReadDir(dir string) ([]FileInfo, error)
	Rename(from, to string) error
	// Remove deletes name; a missing file is not an error.
	Remove(name string) error
	// SyncDir makes the directory's entries durable (creations, renames,
	// removals).
	SyncDir(dir string) error
	// WriteFile replaces name with data atomically and durably.
	WriteFile(name string, data []byte) error
	// Lock takes an exclusive lock on name for this process, or fails at
	// once with an error wrapping fsutil.ErrLocked.
	Lock(name string) (io.Closer, error)
}

// File is a spool file open for writing.
type File interface {
	io.Writer
	Sync() error
	Close() error
}

// FileInfo describes one file of a directory listing.
type FileInfo struct {
	Name    string
	Size    int64
	ModTime time.Time
}

// OSFS is the operating system's file system.
type OSFS struct{}

var _ FS = OSFS{}

// MkdirAll implements FS.
func (OSFS) MkdirAll(dir string) error { return os.MkdirAll(dir, 0o750) }

// Create implements FS.
func (OSFS) Create(name string, size int64) (File, error) {
	f, err := os.OpenFile(name, os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o640)
	if err != nil {
		return nil, err
	}
	if err := unix.Fallocate(int(f.Fd()), 0, 0, size); err != nil {
		if errors.Is(err, unix.ENOSPC) {
			f.Close()
			return nil, fmt.Errorf("preallocate %s: %w", name, err)
		}
		// File systems without fallocate: a sparse file of the right size.
		if err := f.Truncate(size); err != nil {
			f.Close()
			return nil, fmt.Errorf("preallocate %s: %w", name, err)
		}
	}
	return f, nil
}

// Open implements FS.
func (OSFS) Open(name string) (io.ReadCloser, error) { return os.Open(name) }

// ReadDir implements FS.
func (OSFS) ReadDir(dir string) ([]FileInfo, error) {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return nil, err
	}
	out := make([]FileInfo, 0, len(entries))
	for _, e := range entries {
		if !e.Type().IsRegular() {
			continue
		}
		info, err := e.Info()
		if errors.Is(err, os.ErrNotExist) {
			continue // removed meanwhile
		}
		if err != nil {
			return nil, err
		}
		out = append(out, FileInfo{Name: e.Name(), Size: info.Size(), ModTime: info.ModTime()})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out, nil
}

// Rename implements FS.
func (OSFS) Rename(from, to string) error { return os.Rename(from, to) }

// Remove implements FS.
func (OSFS) Remove(name string) error {
	if err := os.Remove(name); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	return nil
}

// SyncDir implements FS.
func (OSFS) SyncDir(dir string) error { return fsutil.SyncDir(dir) }

// WriteFile implements FS.
func (OSFS) WriteFile(name string, data []byte) error { return fsutil.WriteFile(name, data, 0o640) }

// Lock implements FS.
func (OSFS) Lock(name string) (io.Closer, error) {
	l, err := fsutil.TryLock(name)
	if err != nil {
		return nil, err
	}
	return closerFunc(l.Unlock), nil
}

type closerFunc func()

func (f closerFunc) Close() error { f(); return nil }

// join is filepath.Join, named for the spool's use.
func join(dir, name string) string { return filepath.Join(dir, name) }
