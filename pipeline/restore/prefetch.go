package restore

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/walship/walship/internal/backoff"
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
//
// The directory's manifest ties its files to one configuration and one
// archive identity (Manifest): a fetch serves nothing from a directory
// whose manifest differs from its own, and a prefetcher empties such a
// directory before it writes its own manifest. A .partial is never
// prefetched: it grows, so every call fetches the newest.
type Prefetch struct {
	Fetcher  *Fetcher
	Dir      string
	Count    int
	IdleExit time.Duration // 0: 20s
	// Manifest is the configuration this process fetches with; the
	// prefetcher fills in the confirmed system identifier.
	Manifest Manifest
	// RecoveryEnded, when set, reports that PostgreSQL left recovery; the
	// prefetcher then removes the directory and exits.
	RecoveryEnded func() bool
}

// Manifest is what the files of a prefetch directory were fetched with.
type Manifest struct {
	Dest         string `json:"dest"`
	Layout       string `json:"layout"`
	Server       string `json:"server"`
	SystemID     string `json:"system_id"`
	AllowPartial bool   `json:"allow_partial"`
}

// matches reports whether files fetched under m may be served to a fetch
// configured as want; an unknown system identifier (no pg_control) in
// want accepts the one the prefetcher confirmed.
func (m Manifest) matches(want Manifest) bool {
	if want.SystemID == "" {
		want.SystemID = m.SystemID
	}
	return m == want && m.SystemID != ""
}

const (
	wantFile     = ".want"
	endFile      = ".end" // the first segment found missing from the archive
	lockFile     = ".lock"
	manifestFile = ".manifest"
	stopFile     = ".stop"    // written by Cleanup: remove everything and exit
	corruptExt   = ".corrupt" // <segment>.corrupt: the archive's copy failed verification
	windowFile   = ".window"  // "first last": the segments the prefetcher is after
	staleAfter   = 10 * time.Minute
)

// writeHint replaces a small bookkeeping file through a rename (no fsync:
// losing one is harmless).
func (p *Prefetch) writeHint(file, content string) {
	tmp := filepath.Join(p.Dir, fsutil.TempPrefix+file)
	if os.WriteFile(tmp, []byte(content), 0o600) == nil {
		os.Rename(tmp, filepath.Join(p.Dir, file))
	}
}

// Want records that recovery has reached name.
func (p *Prefetch) Want(name string) {
	os.MkdirAll(p.Dir, 0o700)
	p.writeHint(wantFile, name)
}

func (p *Prefetch) read(file string) string {
	b, _ := os.ReadFile(filepath.Join(p.Dir, file))
	return strings.TrimSpace(string(b))
}

func (p *Prefetch) manifest() (Manifest, bool) {
	var m Manifest
	b, err := os.ReadFile(filepath.Join(p.Dir, manifestFile))
	return m, err == nil && json.Unmarshal(b, &m) == nil
}

// Usable reports whether the directory's files were fetched with this
// configuration from this cluster's archive, so they may be served.
func (p *Prefetch) Usable() bool {
	m, ok := p.manifest()
	return ok && m.matches(p.Manifest)
}

// Serve moves a prefetched copy of name into dest and reports whether
// there was one. The caller checks Usable first. A copy whose first page
// does not name the segment and the manifest's system is removed, not
// served. A directory on another file system than dest is copied from.
func (p *Prefetch) Serve(name, dest string) (bool, error) {
	src := filepath.Join(p.Dir, name)
	if err := p.checkCached(src, name); err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return false, nil
		}
		os.Remove(src)
		return false, nil
	}
	err := os.Rename(src, dest)
	if errors.Is(err, syscall.EXDEV) {
		err = moveAcross(src, dest)
	}
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return false, nil
		}
		return false, fmt.Errorf("serve prefetched %s: %w", name, err)
	}
	return true, fsutil.SyncDir(filepath.Dir(dest))
}

// checkCached reads a cached segment's long page header: it must be for
// name's position and the manifest's system.
func (p *Prefetch) checkCached(path, name string) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	var h [longPageHdr]byte
	if _, err := io.ReadFull(f, h[:]); err != nil {
		return fmt.Errorf("%w: short", ErrCorrupt)
	}
	size := pipeline.SegmentSize(binary.LittleEndian.Uint32(h[32:36]))
	seg, err := pipeline.ParseSegmentName(name, size)
	m, _ := p.manifest()
	switch {
	case size.Validate() != nil || err != nil || binary.LittleEndian.Uint16(h[2:4])&xlpLongHeader == 0:
		return fmt.Errorf("%w: no long page header", ErrCorrupt)
	case binary.LittleEndian.Uint64(h[8:16]) != uint64(seg.StartLSN(size)):
		return fmt.Errorf("%w: page address", ErrCorrupt)
	case strconv.FormatUint(binary.LittleEndian.Uint64(h[24:32]), 10) != m.SystemID:
		return fmt.Errorf("%w: system identifier", ErrCorrupt)
	}
	return nil
}

