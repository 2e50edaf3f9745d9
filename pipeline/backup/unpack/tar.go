package unpack

import (
	"archive/tar"
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"path"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
)

// ErrUnsafe marks a tar entry that restore refuses to write: a path that
// leaves the target, an absolute path, a link or device PostgreSQL's tar
// never holds.
var ErrUnsafe = errors.New("unsafe tar entry")

// tablespaceLink is the only symlink a PostgreSQL base tar holds (when
// the backup was taken without TABLESPACE_MAP).
var tablespaceLink = regexp.MustCompile(`^pg_tblspc/[0-9]+$`)

var copyBufs = sync.Pool{New: func() any { b := make([]byte, 256<<10); return &b }}

// extractor writes one tar stream under root.
type extractor struct {
	root   string // directory the archive's entries are relative to
	prefix string // manifest path of root: "" for base, "pg_tblspc/<oid>/"
	base   bool
	v      *verifier
	// mapTablespaceMap rewrites tablespace_map (base only; nil: keep).
	mapTablespaceMap func([]byte) ([]byte, error)
	// linkTarget maps a pg_tblspc/<oid> symlink's target (base only).
	linkTarget func(oid, target string) string
	links      map[string]bool
	dropped    []string // entries verified but not written (signal files)
	files      int
	bytes      int64
}

// cleanName checks and normalises an entry name.
func cleanName(name string) (string, error) {
	n := strings.TrimPrefix(name, "./")
	n = strings.TrimSuffix(n, "/")
	if n == "" || n == "." {
		return "", nil
	}
	if strings.HasPrefix(n, "/") || filepath.IsAbs(n) {
		return "", fmt.Errorf("%w: %q is absolute", ErrUnsafe, name)
	}
	for _, el := range strings.Split(n, "/") {
		if el == ".." || el == "" || el == "." || strings.ContainsRune(el, 0) {
			return "", fmt.Errorf("%w: %q", ErrUnsafe, name)
		}
	}
	return path.Clean(n), nil
}

// run extracts every entry of r.
func (x *extractor) run(r io.Reader) error {
	x.links = map[string]bool{}
	tr := tar.NewReader(r)
	for {
		h, err := tr.Next()
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return fmt.Errorf("read tar: %w", err)
		}
		name, err := cleanName(h.Name)
		if err != nil {
			return err
		}
		if name == "" {
			continue
		}
		for l := range x.links {
			if strings.HasPrefix(name, l+"/") {
				return fmt.Errorf("%w: %q lies under the symlink %s", ErrUnsafe, h.Name, l)
			}
		}
		dst := filepath.Join(x.root, filepath.FromSlash(name))
		perm := os.FileMode(h.Mode) & 0o777
		switch h.Typeflag {
		case tar.TypeDir:
			if err := x.mkdir(dst, perm|0o700); err != nil {
				return err
			}
		case tar.TypeReg, tar.TypeRegA:
			if err := x.file(tr, name, dst, h.Size, perm|0o600); err != nil {
				return err
			}
		case tar.TypeSymlink:
			if !x.base || !tablespaceLink.MatchString(name) || !filepath.IsAbs(h.Linkname) {
				return fmt.Errorf("%w: symlink %q -> %q (PostgreSQL's tar holds only pg_tblspc/<oid> -> an absolute path)", ErrUnsafe, h.Name, h.Linkname)
			}
			target := h.Linkname
			if x.linkTarget != nil {
				target = x.linkTarget(path.Base(name), target)
			}
			if err := os.MkdirAll(filepath.Dir(dst), 0o700); err != nil {
				return err
			}
			if err := os.Symlink(target, dst); err != nil {
				return err
			}
			x.links[name] = true
		default:
			return fmt.Errorf("%w: %q has tar type %q", ErrUnsafe, h.Name, h.Typeflag)
		}
	}
}

func (x *extractor) mkdir(dst string, perm os.FileMode) error {
	if err := os.MkdirAll(filepath.Dir(dst), 0o700); err != nil {
		return err
	}
	err := os.Mkdir(dst, perm)
	if errors.Is(err, os.ErrExist) {
		fi, serr := os.Lstat(dst)
		if serr != nil || !fi.IsDir() {
			return fmt.Errorf("%w: %s exists and is not a directory", ErrUnsafe, dst)
		}
		return os.Chmod(dst, perm)
	}
	return err
}

