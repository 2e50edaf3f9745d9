package receiver

import (
	"crypto/sha256"
	"errors"
	"fmt"
	"hash"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/walship/walship/internal/fsutil"
	"github.com/walship/walship/pipeline"
)

// spool is the receiver's local copy of the WAL, in pg_receivewal's layout:
// the segment being written is <name>.partial, preallocated to the segment
// size; a complete segment is fsynced and renamed to <name>. Complete
// segments stay until the archived event for them arrives.
type spool struct {
	dir  string
	size pipeline.SegmentSize
	lk   *os.File // holds the directory's lock

	f       *os.File
	seg     pipeline.Segment
	sum     hash.Hash
	written pipeline.LSN // end of the bytes written to f
	synced  pipeline.LSN // end of the bytes fsynced
}

// completed describes a segment that is durable in the spool.
type completed struct {
	seg    pipeline.Segment
	path   string
	sha256 string
}

func newSpool(dir string, size pipeline.SegmentSize) (*spool, error) {
	if err := os.MkdirAll(dir, 0o750); err != nil {
		return nil, fmt.Errorf("spool directory: %w", err)
	}
	return &spool{dir: dir, size: size, sum: sha256.New()}, nil
}

func (s *spool) path(seg pipeline.Segment) string {
	return filepath.Join(s.dir, seg.Name(s.size))
}

// Spool file names besides <segment> and <segment>.partial: the last
// segment of an ended timeline, kept until archived as <segment>.partial,
// and timeline history files.
const endedSuffix = ".partial.ended"

// ended lists the ended-timeline segments and history files waiting in the
// spool.
func (s *spool) ended() (segs []pipeline.Segment, histories []string, err error) {
	entries, err := os.ReadDir(s.dir)
	if err != nil {
		return nil, nil, fmt.Errorf("read spool: %w", err)
	}
	for _, e := range entries {
		name := e.Name()
		if base, ok := strings.CutSuffix(name, endedSuffix); ok && pipeline.IsSegmentName(base) {
			if seg, err := pipeline.ParseSegmentName(base, s.size); err == nil {
				segs = append(segs, seg)
			}
		}
		if strings.HasSuffix(name, ".history") && len(name) == 16 {
			histories = append(histories, name)
		}
	}
	return segs, histories, nil
}

// endTimeline closes the open segment at the switch point: it is fsynced
// and renamed <segment>.partial.ended, to be archived as <segment>.partial.
func (s *spool) endTimeline(at pipeline.LSN) (completed, error) {
	if s.f == nil || s.written != at {
		return completed{}, fmt.Errorf("spool: timeline ended at %s but the spool holds WAL to %s", at, s.written)
	}
	name := s.seg.Name(s.size)
	if err := s.f.Sync(); err != nil {
		return completed{}, fmt.Errorf("fsync spool segment %s: %w", name, err)
	}
	s.synced = s.written
	s.f.Close()
	s.f = nil
	final := s.path(s.seg) + endedSuffix
	if err := os.Rename(s.path(s.seg)+".partial", final); err != nil {
		return completed{}, fmt.Errorf("rename spool segment %s: %w", name, err)
	}
	if err := fsutil.SyncDir(s.dir); err != nil {
		return completed{}, err
	}
	sum, _, err := hashFile(final)
	if err != nil {
		return completed{}, err
	}
	return completed{seg: s.seg, path: final, sha256: sum}, nil
}

// writeFile stores a small file (a timeline history) durably in the spool.
func (s *spool) writeFile(name string, data []byte) (string, error) {
	path := filepath.Join(s.dir, name)
	tmp := path + ".tmp"
	f, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o640)
	if err != nil {
		return "", err
	}
	_, err = f.Write(data)
	if err == nil {
		err = f.Sync()
	}
	f.Close()
	if err == nil {
		err = os.Rename(tmp, path)
	}
	if err == nil {
		err = fsutil.SyncDir(s.dir)
	}
	if err != nil {
		return "", fmt.Errorf("spool %s: %w", name, err)
	}
	return path, nil
}

// scan lists the partial and complete segments in the spool, oldest first.
func (s *spool) scan() (partials, complete []pipeline.Segment, err error) {
	entries, err := os.ReadDir(s.dir)
	if err != nil {
		return nil, nil, fmt.Errorf("read spool: %w", err)
	}
	for _, e := range entries {
		name := e.Name()
		base, isPartial := strings.CutSuffix(name, ".partial")
		if !pipeline.IsSegmentName(base) {
			continue
		}
		seg, err := pipeline.ParseSegmentName(base, s.size)
		if err != nil {
			continue
		}
		if isPartial {
			partials = append(partials, seg)
		} else {
			complete = append(complete, seg)
		}
	}
	less := func(l []pipeline.Segment) func(i, j int) bool {
		return func(i, j int) bool {
			if l[i].No != l[j].No {
				return l[i].No < l[j].No
			}
			return l[i].Timeline < l[j].Timeline
		}
	}
	sort.Slice(partials, less(partials))
	sort.Slice(complete, less(complete))
	return partials, complete, nil
}

