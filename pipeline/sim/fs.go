package sim

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"path"
	"sort"
	"strings"
	"time"

	"github.com/walship/walship/internal/fsutil"
	"github.com/walship/walship/pipeline/receiver"
)

// errDead is what a crashed process's file handles answer.
var errDead = errors.New("sim: the process that opened this crashed")

// errDiskFull is what writes answer while the disk is full.
var errDiskFull = errors.New("sim: no space left on device")

// fileSystem is a disk with a journal: file data is durable once fsynced,
// directory entries (creations, renames, removals) once a directory is
// fsynced. A crash keeps, for each file, its fsynced bytes plus a random
// prefix of the writes since, and for the namespace, a random prefix of the
// entry operations since the last directory fsync.
type fileSystem struct {
	w       *World
	gen     int // the live process's generation
	files   map[string]*inode
	durable map[string]*inode
	journal []dirOp
	locks   map[string]int // path → generation holding it
	dying   bool           // the process died in a file operation; the crash follows
	// onRemove is called before a file's bytes go: removed, or replaced by
	// a rename or a write (then replacement holds the new bytes).
	onRemove func(name string, data, replacement []byte)
}

// inode is a file. Files are written sequentially from their start (the
// spool appends; small files are written whole), so what a crash keeps is
// a prefix: the fsynced bytes and some of the writes after them.
type inode struct {
	data       []byte // current bytes written
	size       int    // the file's size: more than len(data) when preallocated (zeros)
	syncedLen  int    // bytes fsynced
	syncedSize int    // file size made durable by the last fsync
	writes     []int  // ends of the writes since the last fsync, in order
	mtime      time.Time
}

type dirOp struct {
	kind     string // create, rename, remove
	from, to string
	ino      *inode
}

func newFileSystem(w *World) *fileSystem {
	return &fileSystem{w: w, files: map[string]*inode{}, durable: map[string]*inode{}, locks: map[string]int{}}
}

// handle is the file system as one process incarnation sees it.
func (fs *fileSystem) handle() receiver.FS { return &fsHandle{fs: fs, gen: fs.gen} }

// crash loses what a crash may lose and kills every handle.
func (fs *fileSystem) crash() {
	fs.gen++
	fs.dying = false
	fs.locks = map[string]int{}
	// The namespace: the durable one plus a prefix of the journal.
	ns := map[string]*inode{}
	for k, v := range fs.durable {
		ns[k] = v
	}
	keep := fs.w.rng.IntN(len(fs.journal) + 1)
	for _, op := range fs.journal[:keep] {
		apply(ns, op)
	}
	fs.files, fs.durable, fs.journal = ns, copyNS(ns), nil
	// File data: fsynced bytes plus a prefix of the later writes.
	seen := map[*inode]bool{}
	for _, n := range sortedNames(ns) {
		ino := ns[n]
		if seen[ino] {
			continue
		}
		seen[ino] = true
		keep := ino.syncedLen
		if k := fs.w.rng.IntN(len(ino.writes) + 1); k > 0 {
			keep = ino.writes[k-1]
		}
		size := max(keep, ino.syncedSize)
		ino.data, ino.size, ino.syncedLen, ino.syncedSize, ino.writes = append([]byte(nil), ino.data[:keep]...), size, keep, size, nil
	}
}

func apply(ns map[string]*inode, op dirOp) {
	switch op.kind {
	case "create":
		ns[op.to] = op.ino
	case "rename":
		if ino, ok := ns[op.from]; ok {
			ns[op.to] = ino
			delete(ns, op.from)
		}
	case "remove":
		delete(ns, op.from)
	}
}

func copyNS(ns map[string]*inode) map[string]*inode {
	out := make(map[string]*inode, len(ns))
	for k, v := range ns {
		out[k] = v
	}
	return out
}

// count is how many files' names end with suffix.
func (fs *fileSystem) count(suffix string) int {
	n := 0
	for name := range fs.files {
		if strings.HasSuffix(name, suffix) {
			n++
		}
	}
	return n
}