// file writes one regular file, computing its manifest checksum on the way.
func (x *extractor) file(r io.Reader, name, dst string, size int64, perm os.FileMode) error {
	mpath := x.prefix + name
	sum := x.v.begin(mpath)
	if err := os.MkdirAll(filepath.Dir(dst), 0o700); err != nil {
		return err
	}
	if x.base && name == "tablespace_map" && x.mapTablespaceMap != nil {
		orig, err := io.ReadAll(io.LimitReader(r, 1<<20))
		if err != nil {
			return fmt.Errorf("read tablespace_map: %w", err)
		}
		if sum != nil {
			sum.Write(orig)
		}
		x.v.end(mpath, int64(len(orig)), sum)
		mapped, err := x.mapTablespaceMap(orig)
		if err != nil {
			return err
		}
		return x.write(dst, bytes.NewReader(mapped), int64(len(mapped)), perm, nil)
	}
	if x.base && signalFile(name) {
		// Verified against the manifest, never written: a backup taken on
		// a standby carries standby.signal, which would keep the restored
		// server a standby; WriteRecovery writes recovery.signal.
		n, err := io.Copy(io.Discard, io.TeeReader(io.LimitReader(r, size), sumWriter(sum)))
		if err != nil {
			return fmt.Errorf("read %s: %w", name, err)
		}
		if n != size {
			return fmt.Errorf("restore %s: the tar stream ends after %d of its %d bytes", name, n, size)
		}
		x.v.end(mpath, n, sum)
		x.dropped = append(x.dropped, name)
		return nil
	}
	n, err := x.writeN(dst, r, size, perm, sum)
	if err != nil {
		return err
	}
	x.v.end(mpath, n, sum)
	return nil
}

// signalFile reports whether a data directory entry is one of the files
// that tell PostgreSQL how to start: restore writes its own.
func signalFile(name string) bool { return name == "standby.signal" || name == "recovery.signal" }

// sumWriter is sum as a writer; io.Discard when there is no checksum.
func sumWriter(sum *checksum) io.Writer {
	if sum == nil {
		return io.Discard
	}
	return sum
}

func (x *extractor) write(dst string, r io.Reader, size int64, perm os.FileMode, sum *checksum) error {
	_, err := x.writeN(dst, r, size, perm, sum)
	return err
}

func (x *extractor) writeN(dst string, r io.Reader, size int64, perm os.FileMode, sum *checksum) (int64, error) {
	f, err := os.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_EXCL|noFollow, perm)
	if err != nil {
		return 0, fmt.Errorf("restore %s: %w", dst, err)
	}
	var w io.Writer = f
	if sum != nil {
		w = io.MultiWriter(f, sum)
	}
	bp := copyBufs.Get().(*[]byte)
	n, err := io.CopyBuffer(w, io.LimitReader(r, size), *bp)
	copyBufs.Put(bp)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return n, fmt.Errorf("restore %s: %w", dst, err)
	}
	if n != size {
		return n, fmt.Errorf("restore %s: the tar stream ends after %d of its %d bytes", dst, n, size)
	}
	x.files++
	x.bytes += n
	return n, nil
}

// parseTablespaceMap reads tablespace_map: "<oid> <path>" per line, the
// path with '\\', '\n' and '\r' escaped by a backslash (PostgreSQL 15).
func parseTablespaceMap(b []byte) (oids, paths []string, err error) {
	s := string(b)
	for len(s) > 0 {
		sp := strings.IndexByte(s, ' ')
		if sp <= 0 {
			return nil, nil, fmt.Errorf("tablespace_map: malformed line %q", firstLine(s))
		}
		oid := s[:sp]
		s = s[sp+1:]
		var p strings.Builder
		i := 0
		for ; i < len(s); i++ {
			c := s[i]
			if c == '\\' && i+1 < len(s) {
				i++
				p.WriteByte(s[i])
				continue
			}
			if c == '\n' {
				break
			}
			p.WriteByte(c)
		}
		if i < len(s) {
			i++
		}
		s = s[i:]
		lp := strings.TrimSuffix(p.String(), "\r")
		oids, paths = append(oids, oid), append(paths, lp)
	}
	return oids, paths, nil
}

func firstLine(s string) string {
	if i := strings.IndexByte(s, '\n'); i >= 0 {
		return s[:i]
	}
	return s
}

// formatTablespaceMap writes what parseTablespaceMap reads.
func formatTablespaceMap(oids, paths []string) []byte {
	var b strings.Builder
	for i := range oids {
		b.WriteString(oids[i])
		b.WriteByte(' ')
		for _, c := range []byte(paths[i]) {
			if c == '\\' || c == '\n' || c == '\r' {
				b.WriteByte('\\')
			}
			b.WriteByte(c)
		}
		b.WriteByte('\n')
	}
	return []byte(b.String())
}
