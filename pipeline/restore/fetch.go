// Package restore reads walship's archive back: Fetcher serves one WAL file
// to PostgreSQL's restore_command, verified, with prefetch of the segments
// that follow; Verify walks an archive for gaps, broken history chains and
// bad objects.
package restore

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync"

	"filippo.io/age"

	"github.com/walship/walship/compress"
	"github.com/walship/walship/crypt"
	"github.com/walship/walship/internal/fsutil"
	"github.com/walship/walship/pipeline"
	"github.com/walship/walship/sinks"
)

// ErrNotFound means the archive does not have the file: PostgreSQL treats
// that as the end of the archived WAL. Fetcher returns it only once the
// archive is confirmed to be this cluster's (Fetcher.Identity).
var ErrNotFound = errors.New("not in the archive")

// ErrCorrupt means the archive has the file but its bytes or metadata fail
// verification. It is never reported as not found: recovery must stop
// rather than end early on a shortened history.
var ErrCorrupt = errors.New("corrupt in the archive")

// ErrWrongArchive means the destination does not hold this cluster's
// archive: no identity object (wrong --dest, --server or --layout, an
// unmounted directory), or one that names another system. "Not found"
// from such a destination would end recovery early, so it is an abort.
var ErrWrongArchive = errors.New("not this cluster's archive")

// ErrCannotDecrypt means the archive has the file, encrypted, and this
// fetch cannot decrypt it: no identity given, none of the identities is a
// recipient, or an unknown scheme. It is never "not found": recovery must
// stop, and the operator give the right --decrypt-identity.
var ErrCannotDecrypt = errors.New("cannot decrypt")

// errVanished is a GET that found nothing after a HEAD found the object: a
// retention job or a lagging replica of the store. Transient.
var errVanished = errors.New("object vanished between HEAD and GET")

// Fetcher finds, downloads, decompresses and verifies WAL files. It is
// safe for concurrent use.
type Fetcher struct {
	Sink   sinks.Sink
	Layout sinks.Layout
	// Codecs are tried in order when looking a file up; the archiver's
	// codec first saves requests.
	Codecs []compress.Codec
	// AllowPartial serves <segment>.partial when the full segment is not
	// archived (the last segment of a timeline that ended), else the WAL
	// of the segment being written that its ranges hold. The prefetcher
	// never uses it: a prefetched file is always a whole segment.
	AllowPartial bool
	// Identities decrypt objects written with client-side encryption
	// (walship-encryption: age); objects without it need none.
	Identities []age.Identity
	// SystemID is the restored cluster's system identifier (decimal, from
	// its pg_control); "" when fetch runs outside a data directory, and
	// then the archive's identity object decides.
	SystemID string

	mu       sync.Mutex
	identity *sinks.Identity // confirmed
}

// Identity confirms, once per Fetcher, that the destination holds this
// cluster's archive: the identity object exists and, when SystemID is
// known, names the same system. A missing or foreign identity wraps
// ErrWrongArchive; other errors (the store unreachable) are transient.
func (f *Fetcher) Identity(ctx context.Context) (sinks.Identity, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.identity != nil {
		return *f.identity, nil
	}
	id, err := sinks.ReadIdentity(ctx, f.Sink, f.Layout)
	if errors.Is(err, sinks.ErrNoIdentity) {
		return sinks.Identity{}, fmt.Errorf("%w: %v: check --dest, --server and --layout (is the archive mounted?)", ErrWrongArchive, err)
	}
	if err != nil {
		return sinks.Identity{}, err
	}
	if f.SystemID != "" && id.SystemID != f.SystemID {
		return sinks.Identity{}, fmt.Errorf("%w: %s belongs to system %s, this cluster (pg_control) is %s: check --dest and --server",
			ErrWrongArchive, f.Layout.IdentityKey(), id.SystemID, f.SystemID)
	}
	f.identity = &id
	return id, nil
}

// expect is what served bytes must match: pg_control's system identifier,
// or the identity object's when there is no pg_control.
func (f *Fetcher) expect(ctx context.Context) (Expect, error) {
	if f.SystemID != "" {
		f.mu.Lock()
		defer f.mu.Unlock()
		e := Expect{SystemID: f.SystemID}
		if f.identity != nil {
			e.SegmentSize = pipeline.SegmentSize(f.identity.SegmentSize)
		}
		return e, nil
	}
	id, err := f.Identity(ctx)
	if err != nil {
		return Expect{}, err
	}
	return Expect{SystemID: id.SystemID, SegmentSize: pipeline.SegmentSize(id.SegmentSize)}, nil
}

// Found is a located archive object.
type Found struct {
	File  string // the WAL file the object holds: name, or name.partial
	Key   string
	Codec compress.Codec
	Meta  sinks.Metadata
}

// Locate finds the object for a WAL file name: the file itself, else with
// AllowPartial its .partial. Before it answers ErrNotFound it confirms the
// archive's identity, so a misconfigured destination aborts instead.
func (f *Fetcher) Locate(ctx context.Context, name string) (Found, error) {
	return f.locate(ctx, name, f.AllowPartial)
}