// moveAcross moves src to dest on another file system: a durable copy,
// then the source goes.
func moveAcross(src, dest string) error {
	data, err := os.ReadFile(src)
	if err != nil {
		return err
	}
	if err := fsutil.WriteFile(dest, data, 0o600); err != nil {
		return err
	}
	return os.Remove(src)
}

// Await waits, up to limit, while a prefetcher is at work and name has not
// appeared, so the caller does not download a segment a prefetcher is
// already downloading. It returns at once when the prefetcher found the
// archive ends before name or that name's object is corrupt. It reports
// whether the segment is there.
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
		if _, err := os.Stat(path + corruptExt); err == nil {
			return false
		}
		// Only segments in the prefetcher's window are coming: not one
		// asked for again, nor one on another timeline.
		if first, last, ok := strings.Cut(p.read(windowFile), " "); !ok || name < first || name > last || name <= p.read(wantFile) {
			return false
		}
		if !p.Running() || time.Now().After(deadline) {
			_, err := os.Stat(path)
			return err == nil
		}
		time.Sleep(2 * time.Millisecond)
	}
}

// Running reports whether a prefetcher is at work.
func (p *Prefetch) Running() bool { return fsutil.Held(filepath.Join(p.Dir, lockFile)) }

// Clean removes prefetched segments older than name (recovery has moved
// past them), their corruption records, and temporary files left by an
// interrupted prefetch.
func (p *Prefetch) Clean(name string) {
	entries, err := os.ReadDir(p.Dir)
	if err != nil {
		return
	}
	running := p.Running()
	for _, e := range entries {
		n := e.Name()
		switch {
		case strings.HasPrefix(n, fsutil.TempPrefix):
			if info, err := e.Info(); err == nil && (!running || time.Since(info.ModTime()) > 10*time.Minute) {
				os.Remove(filepath.Join(p.Dir, n))
			}
		case pipeline.IsSegmentName(strings.TrimSuffix(n, corruptExt)) && n < name:
			os.Remove(filepath.Join(p.Dir, n))
		}
	}
}

// CleanStale empties a directory that no prefetcher works in and that
// recovery has asked nothing of for a while: left by an earlier recovery.
func (p *Prefetch) CleanStale() {
	fi, err := os.Stat(filepath.Join(p.Dir, wantFile))
	if err != nil || time.Since(fi.ModTime()) < staleAfter || p.Running() {
		return
	}
	p.reset()
}

// reset removes every file but the lock.
func (p *Prefetch) reset() {
	entries, _ := os.ReadDir(p.Dir)
	for _, e := range entries {
		if e.Name() != lockFile {
			os.RemoveAll(filepath.Join(p.Dir, e.Name()))
		}
	}
}

