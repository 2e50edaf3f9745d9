package receiver

import (
	"fmt"
	"io"
	"os"
	"path/filepath"

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
