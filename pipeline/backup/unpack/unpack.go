package unpack

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"hash"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"time"

	"filippo.io/age"
	"golang.org/x/sys/unix"

	"github.com/walship/walship/compress"
	"github.com/walship/walship/pipeline/backup"
	"github.com/walship/walship/pipeline/restore"
	"github.com/walship/walship/sinks"
)

// FailedFile is written into a target whose restore failed: the data
// directory is not usable (it has no recovery.signal), and this file says
// why. Remove the directory and restore again.
const FailedFile = "walship-restore.FAILED"

// ErrTarget marks a target directory that cannot be restored into (not
// empty, not a directory).
var ErrTarget = errors.New("target directory")

// Options configure a restore.
type Options struct {
	Sink       sinks.Sink
	Identities []age.Identity // to decrypt an encrypted backup
	Jobs       int            // chunks downloaded at once (default 4)
	// Tablespaces maps a tablespace's location on the server (the
	// catalogue's Location) to the directory it is restored into.
	Tablespaces map[string]string
	// RetryFor bounds how long each chunk is retried on transient errors
	// (an unreachable store; default 2 minutes).
	RetryFor time.Duration
	// NoSync skips the final syncfs of the target and tablespace
	// directories (PostgreSQL fsyncs its data directory itself when it
	// starts recovery from a backup_label).
	NoSync bool
}

// Result describes a finished restore.
type Result struct {
	Files       int
	Bytes       int64             // raw bytes written
	Tablespaces map[string]string // OID -> directory restored into
	Sync        time.Duration     // spent in the final syncfs
	// Dropped are the backup's files checked against the manifest but not
	// restored: standby.signal (a backup taken on a standby) or
	// recovery.signal. WriteRecovery writes recovery.signal.
	Dropped []string
}

// CheckTarget refuses a target that exists and is not an empty directory.
func CheckTarget(dir string) error {
	entries, err := os.ReadDir(dir)
	switch {
	case errors.Is(err, os.ErrNotExist):
		return nil
	case err != nil:
		return fmt.Errorf("%w %s: %v", ErrTarget, dir, err)
	case len(entries) > 0:
		return fmt.Errorf("%w %s is not empty: restore only into an empty or absent directory", ErrTarget, dir)
	}
	return nil
}

// TablespaceDirs returns where each tablespace of cat goes (OID ->
// directory), after checking that every mapping names a tablespace of
// the backup and every target is absolute.
func TablespaceDirs(cat backup.Catalog, mapping map[string]string) (map[string]string, error) {
	out := map[string]string{}
	used := map[string]bool{}
	var have []string
	for _, a := range cat.Archives[1:] {
		dir := a.Location
		if m, ok := mapping[a.Location]; ok {
			dir, used[a.Location] = m, true
		}
		if !filepath.IsAbs(dir) {
			return nil, fmt.Errorf("tablespace %s: directory %q is not absolute", a.Name, dir)
		}
		out[a.Name] = filepath.Clean(dir)
		have = append(have, a.Location)
	}
	seen := map[string]string{}
	for oid, d := range out {
		if other, dup := seen[d]; dup {
			return nil, fmt.Errorf("tablespaces %s and %s would both be restored into %s: map one elsewhere with --tablespace-mapping", other, oid, d)
		}
		seen[d] = oid
	}
	for old := range mapping {
		if !used[old] {
			list := strings.Join(have, ", ")
			if list == "" {
				list = "none"
			}
			return nil, fmt.Errorf("--tablespace-mapping %s: backup %s has no tablespace there (it has: %s)", old, cat.ID, list)
		}
	}
	return out, nil
}

// Restore unpacks backup cat into dir (created if absent, refused if not
// empty). On failure after it began writing, dir holds FailedFile and no
// recovery configuration: it must not be started.
func Restore(ctx context.Context, o Options, cat backup.Catalog, dir string) (*Result, error) {
	if err := cat.Validate(); err != nil {
		return nil, err
	}
	if cat.Encryption != "" && len(o.Identities) == 0 {
		return nil, fmt.Errorf("backup %s is encrypted (%s): give the identity file with --decrypt-identity", cat.ID, cat.Encryption)
	}
	if _, err := compress.ParseCodec(cat.Codec); err != nil {
		return nil, fmt.Errorf("backup %s: %v", cat.ID, err)
	}
	if o.Jobs < 1 {
		o.Jobs = 4
	}
	if o.RetryFor <= 0 {
		o.RetryFor = 2 * time.Minute
	}
	ts, err := TablespaceDirs(cat, o.Tablespaces)
	if err != nil {
		return nil, err
	}
	for _, d := range append([]string{dir}, values(ts)...) {
		if err := CheckTarget(d); err != nil {
			return nil, err
		}
	}
	r := &restorer{o: o, cat: cat}
	res, err := r.run(ctx, dir, ts)
	if err != nil {
		os.WriteFile(filepath.Join(dir, FailedFile), []byte(fmt.Sprintf("walship restore of backup %s failed at %s; do not start this data directory:\n%v\n", cat.ID, time.Now().UTC().Format(time.RFC3339), err)), 0o600)
		return nil, err
	}
	return res, nil
}

func values(m map[string]string) []string {
	var out []string
	for _, v := range m {
		out = append(out, v)
	}
	sort.Strings(out)
	return out
}

type restorer struct {
	o   Options
	cat backup.Catalog
}

