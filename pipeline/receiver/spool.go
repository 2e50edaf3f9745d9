package receiver

import (
	"crypto/sha256"
	"errors"
	"fmt"
	"hash"
	"io"
	"sort"
	"strconv"
	"strings"

	"github.com/walship/walship/internal/fsutil"
	"github.com/walship/walship/pipeline"
)

// spool is the receiver's local copy of the WAL, in pg_receivewal's layout:
// the segment being written is <name>.partial, preallocated to the segment
// size; a complete segment is fsynced and renamed to <name>. Complete
// segments stay until the bucket is known to hold them.
//
// Besides those, the spool holds the last segment of an ended timeline,
// <name>.partial.ended.<end LSN as 16 hex digits>, archived as
// <name>.partial, timeline history files, <tli>.history, and ranges of the
// segment being written, <name>.<from>-<to>.range (see pipeline.KindRange),
// each holding only those bytes. Every one of
// these WAL files X has a sidecar X.sha256 with the SHA-256 of the bytes as
// walship received them, made durable before X takes its name: a restart
// checks the file against it, so bytes damaged on disk are never archived
// as the WAL they replaced.
type spool struct {
	fs   FS
	dir  string
	size pipeline.SegmentSize
	lk   io.Closer

	f       File
	seg     pipeline.Segment
	sum     hash.Hash
	written pipeline.LSN // end of the bytes written to f
	synced  pipeline.LSN // end of the bytes fsynced
}

// completed describes a WAL file that is durable in the spool.
type completed struct {
	seg    pipeline.Segment
	path   string
	sha256 string
}

const (
	partialSuffix = ".partial"
	endedInfix    = ".partial.ended"
	sumSuffix     = ".sha256"
	doneSuffix    = ".done"
	rangeSuffix   = ".range"
	lockName      = ".lock"
)

func newSpool(fs FS, dir string, size pipeline.SegmentSize) (*spool, error) {
	if err := fs.MkdirAll(dir); err != nil {
		return nil, fmt.Errorf("spool directory: %w", err)
	}
	return &spool{fs: fs, dir: dir, size: size, sum: sha256.New()}, nil
}

func (s *spool) path(seg pipeline.Segment) string { return join(s.dir, seg.Name(s.size)) }

// endedName is the spool name of an ended timeline's last segment; the
// name carries where the timeline ended, which a restart needs.
func (s *spool) endedName(seg pipeline.Segment, end pipeline.LSN) string {
	return fmt.Sprintf("%s%s.%016X", seg.Name(s.size), endedInfix, uint64(end))
}

// lock takes the spool directory for this process: two receivers on one
// host must never write the same spool.
func (s *spool) lock() error {
	lk, err := s.fs.Lock(join(s.dir, lockName))
	if errors.Is(err, fsutil.ErrLocked) {
		return &spoolLockedError{dir: s.dir}
	}
	if err != nil {
		return fmt.Errorf("lock spool: %w", err)
	}
	s.lk = lk
	return nil
}

// spoolLockedError is returned when another process holds the spool.
type spoolLockedError struct{ dir string }

func (e *spoolLockedError) Error() string {
	return fmt.Sprintf("spool %s is in use by another walship process: stop it, or give this one another --spool-dir", e.dir)
}
func (e *spoolLockedError) Unwrap() error { return fsutil.ErrLocked }

func (s *spool) unlock() {
	if s.lk != nil {
		s.lk.Close()
		s.lk = nil
	}
}

// listing is what the spool holds, by kind.
type listing struct {
	complete  []spoolFile // <segment>
	partials  []spoolFile // <segment>.partial, being written
	ended     []spoolFile // ended timelines' last segments
	histories []spoolFile // <tli>.history
	done      []spoolFile // <segment>.done: archived segments whose file is gone
	ranges    []spoolFile // <segment>.<from>-<to>.range
	other     []string    // temporary files and anything unrecognised but ours
}

// spoolFile is one WAL file found in the spool.
type spoolFile struct {
	kind pipeline.Kind // segment, partial (an ended timeline's) or history; "" for .partial
	name string
	seg  pipeline.Segment
	tli  uint32       // history files: their timeline
	end  pipeline.LSN // ended segments: where the timeline ended (0: unknown); ranges: their end
	from pipeline.LSN // ranges: their first byte
	size int64
	info FileInfo
	// Filled by the Core before planning: the file's SHA-256, and whether
	// its bytes are whole (the right size, and the sidecar's checksum when
	// there is one).
	sum   string
	valid bool
	// hasSum: the sidecar exists.
	hasSum bool
}