func sortedNames(ns map[string]*inode) []string {
	out := make([]string, 0, len(ns))
	for k := range ns {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}

// durableBytes is what a crash right now keeps for certain of name's
// bytes: its fsynced prefix, if its entry is durable.
func (fs *fileSystem) durableBytes(name string) ([]byte, bool) {
	ino, ok := fs.durable[name]
	if !ok || fs.files[name] != ino {
		return nil, false
	}
	return ino.data[:ino.syncedLen], true
}

type fsHandle struct {
	fs  *fileSystem
	gen int
}

var _ receiver.FS = (*fsHandle)(nil)

func (h *fsHandle) live() error {
	if h.gen != h.fs.gen || h.fs.dying {
		return errDead
	}
	return nil
}

// mutate is the entry of every operation that changes the disk: the
// process may die right here, in the middle of whatever it was doing (the
// world completes the crash after the step).
func (h *fsHandle) mutate() error {
	if err := h.live(); err != nil {
		return err
	}
	if w := h.fs.w; w.faultsOn && w.rng.IntN(500) == 0 {
		h.fs.dying = true
		w.logf("the receiver dies in the middle of a file operation")
		return errDead
	}
	return nil
}

func (h *fsHandle) MkdirAll(dir string) error { return h.live() }

func (h *fsHandle) Create(name string, size int64) (receiver.File, error) {
	if err := h.mutate(); err != nil {
		return nil, err
	}
	if h.fs.w.diskFull {
		return nil, errDiskFull // fallocate
	}
	fs := h.fs
	ino := &inode{size: int(size), mtime: fs.w.now}
	fs.files[name] = ino
	fs.journal = append(fs.journal, dirOp{kind: "create", to: name, ino: ino})
	return &simFile{h: h, ino: ino}, nil
}

func (h *fsHandle) Open(name string) (io.ReadCloser, error) {
	if err := h.live(); err != nil {
		return nil, err
	}
	ino, ok := h.fs.files[name]
	if !ok {
		return nil, fmt.Errorf("open %s: %w", name, os.ErrNotExist)
	}
	return io.NopCloser(io.MultiReader(bytes.NewReader(ino.data), &zeros{n: ino.size - len(ino.data)})), nil
}

func (h *fsHandle) ReadDir(dir string) ([]receiver.FileInfo, error) {
	if err := h.live(); err != nil {
		return nil, err
	}
	var out []receiver.FileInfo
	for _, n := range sortedNames(h.fs.files) {
		if path.Dir(n) == dir {
			ino := h.fs.files[n]
			out = append(out, receiver.FileInfo{Name: path.Base(n), Size: int64(max(ino.size, len(ino.data))), ModTime: ino.mtime})
		}
	}
	return out, nil
}

func (h *fsHandle) Rename(from, to string) error {
	if err := h.mutate(); err != nil {
		return err
	}
	fs := h.fs
	ino, ok := fs.files[from]
	if !ok {
		return fmt.Errorf("rename %s: %w", from, os.ErrNotExist)
	}
	if old, ok := fs.files[to]; ok && old != ino && fs.onRemove != nil {
		fs.onRemove(to, old.content(), ino.content())
	}
	fs.files[to] = ino
	delete(fs.files, from)
	fs.journal = append(fs.journal, dirOp{kind: "rename", from: from, to: to})
	return nil
}

func (h *fsHandle) Remove(name string) error {
	if err := h.mutate(); err != nil {
		return err
	}
	fs := h.fs
	ino, ok := fs.files[name]
	if !ok {
		return nil
	}
	if fs.onRemove != nil {
		fs.onRemove(name, ino.content(), nil)
	}
	delete(fs.files, name)
	fs.journal = append(fs.journal, dirOp{kind: "remove", from: name})
	return nil
}

func (h *fsHandle) SyncDir(dir string) error {
	if err := h.mutate(); err != nil {
		return err
	}
	fs := h.fs
	for _, op := range fs.journal {
		apply(fs.durable, op)
	}
	fs.journal = nil
	return nil
}

func (h *fsHandle) WriteFile(name string, data []byte) error {
	if err := h.mutate(); err != nil {
		return err
	}
	if h.fs.w.diskFull {
		return errDiskFull
	}
	fs := h.fs
	ino := &inode{data: append([]byte(nil), data...), size: len(data), syncedLen: len(data), syncedSize: len(data), mtime: fs.w.now}
	if old, ok := fs.files[name]; ok && fs.onRemove != nil {
		fs.onRemove(name, old.content(), data)
	}
	fs.files[name] = ino
	fs.journal = append(fs.journal, dirOp{kind: "create", to: name, ino: ino})
	return h.SyncDir(path.Dir(name))
}

func (h *fsHandle) Lock(name string) (io.Closer, error) {
	if err := h.live(); err != nil {
		return nil, err
	}
	if g, ok := h.fs.locks[name]; ok && g == h.fs.gen {
		return nil, fsutil.ErrLocked
	}
	h.fs.locks[name] = h.gen
	return closer(func() {
		if h.fs.locks[name] == h.gen {
			delete(h.fs.locks, name)
		}
	}), nil
}

type closer func()

func (c closer) Close() error { c(); return nil }

type simFile struct {
	h   *fsHandle
	ino *inode
	off int64
}

func (f *simFile) Write(p []byte) (int, error) {
	if err := f.h.mutate(); err != nil {
		return 0, err
	}
	if f.h.fs.w.diskFull {
		return 0, errDiskFull
	}
	end := f.off + int64(len(p))
	if end > int64(len(f.ino.data)) {
		f.ino.data = append(f.ino.data, make([]byte, end-int64(len(f.ino.data)))...)
	}
	copy(f.ino.data[f.off:], p)
	f.ino.size = max(f.ino.size, int(end))
	f.ino.writes = append(f.ino.writes, int(end))
	f.ino.mtime = f.h.fs.w.now
	f.off = end
	return len(p), nil
}

func (f *simFile) Sync() error {
	if err := f.h.mutate(); err != nil {
		return err
	}
	if f.h.fs.w.diskFull && f.h.fs.w.rng.IntN(2) == 0 {
		return errDiskFull // delayed allocation fails at fsync: nothing new is durable
	}
	if n := len(f.ino.writes); n > 0 {
		f.ino.syncedLen = f.ino.writes[n-1]
	}
	f.ino.syncedSize = f.ino.size // the preallocated size too
	f.ino.writes = nil
	return nil
}

func (f *simFile) Close() error { return nil }

// content is the file's bytes, its preallocated tail included.
func (ino *inode) content() []byte {
	if ino.size <= len(ino.data) {
		return ino.data
	}
	out := make([]byte, ino.size)
	copy(out, ino.data)
	return out
}

// zeros reads n zero bytes: a preallocated file's unwritten tail.
type zeros struct{ n int }

func (z *zeros) Read(p []byte) (int, error) {
	if z.n == 0 {
		return 0, io.EOF
	}
	k := min(len(p), z.n)
	clear(p[:k])
	z.n -= k
	return k, nil
}
