// Package restore reads walship's archive back: Fetcher serves one WAL file
// to PostgreSQL's restore_command, verified, with prefetch of the segments
// that follow; Verify walks an archive for gaps, broken history chains and
// bad objects.
package restore

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/walship/walship/compress"
	"github.com/walship/walship/internal/fsutil"
	"github.com/walship/walship/pipeline"
	"github.com/walship/walship/sinks"
)

// ErrNotFound means the archive does not have the file: PostgreSQL treats
// that as the end of the archived WAL.
var ErrNotFound = errors.New("not in the archive")

// ErrCorrupt means the archive has the file but its bytes fail
// verification. It is never reported as not found: recovery must stop
// rather than end early on a shortened history.
var ErrCorrupt = errors.New("corrupt in the archive")

// Fetcher finds, downloads, decompresses and verifies WAL files.
type Fetcher struct {
	Sink   sinks.Sink
	Layout sinks.Layout
	// Codecs are tried in order when looking a file up; the archiver's
	// codec first saves requests.
	Codecs []compress.Codec
	// AllowPartial serves <segment>.partial when the full segment is not
	// archived (the last segment of a timeline that ended).
	AllowPartial bool
	// Confirm, when set, is asked before answering "not found": S3 says
	// 404 for a missing bucket too, and a misconfiguration must not end
	// recovery early.
	Confirm func(context.Context) error
}

// Found is a located archive object.
type Found struct {
	Key   string
	Codec compress.Codec
	Meta  sinks.Metadata
}

// Locate finds the object for a WAL file name.
func (f *Fetcher) Locate(ctx context.Context, name string) (Found, error) {
	names := []string{name}
	if f.AllowPartial && pipeline.IsSegmentName(name) {
		names = append(names, name+".partial")
	}
	for _, n := range names {
		for _, c := range f.Codecs {
			key := f.Layout.Key(n, c.Ext())
			meta, err := f.Sink.Head(ctx, key)
			if err == nil {
				return Found{Key: key, Codec: c, Meta: meta}, nil
			}
			if !errors.Is(err, os.ErrNotExist) {
				return Found{}, err
			}
		}
	}
	if f.Confirm != nil {
		if err := f.Confirm(ctx); err != nil {
			return Found{}, err
		}
	}
	return Found{}, fmt.Errorf("%s: %w", name, ErrNotFound)
}

// Download reads an object and returns its verified raw bytes.
func (f *Fetcher) Download(ctx context.Context, name string, fo Found) ([]byte, error) {
	rc, meta, err := f.Sink.Get(ctx, fo.Key)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil, fmt.Errorf("%s: %w", name, ErrNotFound)
		}
		return nil, err
	}
	defer rc.Close()
	var buf bytes.Buffer
	buf.Grow(int(meta.RawSize/2) + bytes.MinRead)
	_, err = buf.ReadFrom(rc)
	body := buf.Bytes()
	if err != nil {
		if strings.Contains(err.Error(), "checksum did not match") {
			// The server's stored CRC32C disagrees with the bytes it sent.
			return nil, fmt.Errorf("%w: %s: %v", ErrCorrupt, fo.Key, err)
		}
		return nil, fmt.Errorf("read %s: %w", fo.Key, err)
	}
	raw, err := compress.Decode(fo.Codec, body, int(min(max(meta.RawSize, 0), 1<<30)))
	if err != nil {
		return nil, fmt.Errorf("%w: %s: %v", ErrCorrupt, fo.Key, err)
	}
	if err := Check(name, raw, meta); err != nil {
		return nil, err
	}
	return raw, nil
}

func decode(c compress.Codec, body []byte) ([]byte, error) { return compress.Decode(c, body, 0) }

// Check verifies raw bytes against the object's metadata: the SHA-256, and
// for a segment its WAL page headers.
func Check(name string, raw []byte, meta sinks.Metadata) error {
	if meta.SHA256 == "" {
		return fmt.Errorf("%w: %s has no walship-sha256 metadata, so it cannot be verified", ErrCorrupt, name)
	}
	sum := sha256.Sum256(raw)
	if got := pipeline.SHA256Hex(sum[:]); got != meta.SHA256 {
		return fmt.Errorf("%w: %s: sha256 %s, metadata says %s", ErrCorrupt, name, got, meta.SHA256)
	}
	base := strings.TrimSuffix(name, ".partial")
	if pipeline.IsSegmentName(base) {
		size := pipeline.SegmentSize(len(raw))
		if err := size.Validate(); err != nil {
			return fmt.Errorf("%w: %s: %v", ErrCorrupt, name, err)
		}
		seg, err := pipeline.ParseSegmentName(base, size)
		if err != nil {
			return fmt.Errorf("%w: %v", ErrCorrupt, err)
		}
		if err := pipeline.CheckSegmentPages(raw, seg, size); err != nil && !strings.HasSuffix(name, ".partial") {
			return fmt.Errorf("%w: %v", ErrCorrupt, err)
		}
	}
	return nil
}

// Fetch serves one WAL file into dest, atomically: a temporary file in
// dest's directory, fsynced, then renamed.
func (f *Fetcher) Fetch(ctx context.Context, name, dest string) error {
	fo, err := f.Locate(ctx, name)
	if err != nil {
		return err
	}
	raw, err := f.Download(ctx, name, fo)
	if err != nil {
		return err
	}
	return WriteFile(dest, raw)
}

// WriteFile writes data to path through a fsynced temporary file and a
// rename, then fsyncs the directory.
func WriteFile(path string, data []byte) error {
	dir := filepath.Dir(path)
	tmp, err := os.CreateTemp(dir, "."+filepath.Base(path)+".walship-tmp-*")
	if err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	_, err = tmp.Write(data)
	if err == nil {
		err = tmp.Sync()
	}
	if cerr := tmp.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp.Name(), path)
	}
	if err != nil {
		os.Remove(tmp.Name())
		return fmt.Errorf("write %s: %w", path, err)
	}
	return fsutil.SyncDir(dir)
}