// list reads the spool directory. Names that are not walship's are left
// alone and not reported.
func (s *spool) list() (listing, error) {
	var l listing
	files, err := s.fs.ReadDir(s.dir)
	if err != nil {
		return l, fmt.Errorf("read spool: %w", err)
	}
	sums := map[string]bool{}
	for _, fi := range files {
		if base, ok := strings.CutSuffix(fi.Name, sumSuffix); ok {
			sums[base] = true
		}
	}
	have := map[string]bool{}
	for _, fi := range files {
		name := fi.Name
		if _, ok := strings.CutSuffix(name, sumSuffix); ok {
			continue
		}
		have[name] = true
		f := spoolFile{name: name, size: fi.Size, info: fi}
		f.hasSum = sums[name]
		if tli, ok := pipeline.ParseHistoryFileName(name); ok {
			f.tli, f.kind = tli, pipeline.KindHistory
			l.histories = append(l.histories, f)
			continue
		}
		if strings.HasPrefix(name, fsutil.TempPrefix) {
			l.other = append(l.other, name)
			continue
		}
		if len(name) < 24 || !pipeline.IsSegmentName(name[:24]) {
			continue
		}
		seg, err := pipeline.ParseSegmentName(name[:24], s.size)
		if err != nil {
			continue
		}
		f.seg = seg
		switch rest := name[24:]; {
		case rest == "":
			f.kind = pipeline.KindSegment
			l.complete = append(l.complete, f)
		case rest == partialSuffix:
			l.partials = append(l.partials, f)
		case rest == doneSuffix:
			l.done = append(l.done, f)
		case strings.HasSuffix(rest, rangeSuffix) && strings.HasPrefix(rest, "."):
			from, to, ok := pipeline.ParseRangeSuffix(strings.TrimSuffix(rest[1:], rangeSuffix))
			if !ok || to > uint64(s.size) {
				continue
			}
			f.kind = pipeline.KindRange
			f.from, f.end = seg.StartLSN(s.size)+pipeline.LSN(from), seg.StartLSN(s.size)+pipeline.LSN(to)
			l.ranges = append(l.ranges, f)
		case rest == endedInfix:
			f.kind = pipeline.KindPartial
			l.ended = append(l.ended, f) // written by an older walship: end unknown
		case strings.HasPrefix(rest, endedInfix+"."):
			end, err := strconv.ParseUint(rest[len(endedInfix)+1:], 16, 64)
			if err != nil || len(rest) != len(endedInfix)+17 {
				continue
			}
			f.end, f.kind = pipeline.LSN(end), pipeline.KindPartial
			l.ended = append(l.ended, f)
		}
	}
	for base := range sums {
		if !have[base] {
			l.other = append(l.other, base+sumSuffix) // its file never took its name, or is gone
		}
	}
	sort.Strings(l.other)
	return l, nil
}

// writeSum stores the sidecar of the WAL file at path, durably.
func (s *spool) writeSum(path, sum string) error {
	if err := s.fs.WriteFile(path+sumSuffix, []byte(sum+"\n")); err != nil {
		return fmt.Errorf("spool checksum %s: %w", path, err)
	}
	return nil
}

// readSum reads the sidecar of the WAL file at path.
func (s *spool) readSum(path string) (string, error) { return readSum(s.fs, path) }

// readSum reads the sidecar of the WAL file at path on fs.
func readSum(fs FS, path string) (string, error) {
	data, err := readAll(fs, path+sumSuffix)
	return strings.TrimSpace(string(data)), err
}

// markDone leaves a durable empty marker for a segment the bucket holds,
// before its file goes: a restart then knows the segment is archived and
// does not stream it again, though it is missing from the spool.
func (s *spool) markDone(path string) error {
	return s.fs.WriteFile(path+doneSuffix, nil)
}

// remove deletes a WAL file, then its sidecar.
func (s *spool) remove(path string) error {
	if err := s.fs.Remove(path); err != nil {
		return err
	}
	return s.fs.Remove(path + sumSuffix)
}

// open starts writing seg from its first byte, replacing any .partial. The
// directory entry is made durable before any write is reported.
func (s *spool) open(seg pipeline.Segment) error {
	s.closeCurrent()
	name := s.path(seg) + partialSuffix
	f, err := s.fs.Create(name, int64(s.size))
	if err != nil {
		return fmt.Errorf("open spool segment: %w", err)
	}
	if err := s.fs.SyncDir(s.dir); err != nil {
		f.Close()
		return err
	}
	s.f, s.seg = f, seg
	s.sum.Reset()
	s.written = seg.StartLSN(s.size)
	s.synced = s.written
	return nil
}

// isOpen reports whether a segment is being written.
func (s *spool) isOpen() bool { return s.f != nil }