// Cleanup removes the directory, for recovery_end_command: a prefetcher at
// work is told to stop and remove it, and waited for up to wait.
func (p *Prefetch) Cleanup(wait time.Duration) error {
	if _, err := os.Stat(p.Dir); errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if p.Running() {
		p.writeHint(stopFile, "cleanup")
		for deadline := time.Now().Add(wait); p.Running() && time.Now().Before(deadline); {
			time.Sleep(20 * time.Millisecond)
		}
	}
	if err := os.RemoveAll(p.Dir); err != nil {
		return fmt.Errorf("remove prefetch directory: %w", err)
	}
	return nil
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
// IdleExit, recovery ends, or Cleanup asks it to stop. Only one Run works
// on a directory at once; another returns at once. It first confirms the
// archive's identity (once: later segments are checked against it) and
// ties the directory to its configuration.
func (p *Prefetch) Run(ctx context.Context, size pipeline.SegmentSize) error {
	if err := os.MkdirAll(p.Dir, 0o700); err != nil {
		return err
	}
	lock, err := fsutil.TryLock(filepath.Join(p.Dir, lockFile))
	if errors.Is(err, fsutil.ErrLocked) {
		return nil // another prefetcher is at work
	}
	if err != nil {
		return err
	}
	defer lock.Unlock()
	idle := p.IdleExit
	if idle == 0 {
		idle = 20 * time.Second
	}
	began := time.Now()
	bo := backoff.New(200*time.Millisecond, 5*time.Second)
	var id string
	for {
		ident, err := p.Fetcher.Identity(ctx)
		if err == nil {
			id = ident.SystemID
			break
		}
		if errors.Is(err, ErrWrongArchive) || time.Since(began) > idle || !bo.Wait(ctx) {
			return err
		}
	}
	own := p.Manifest
	own.SystemID = id
	if m, ok := p.manifest(); !ok || m != own {
		// Files of another configuration or archive, or of an older
		// walship: none may be served.
		want := p.read(wantFile)
		p.reset()
		if want != "" {
			p.writeHint(wantFile, want)
		}
		b, _ := json.Marshal(own)
		if err := fsutil.WriteFile(filepath.Join(p.Dir, manifestFile), b, 0o600); err != nil {
			return err
		}
	}
	par := min(p.Count, max(runtime.NumCPU(), 2))
	lastWant, lastChange, lastWindow, lastLook := "", time.Now(), "", time.Time{}
	bo.Reset()
	for ctx.Err() == nil && time.Since(lastChange) < idle {
		if time.Since(lastLook) > time.Second {
			lastLook = time.Now()
			if _, err := os.Stat(filepath.Join(p.Dir, stopFile)); err == nil || (p.RecoveryEnded != nil && p.RecoveryEnded()) {
				os.RemoveAll(p.Dir)
				return nil
			}
			p.expire(endFile, time.Second) // the archive's end is a hint: look again
			p.expireCorrupt(30 * time.Second)
		}
		want := p.read(wantFile)
		if want != lastWant {
			lastWant, lastChange = want, time.Now()
		}
		if !pipeline.IsSegmentName(want) {
			time.Sleep(20 * time.Millisecond)
			continue
		}
		next := p.Next(want, size)
		if len(next) > 0 && want != lastWindow {
			lastWindow = want
			p.writeHint(windowFile, next[0]+" "+next[len(next)-1])
		}
		var missing []string
		for _, n := range next {
			if end := p.read(endFile); end != "" && end <= n {
				break
			}
			_, err := os.Stat(filepath.Join(p.Dir, n))
			_, cerr := os.Stat(filepath.Join(p.Dir, n+corruptExt))
			if err != nil && cerr != nil {
				missing = append(missing, n)
			}
		}
		if len(missing) == 0 {
			time.Sleep(10 * time.Millisecond)
			continue
		}
		if p.download(ctx, missing[:min(len(missing), par)]) {
			bo.Reset()
		} else if !bo.Wait(ctx) {
			break
		}
	}
	return nil
}

func (p *Prefetch) expire(file string, age time.Duration) {
	path := filepath.Join(p.Dir, file)
	if fi, err := os.Stat(path); err == nil && time.Since(fi.ModTime()) > age {
		os.Remove(path)
	}
}

func (p *Prefetch) expireCorrupt(age time.Duration) {
	entries, _ := os.ReadDir(p.Dir)
	for _, e := range entries {
		if strings.HasSuffix(e.Name(), corruptExt) {
			p.expire(e.Name(), age)
		}
	}
}

// download fetches names in parallel and reports whether any was stored
// or found missing; a round of only transient errors makes Run back off.
// A name not in the archive is recorded in .end, so nobody waits for it;
// Run looks again a second later (a standby's archive grows). A corrupt
// object is recorded as <name>.corrupt, so the fetch for it does not wait
// for the prefetcher and reports the corruption itself.
func (p *Prefetch) download(ctx context.Context, names []string) bool {
	var wg sync.WaitGroup
	var mu sync.Mutex
	firstMissing, progress := "", false
	for _, n := range names {
		wg.Add(1)
		go func() {
			defer wg.Done()
			fo, err := p.Fetcher.locate(ctx, n, false)
			if err == nil {
				var raw []byte
				if raw, err = p.Fetcher.Download(ctx, fo); err == nil {
					err = fsutil.WriteFile(filepath.Join(p.Dir, n), raw, 0o600)
				}
			}
			mu.Lock()
			defer mu.Unlock()
			switch {
			case err == nil:
				progress = true
			case errors.Is(err, ErrNotFound):
				progress = true
				if firstMissing == "" || n < firstMissing {
					firstMissing = n
				}
			case errors.Is(err, ErrCorrupt) || errors.Is(err, ErrCannotDecrypt):
				// The fetch for it finds out itself, and aborts.
				progress = true
				p.writeHint(n+corruptExt, err.Error())
			}
		}()
	}
	wg.Wait()
	if firstMissing != "" {
		p.writeHint(endFile, firstMissing)
	}
	return progress
}
