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

	"github.com/walship/walship/internal/fsutil"
	"github.com/walship/walship/pipeline"
)

// Prefetch keeps the segments after the one PostgreSQL asked for in a
// directory beside pg_wal, verified, so later restore_command calls are a
// rename. Files in it are complete and verified (written through a
// temporary file and a rename); segments older than the one asked for are
// removed, so it holds at most Count segments plus those being written.
//
// One prefetcher process at a time (a lock file) follows recovery: each
// fetch records the segment it served in the file .want, and the
// prefetcher keeps the Count segments after it present until recovery has
// asked for nothing new for IdleExit.
type Prefetch struct {
	Fetcher  *Fetcher
	Dir      string
	Count    int
	IdleExit time.Duration // 0: 20s
}

const (
	wantFile = ".want"
	endFile  = ".end" // the first segment found missing from the archive
	lockFile = ".lock"
	// windowFile holds "first last": the segments the prefetcher is after.
	windowFile = ".window"
)

// Want records that recovery has reached name.
func (p *Prefetch) Want(name string) {
	os.MkdirAll(p.Dir, 0o700)
	tmp := filepath.Join(p.Dir, wantFile+".tmp")
	if os.WriteFile(tmp, []byte(name), 0o600) == nil {
		os.Rename(tmp, filepath.Join(p.Dir, wantFile))
	}
}

func (p *Prefetch) read(file string) string {
	b, _ := os.ReadFile(filepath.Join(p.Dir, file))
	return strings.TrimSpace(string(b))
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
	return true, fsutil.SyncDir(filepath.Dir(dest))
}

// Await waits, up to limit, while a prefetcher is at work and name has not
// appeared, so the caller does not download a segment a prefetcher is
// already downloading. It returns at once when the prefetcher found the
// archive ends before name. It reports whether the segment is there.
func (p *Prefetch) Await(name string, limit time.Duration) bool {
	path := filepath.Join(p.Dir, name)
	deadline := time.Now().Add(limit)
	for {
		if _, err := os.Stat(path); err == nil {
			return true
		}
		if end := p.read(endFile); end != "" && end <= name {
			return false
		}
		// Only segments in the prefetcher's window are coming: not one
		// asked for again, nor one on another timeline.
		if first, last, ok := strings.Cut(p.read(windowFile), " "); !ok || name < first || name > last || name <= p.read(wantFile) {
			return false
		}
		if !p.busy() || time.Now().After(deadline) {
			_, err := os.Stat(path)
			return err == nil
		}
		time.Sleep(2 * time.Millisecond)
	}
}

// busy reports whether a prefetcher holds the directory's lock.
func (p *Prefetch) busy() bool {
	f, err := os.Open(filepath.Join(p.Dir, lockFile))
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

// Running reports whether a prefetcher is at work.
func (p *Prefetch) Running() bool { return p.busy() }

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

// Run follows recovery: it keeps the Count segments after the wanted one
// downloaded, several at a time, in order, until nothing new is wanted for
// IdleExit. Only one Run works on a directory at once; another returns at
// once.
func (p *Prefetch) Run(ctx context.Context, size pipeline.SegmentSize) error {
	if err := os.MkdirAll(p.Dir, 0o700); err != nil {
		return err
	}
	lock, err := os.OpenFile(filepath.Join(p.Dir, lockFile), os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		return err
	}
	defer lock.Close()
	if err := syscall.Flock(int(lock.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		return nil // another prefetcher is at work
	}
	idle := p.IdleExit
	if idle == 0 {
		idle = 20 * time.Second
	}
	par := min(p.Count, max(runtime.NumCPU(), 2))
	lastWant, lastChange, lastWindow := "", time.Now(), ""
	for ctx.Err() == nil && time.Since(lastChange) < idle {
		want := p.read(wantFile)
		if want != lastWant {
			lastWant, lastChange = want, time.Now()
		}
		if !pipeline.IsSegmentName(want) {
			time.Sleep(20 * time.Millisecond)
			continue
		}
		// The recorded end of the archive is a hint: look again every second.
		if fi, err := os.Stat(filepath.Join(p.Dir, endFile)); err == nil && time.Since(fi.ModTime()) > time.Second {
			os.Remove(filepath.Join(p.Dir, endFile))
		}
		next := p.Next(want, size)
		if len(next) > 0 && want != lastWindow {
			lastWindow = want
			tmp := filepath.Join(p.Dir, windowFile+".tmp")
			if os.WriteFile(tmp, []byte(next[0]+" "+next[len(next)-1]), 0o600) == nil {
				os.Rename(tmp, filepath.Join(p.Dir, windowFile))
			}
		}
		var missing []string
		for _, n := range next {
			if end := p.read(endFile); end != "" && end <= n {
				break
			}
			if _, err := os.Stat(filepath.Join(p.Dir, n)); err != nil {
				missing = append(missing, n)
			}
		}
		if len(missing) == 0 {
			time.Sleep(10 * time.Millisecond)
			continue
		}
		p.download(ctx, missing[:min(len(missing), par)])
	}
	return nil
}

// download fetches names in parallel. A name not in the archive is
// recorded in .end, so nobody waits for it; Run looks again a second later
// (a standby's archive grows).
func (p *Prefetch) download(ctx context.Context, names []string) {
	var wg sync.WaitGroup
	var mu sync.Mutex
	firstMissing := ""
	for _, n := range names {
		wg.Add(1)
		go func() {
			defer wg.Done()
			fo, err := p.Fetcher.Locate(ctx, n)
			if err == nil {
				var raw []byte
				if raw, err = p.Fetcher.Download(ctx, n, fo); err == nil {
					err = WriteFile(filepath.Join(p.Dir, n), raw)
				}
			}
			if errors.Is(err, ErrNotFound) {
				mu.Lock()
				if firstMissing == "" || n < firstMissing {
					firstMissing = n
				}
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	if firstMissing != "" {
		tmp := filepath.Join(p.Dir, endFile+".tmp")
		if os.WriteFile(tmp, []byte(firstMissing), 0o600) == nil {
			os.Rename(tmp, filepath.Join(p.Dir, endFile))
		}
	}
}