// open starts writing seg from its first byte, replacing any .partial.
func (s *spool) open(seg pipeline.Segment) error {
	s.closeCurrent()
	f, err := os.OpenFile(s.path(seg)+".partial", os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o640)
	if err != nil {
		return fmt.Errorf("open spool segment: %w", err)
	}
	if err := unix.Fallocate(int(f.Fd()), 0, 0, int64(s.size)); err != nil {
		if err := f.Truncate(int64(s.size)); err != nil {
			f.Close()
			return fmt.Errorf("preallocate spool segment: %w", err)
		}
	}
	s.f, s.seg = f, seg
	s.sum.Reset()
	s.written = seg.StartLSN(s.size)
	s.synced = s.written
	return nil
}

// write appends WAL that starts at lsn. It completes every segment the data
// fills and calls done for each, and opens the next.
func (s *spool) write(lsn pipeline.LSN, data []byte, done func(completed) error) error {
	if s.f == nil {
		return errors.New("spool: no open segment")
	}
	if lsn != s.written {
		return fmt.Errorf("spool: wal at %s, expected %s", lsn, s.written)
	}
	for len(data) > 0 {
		room := int(s.seg.EndLSN(s.size) - s.written)
		n := min(room, len(data))
		if _, err := s.f.Write(data[:n]); err != nil {
			return fmt.Errorf("write spool segment %s: %w", s.seg.Name(s.size), err)
		}
		s.sum.Write(data[:n])
		s.written += pipeline.LSN(n)
		data = data[n:]
		if s.written == s.seg.EndLSN(s.size) {
			c, err := s.complete()
			if err != nil {
				return err
			}
			if err := done(c); err != nil {
				return err
			}
			if err := s.open(s.seg.Next()); err != nil {
				return err
			}
		}
	}
	return nil
}

// sync fsyncs the open segment if it has unsynced bytes.
func (s *spool) sync() error {
	if s.f == nil || s.synced == s.written {
		return nil
	}
	if err := s.f.Sync(); err != nil {
		return fmt.Errorf("fsync spool segment: %w", err)
	}
	s.synced = s.written
	return nil
}

func (s *spool) complete() (completed, error) {
	name := s.seg.Name(s.size)
	if err := s.f.Sync(); err != nil {
		return completed{}, fmt.Errorf("fsync spool segment %s: %w", name, err)
	}
	s.synced = s.written
	if err := s.f.Close(); err != nil {
		return completed{}, fmt.Errorf("close spool segment %s: %w", name, err)
	}
	s.f = nil
	final := s.path(s.seg)
	if err := os.Rename(final+".partial", final); err != nil {
		return completed{}, fmt.Errorf("rename spool segment %s: %w", name, err)
	}
	if err := fsutil.SyncDir(s.dir); err != nil {
		return completed{}, err
	}
	return completed{seg: s.seg, path: final, sha256: pipeline.SHA256Hex(s.sum.Sum(nil))}, nil
}

// hashFile computes the SHA-256 of a complete spool segment, for segments
// found at start-up.
func hashFile(path string) (string, int64, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", 0, err
	}
	defer f.Close()
	h := sha256.New()
	n, err := io.Copy(h, f)
	if err != nil {
		return "", 0, err
	}
	return pipeline.SHA256Hex(h.Sum(nil)), n, nil
}

func (s *spool) remove(seg pipeline.Segment) {
	os.Remove(s.path(seg))
}

// position is where the next byte goes: the end of what the open segment
// holds, or the start of the next one.
func (s *spool) position() pipeline.LSN { return s.written }

// lock takes the spool directory for this process: two receivers on one
// host must never write the same spool.
func (s *spool) lock() error {
	f, err := os.OpenFile(filepath.Join(s.dir, ".lock"), os.O_CREATE|os.O_RDWR, 0o640)
	if err != nil {
		return fmt.Errorf("lock spool: %w", err)
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		f.Close()
		return fmt.Errorf("spool %s is in use by another walship process: stop it, or give this one another --spool-dir", s.dir)
	}
	s.lk = f
	return nil
}

func (s *spool) unlock() {
	if s.lk != nil {
		s.lk.Close()
		s.lk = nil
	}
}

// discardCurrent closes and removes the open segment, which holds nothing.
func (s *spool) discardCurrent() {
	if s.f != nil {
		s.f.Close()
		s.f = nil
		os.Remove(s.path(s.seg) + ".partial")
	}
}

func (s *spool) closeCurrent() {
	if s.f != nil {
		s.f.Sync()
		s.f.Close()
		s.f = nil
	}
}