// write appends WAL that starts at lsn. It completes every segment the data
// fills, calls done for each, and opens the next.
func (s *spool) write(lsn pipeline.LSN, data []byte, done func(completed)) error {
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
			done(c)
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

// finish fsyncs and closes the open segment, stores its checksum (of the
// bytes as received, zeros after the written end) and renames it to final.
func (s *spool) finish(final string) (string, error) {
	name := s.seg.Name(s.size)
	if err := s.f.Sync(); err != nil {
		return "", fmt.Errorf("fsync spool segment %s: %w", name, err)
	}
	s.synced = s.written
	err := s.f.Close()
	s.f = nil
	if err != nil {
		return "", fmt.Errorf("close spool segment %s: %w", name, err)
	}
	var zero [8192]byte
	for rest := int64(s.seg.EndLSN(s.size) - s.written); rest > 0; rest -= int64(len(zero)) {
		s.sum.Write(zero[:min(rest, int64(len(zero)))])
	}
	sum := pipeline.SHA256Hex(s.sum.Sum(nil))
	if err := s.writeSum(final, sum); err != nil {
		return "", err
	}
	if err := s.fs.Rename(s.path(s.seg)+partialSuffix, final); err != nil {
		return "", fmt.Errorf("rename spool segment %s: %w", name, err)
	}
	return sum, s.fs.SyncDir(s.dir)
}

func (s *spool) complete() (completed, error) {
	final := s.path(s.seg)
	sum, err := s.finish(final)
	if err != nil {
		return completed{}, err
	}
	return completed{seg: s.seg, path: final, sha256: sum}, nil
}

// endTimeline closes the open segment at the switch point: it is fsynced
// and renamed to its ended name, to be archived as <segment>.partial.
func (s *spool) endTimeline(at pipeline.LSN) (completed, error) {
	if s.f == nil || s.written != at {
		return completed{}, fmt.Errorf("spool: timeline ended at %s but the spool holds WAL to %s", at, s.written)
	}
	final := join(s.dir, s.endedName(s.seg, at))
	sum, err := s.finish(final)
	if err != nil {
		return completed{}, err
	}
	return completed{seg: s.seg, path: final, sha256: sum}, nil
}

// rangeName is the spool name of bytes [from, to) of seg.
func (s *spool) rangeName(seg pipeline.Segment, from, to pipeline.LSN) string {
	start := seg.StartLSN(s.size)
	return pipeline.RangeName(seg.Name(s.size), uint64(from-start), uint64(to-start)) + rangeSuffix
}

// readOpen reads bytes [from, to) of the segment being written, which must
// be fsynced.
func (s *spool) readOpen(from, to pipeline.LSN) ([]byte, error) {
	if s.f == nil || from < s.seg.StartLSN(s.size) || to > s.synced || from >= to {
		return nil, fmt.Errorf("spool: no fsynced WAL %s-%s in the open segment", from, to)
	}
	f, err := s.fs.Open(s.path(s.seg) + partialSuffix)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	off := int64(from - s.seg.StartLSN(s.size))
	if sk, ok := f.(io.Seeker); ok {
		_, err = sk.Seek(off, io.SeekStart)
	} else {
		_, err = io.CopyN(io.Discard, f, off)
	}
	if err != nil {
		return nil, fmt.Errorf("read spool segment %s: %w", s.seg.Name(s.size), err)
	}
	data := make([]byte, to-from)
	if _, err := io.ReadFull(f, data); err != nil {
		return nil, fmt.Errorf("read spool segment %s: %w", s.seg.Name(s.size), err)
	}
	return data, nil
}

// writeFile stores a small file (a timeline history) and its checksum
// durably in the spool.
func (s *spool) writeFile(name string, data []byte) (string, error) {
	path := join(s.dir, name)
	if err := s.writeSum(path, sha256Hex(data)); err != nil {
		return "", err
	}
	if err := s.fs.WriteFile(path, data); err != nil {
		return "", fmt.Errorf("spool %s: %w", name, err)
	}
	return path, nil
}

// discardCurrent closes and removes the open segment, which holds nothing.
func (s *spool) discardCurrent() {
	if s.f != nil {
		s.f.Close()
		s.f = nil
		s.fs.Remove(s.path(s.seg) + partialSuffix)
	}
}

// closeCurrent fsyncs and closes the open segment, leaving it a .partial
// that the next session writes again from its start.
func (s *spool) closeCurrent() {
	if s.f != nil {
		if s.f.Sync() == nil {
			s.synced = s.written
		}
		s.f.Close()
		s.f = nil
	}
}

// hashFile computes the SHA-256 and size of a spool file.
func hashFile(fs FS, path string) (string, int64, error) {
	f, err := fs.Open(path)
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