func (f *Fetcher) locate(ctx context.Context, name string, allowPartial bool) (Found, error) {
	names := []string{name}
	if allowPartial && pipeline.IsSegmentName(name) {
		names = append(names, name+".partial")
	}
	for _, n := range names {
		for _, c := range f.Codecs {
			key := f.Layout.Key(n, c.Ext())
			meta, err := f.Sink.Head(ctx, key)
			if err == nil {
				return Found{File: n, Key: key, Codec: c, Meta: meta}, nil
			}
			if !errors.Is(err, os.ErrNotExist) {
				return Found{}, err
			}
		}
	}
	if _, err := f.Identity(ctx); err != nil {
		return Found{}, err
	}
	return Found{}, fmt.Errorf("%s: %w", name, ErrNotFound)
}

// Download reads a located object and returns its verified raw bytes (a
// .partial zero-padded to a whole segment).
func (f *Fetcher) Download(ctx context.Context, fo Found) ([]byte, error) {
	if err := CheckMeta(fo.Key, fo.Meta); err != nil {
		return nil, err
	}
	want, err := f.expect(ctx)
	if err != nil {
		return nil, err
	}
	rc, meta, err := f.Sink.Get(ctx, fo.Key)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil, fmt.Errorf("%s: %w", fo.Key, errVanished)
		}
		return nil, err
	}
	defer rc.Close()
	if err := CheckMeta(fo.Key, meta); err != nil {
		return nil, err
	}
	var buf bytes.Buffer
	buf.Grow(int(meta.RawSize/2) + bytes.MinRead)
	// No WAL file compresses to more than its raw size plus framing.
	n, err := buf.ReadFrom(io.LimitReader(rc, maxRawSize+1<<20+1))
	if err != nil {
		if strings.Contains(err.Error(), "checksum did not match") {
			// The server's stored CRC32C disagrees with the bytes it sent.
			return nil, fmt.Errorf("%w: %s: %v", ErrCorrupt, fo.Key, err)
		}
		return nil, fmt.Errorf("read %s: %w", fo.Key, err)
	}
	if n > maxRawSize+1<<20 {
		return nil, fmt.Errorf("%w: %s is larger than any WAL file", ErrCorrupt, fo.Key)
	}
	raw, err := open(fo.Key, fo.Codec, buf.Bytes(), meta, f.Identities)
	if err != nil {
		return nil, err
	}
	return Check(fo.File, raw, meta, want)
}

// open turns a stored body back into raw WAL: decrypt (when the metadata
// names a scheme), then decompress. The caller then checks the raw bytes
// against the metadata's SHA-256, which is always the raw WAL's. An
// object that cannot be decrypted with the identities wraps
// ErrCannotDecrypt; one that fails decryption's authentication or
// decompression wraps ErrCorrupt.
func open(key string, c compress.Codec, body []byte, meta sinks.Metadata, ids []age.Identity) ([]byte, error) {
	plain, err := crypt.Decrypt(meta.Encryption, body, ids)
	switch {
	case errors.Is(err, crypt.ErrNoIdentity) || errors.Is(err, crypt.ErrWrongKey) || errors.Is(err, crypt.ErrUnknownScheme):
		return nil, fmt.Errorf("%w %s: %w", ErrCannotDecrypt, key, err)
	case err != nil:
		return nil, fmt.Errorf("%w: %s: %v", ErrCorrupt, key, err)
	}
	raw, err := compress.Decode(c, plain, int(meta.RawSize))
	if err != nil {
		return nil, fmt.Errorf("%w: %s: %v", ErrCorrupt, key, err)
	}
	return raw, nil
}

// Fetch serves one WAL file into dest, atomically: a temporary file in
// dest's directory, fsynced, then renamed.
func (f *Fetcher) Fetch(ctx context.Context, name, dest string) error {
	raw, err := f.Read(ctx, name)
	if err != nil {
		return err
	}
	return fsutil.WriteFile(dest, raw, 0o600)
}

// Read returns one WAL file's verified bytes, in this order: the file
// itself; with AllowPartial, a segment's .partial, then the WAL its ranges
// hold from its start (see fromRanges), zero-padded to a whole segment.
func (f *Fetcher) Read(ctx context.Context, name string) ([]byte, error) {
	fo, err := f.Locate(ctx, name)
	if errors.Is(err, ErrNotFound) && f.AllowPartial && pipeline.IsSegmentName(name) {
		return f.fromRanges(ctx, name)
	}
	if err != nil {
		return nil, err
	}
	return f.Download(ctx, fo)
}

// Permanent reports whether err is final for a fetch: not found (after
// the identity check), corrupt, the wrong archive, or not decryptable. Anything else is
// transient and worth retrying.
func Permanent(err error) bool {
	return errors.Is(err, ErrNotFound) || errors.Is(err, ErrCorrupt) || errors.Is(err, ErrWrongArchive) || errors.Is(err, ErrCannotDecrypt)
}

// RemoveTemp removes the temporary files a killed fetch left beside dest
// (PostgreSQL runs one restore_command at a time, so none is in use).
func RemoveTemp(dest string) {
	dir, base := filepath.Dir(dest), filepath.Base(dest)
	entries, err := os.ReadDir(dir)
	if err != nil {
		return
	}
	prefix := fsutil.TempPrefix + base + "-"
	for _, e := range entries {
		if strings.HasPrefix(e.Name(), prefix) {
			os.Remove(filepath.Join(dir, e.Name()))
		}
	}
}
