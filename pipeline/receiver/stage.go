package receiver

import (
	"crypto/sha256"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/walship/walship/internal/fsutil"
	"github.com/walship/walship/pipeline"
	"github.com/walship/walship/pipeline/stagehttp"
)

// Stage is where a receiver lends its spool to archivers on other hosts
// (--stage http): Hold serves the core's held files under the server's
// name until release is called.
type Stage interface {
	Hold(server string, h stagehttp.Holder) (release func())
}

var _ stagehttp.Holder = (*Core)(nil)

// OpenHeld opens a spool file this core has announced (or is about to)
// and still holds, by its base name: never a path from outside. A file it
// does not hold, or holds with other bytes than sum (empty: any), wraps
// os.ErrNotExist.
//
// Nothing renames or rewrites a held file in place: a completed segment,
// an ended timeline's last segment, a range and a history file each take
// their name once their bytes are durable, and leave only on a matching
// confirmation (or when the spool is planned at start, before the core
// serves). The open file is taken under fileMu, so it is the file the
// tracker names; once open, its bytes stay readable even if a
// confirmation removes the name while they are sent.
func (c *Core) OpenHeld(name, sum string) (io.ReadCloser, int64, error) {
	if c.tr == nil {
		return nil, 0, fmt.Errorf("spool %s: not started: %w", name, os.ErrNotExist)
	}
	c.fileMu.Lock()
	defer c.fileMu.Unlock()
	ev, ok := c.tr.held(name, sum)
	if !ok {
		return nil, 0, fmt.Errorf("spool %s: not held: %w", name, os.ErrNotExist)
	}
	f, err := c.cfg.FS.Open(ev.Spool)
	if err != nil {
		return nil, 0, err
	}
	return f, ev.Size, nil
}

// stageURL is where archivers fetch ev's bytes.
func (c *Core) stageURL(ev *pipeline.SegmentEvent) string {
	return stagehttp.URL(c.cfg.StageURL, c.cfg.Server, filepath.Base(ev.Spool))
}

// spoolHolder serves, before this process's first run has planned the
// spool (PostgreSQL may be down for long: an outage, or a primary lost for
// good, the case the RPO is about), the WAL files the spool held when the
// process started: exactly those a run would hold as pending — every WAL
// file with its SHA-256 sidecar (whole segments, ended timelines' last
// segments, history files, ranges) whose bytes match the sidecar. Nothing
// removes a spool file before a run starts (only a run's confirmations do),
// so what the receiver announced before it restarted stays archivable
// while PostgreSQL is unreachable. The bytes of a file are checked against
// its sidecar when it is first asked for (once per file version), on the
// open file itself.
type spoolHolder struct {
	fs  FS
	dir string

	mu       sync.Mutex
	names    map[string]bool     // WAL files with a sidecar, at start
	verified map[string]fileMark // name → the version whose bytes matched
}

type fileMark struct {
	size int64
	mod  time.Time
	sum  string
}

// newSpoolHolder lists dir (a spool not made yet holds nothing).
func newSpoolHolder(fs FS, dir string) *spoolHolder {
	h := &spoolHolder{fs: fs, dir: dir, names: map[string]bool{}, verified: map[string]fileMark{}}
	files, err := fs.ReadDir(dir)
	if err != nil {
		return h
	}
	sums := map[string]bool{}
	for _, fi := range files {
		if base, ok := strings.CutSuffix(fi.Name, sumSuffix); ok {
			sums[base] = true
		}
	}
	for _, fi := range files {
		n := fi.Name
		if sums[n] && !strings.HasPrefix(n, fsutil.TempPrefix) && !strings.HasPrefix(n, ".") &&
			!strings.HasSuffix(n, partialSuffix) && !strings.HasSuffix(n, doneSuffix) {
			h.names[n] = true
		}
	}
	return h
}

// files is how many files h may serve.
func (h *spoolHolder) files() int {
	h.mu.Lock()
	defer h.mu.Unlock()
	return len(h.names)
}

// OpenHeld implements stagehttp.Holder.
func (h *spoolHolder) OpenHeld(name, sum string) (io.ReadCloser, int64, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if !h.names[name] {
		return nil, 0, fmt.Errorf("spool %s: not held: %w", name, os.ErrNotExist)
	}
	path := join(h.dir, name)
	want, err := readSum(h.fs, path)
	if err != nil || want == "" || (sum != "" && want != sum) {
		return nil, 0, fmt.Errorf("spool %s: not held with these bytes: %w", name, os.ErrNotExist)
	}
	rc, err := h.fs.Open(path)
	if err != nil {
		return nil, 0, fmt.Errorf("spool %s: %w", name, os.ErrNotExist)
	}
	f, ok := rc.(*os.File)
	if !ok {
		// Only the operating system's files can be checked and sent
		// from the same descriptor.
		rc.Close()
		return nil, 0, fmt.Errorf("spool %s: not servable: %w", name, os.ErrNotExist)
	}
	st, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, 0, err
	}
	mark := fileMark{size: st.Size(), mod: st.ModTime(), sum: want}
	if h.verified[name] != mark {
		hs := sha256.New()
		if _, err := io.Copy(hs, f); err != nil {
			f.Close()
			return nil, 0, err
		}
		if pipeline.SHA256Hex(hs.Sum(nil)) != want {
			f.Close()
			return nil, 0, fmt.Errorf("spool %s: bytes do not match their checksum: %w", name, os.ErrNotExist)
		}
		if _, err := f.Seek(0, io.SeekStart); err != nil {
			f.Close()
			return nil, 0, err
		}
		h.verified[name] = mark
	}
	return f, st.Size(), nil
}
