package restore

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/walship/walship/pipeline"
)

// Prefetch keeps the segments after the one PostgreSQL asked for in a
// directory beside pg_wal, verified, so later restore_command calls are a
// rename. Files in it are complete and verified (written through a
// temporary file and a rename); segments older than the one asked for are
// removed, so it holds at most Count segments plus those being written.
type Prefetch struct {
	Fetcher *Fetcher
	Dir     string
	Count   int
}

// Serve moves a prefetched copy of name into dest and reports whether
// there was one.
func (p *Prefetch) Serve(name, dest string) (bool, error) {
	src := filepath.Join(p.Dir, name)
	if err := os.Rename(src, dest); err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return false, nil
		}
		return false, fmt.Errorf("serve prefetched %s: %w", name, err)
	}
	return true, syncDir(filepath.Dir(dest))
}

// Await waits, up to limit, while a prefetcher is at work and name has not
// appeared, so the caller does not download a segment a prefetcher is
// already downloading. It reports whether the segment is now there.
func (p *Prefetch) Await(name string, limit time.Duration) bool {
	path := filepath.Join(p.Dir, name)
	deadline := time.Now().Add(limit)
	for {
		if _, err := os.Stat(path); err == nil {
			return true
		}
		if !p.busy() || time.Now().After(deadline) {
			_, err := os.Stat(path)
			return err == nil
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// busy reports whether a prefetcher holds the directory's lock.
func (p *Prefetch) busy() bool {
	f, err := os.Open(filepath.Join(p.Dir, ".lock"))
	if err != nil {
		return false
	}
	defer f.Close()
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_SH|syscall.LOCK_NB); err != nil {
		return true
	}
	syscall.Flock(int(f.Fd()), syscall.LOCK_UN)
	return false
}

// Clean removes prefetched segments older than name (recovery has moved
// past them) and temporary files left by an interrupted prefetch.
func (p *Prefetch) Clean(name string) {
	entries, err := os.ReadDir(p.Dir)
	if err != nil {
		return
	}
	for _, e := range entries {
		n := e.Name()
		switch {
		case strings.Contains(n, ".walship-tmp-"):
			if info, err := e.Info(); err == nil && time.Since(info.ModTime()) > 10*time.Minute {
				os.Remove(filepath.Join(p.Dir, n))
			}
		case pipeline.IsSegmentName(n) && n < name:
			os.Remove(filepath.Join(p.Dir, n))
		}
	}
}

// Next lists the Count segment names after name.
func (p *Prefetch) Next(name string, size pipeline.SegmentSize) []string {
	seg, err := pipeline.ParseSegmentName(name, size)
	if err != nil {
		return nil
	}
	out := make([]string, 0, p.Count)
	for i := 0; i < p.Count; i++ {
		seg = seg.Next()
		out = append(out, seg.Name(size))
	}
	return out
}

// Run downloads the segments after name that are not yet in the directory,
// several at a time. Only one Run works on a directory at once; another
// returns at once. Segments not in the archive end the run quietly.
func (p *Prefetch) Run(ctx context.Context, name string, size pipeline.SegmentSize) error {
	if err := os.MkdirAll(p.Dir, 0o700); err != nil {
		return err
	}
	lock, err := os.OpenFile(filepath.Join(p.Dir, ".lock"), os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		return err
	}
	defer lock.Close()
	if err := syscall.Flock(int(lock.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		return nil // another prefetcher is at work
	}
	var wg sync.WaitGroup
	// Two cores decode and hash; more goroutines only add memory.
	sem := make(chan struct{}, min(p.Count, max(runtime.NumCPU(), 2)))
	for _, n := range p.Next(name, size) {
		if _, err := os.Stat(filepath.Join(p.Dir, n)); err == nil {
			continue
		}
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			fo, err := p.Fetcher.Locate(ctx, n)
			if err != nil {
				return
			}
			raw, err := p.Fetcher.Download(ctx, n, fo)
			if err != nil {
				return // the foreground fetch will report it
			}
			WriteFile(filepath.Join(p.Dir, n), raw)
		}()
	}
	wg.Wait()
	return nil
}