func (r *restorer) run(ctx context.Context, dir string, ts map[string]string) (*Result, error) {
	for _, d := range append([]string{dir}, values(ts)...) {
		if err := os.MkdirAll(d, 0o700); err != nil {
			return nil, fmt.Errorf("%w %s: %v", ErrTarget, d, err)
		}
		if err := os.Chmod(d, 0o700); err != nil {
			return nil, fmt.Errorf("%w %s: %v", ErrTarget, d, err)
		}
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()

	// The manifest first: every file is checked against it as it is written.
	manifest, err := r.readArchive(ctx, r.cat.Manifest)
	if err != nil {
		return nil, err
	}
	m, err := ParseManifest(manifest)
	if err != nil {
		return nil, fmt.Errorf("backup %s: %w", r.cat.ID, err)
	}
	if r.cat.ManifestChecksum != "" && !strings.EqualFold(r.cat.ManifestChecksum, m.Checksum) {
		return nil, fmt.Errorf("backup %s: %w: its Manifest-Checksum is %s, the catalogue says %s", r.cat.ID, ErrVerify, m.Checksum, r.cat.ManifestChecksum)
	}
	v := newVerifier(m)

	var wg sync.WaitGroup
	defer wg.Wait()
	defer cancel()
	futures := r.fetchAll(ctx, &wg, r.cat.Archives)

	res := &Result{Tablespaces: ts}
	for _, a := range r.cat.Archives {
		x := &extractor{root: dir, v: v, base: a.Name == backup.ArchiveBase}
		if x.base {
			x.mapTablespaceMap = func(b []byte) ([]byte, error) { return mapTablespaceMap(b, ts) }
			x.linkTarget = func(oid, target string) string {
				if d, ok := ts[oid]; ok {
					return d
				}
				return target
			}
		} else {
			x.root, x.prefix = ts[a.Name], "pg_tblspc/"+a.Name+"/"
		}
		if err := r.extract(ctx, a, futures, x); err != nil {
			return nil, err
		}
		res.Files += x.files
		res.Bytes += x.bytes
		res.Dropped = append(res.Dropped, x.dropped...)
	}
	if err := v.finish(); err != nil {
		return nil, fmt.Errorf("backup %s: %w", r.cat.ID, err)
	}
	if err := os.WriteFile(filepath.Join(dir, "backup_manifest"), manifest, 0o600); err != nil {
		return nil, err
	}
	if !r.o.NoSync {
		start := time.Now()
		for _, d := range append([]string{dir}, values(ts)...) {
			if err := syncFS(d); err != nil {
				return nil, fmt.Errorf("sync %s: %w", d, err)
			}
		}
		res.Sync = time.Since(start)
	}
	return res, nil
}

// mapTablespaceMap points tablespace_map's entries at their new
// directories.
func mapTablespaceMap(b []byte, ts map[string]string) ([]byte, error) {
	oids, paths, err := parseTablespaceMap(b)
	if err != nil {
		return nil, err
	}
	for i, oid := range oids {
		d, ok := ts[oid]
		if !ok {
			return nil, fmt.Errorf("tablespace_map names tablespace %s, which the catalogue does not hold", oid)
		}
		paths[i] = d
	}
	return formatTablespaceMap(oids, paths), nil
}

// syncFS makes everything written under dir durable (syncfs(2)).
func syncFS(dir string) error {
	f, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer f.Close()
	return unix.Syncfs(int(f.Fd()))
}

// readArchive downloads a small archive (the manifest) into memory.
func (r *restorer) readArchive(ctx context.Context, a backup.Archive) ([]byte, error) {
	var buf bytes.Buffer
	h := sha256.New()
	for _, ch := range a.Chunks {
		data, err := r.chunk(ctx, ch)
		if err != nil {
			return nil, err
		}
		buf.Write(data)
		h.Write(data)
	}
	if err := checkArchive(r.cat.ID, a, int64(buf.Len()), h); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

func checkArchive(id string, a backup.Archive, n int64, h hash.Hash) error {
	if sum := hex.EncodeToString(h.Sum(nil)); n != a.Size || sum != a.SHA256 {
		return fmt.Errorf("%w: backup %s archive %s: %d bytes with SHA-256 %s, the catalogue says %d bytes with %s", restore.ErrCorrupt, id, a.Name, n, sum, a.Size, a.SHA256)
	}
	return nil
}

// extract streams archive a, whose chunks come next from futures, through
// x. The archive's SHA-256 is computed beside the extraction, a whole chunk
// at a time, so it costs no time on the sequential path.
func (r *restorer) extract(ctx context.Context, a backup.Archive, futures <-chan chan fetched, x *extractor) (err error) {
	chunks := make(chan []byte, r.o.Jobs)
	sum := make(chan []byte, 1)
	go func() {
		h := sha256.New()
		for b := range chunks {
			h.Write(b)
		}
		sum <- h.Sum(nil)
	}()
	var n int64
	cr := &chunkReader{ctx: ctx, futures: futures, left: len(a.Chunks), taken: func(b []byte) { n += int64(len(b)); chunks <- b }}
	defer func() {
		close(chunks)
		got := hex.EncodeToString(<-sum)
		if err == nil && (n != a.Size || got != a.SHA256) {
			err = fmt.Errorf("%w: backup %s archive %s: %d bytes with SHA-256 %s, the catalogue says %d bytes with %s", restore.ErrCorrupt, r.cat.ID, a.Name, n, got, a.Size, a.SHA256)
		}
	}()
	if err := x.run(cr); err != nil {
		if cr.err != nil {
			return cr.err // the chunk's own error names its object
		}
		return fmt.Errorf("backup %s archive %s: %w", r.cat.ID, a.Name, err)
	}
	// The tar's end-of-archive padding counts in the archive's SHA-256.
	if _, err := io.Copy(io.Discard, cr); err != nil {
		return err
	}
	return nil
}
