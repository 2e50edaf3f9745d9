// Package unpack restores a walship base backup from the sink into a
// data directory: it finds the backup's catalogue, downloads and decodes
// its chunks in parallel, checks every chunk's and archive's SHA-256,
// streams each tar archive into its directory without holding it in
// memory or on disk, verifies every file against the backup manifest as
// pg_verifybackup does, and writes the recovery configuration.
package unpack

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"path"
	"sort"
	"strings"

	"github.com/walship/walship/pipeline/backup"
	"github.com/walship/walship/sinks"
)

// ErrIncomplete marks a backup that has no catalogue: in progress, or one
// that failed.
var ErrIncomplete = errors.New("not complete")

// ErrNoBackup marks a sink that holds no complete backup (for "latest").
var ErrNoBackup = errors.New("no complete backup")

// maxCatalog bounds a catalogue object's size (a backup of a large
// cluster with small chunks has some ten thousand chunks).
const maxCatalog = 256 << 20

// Store is what finding and restoring a backup need from the sink.
type Store interface {
	sinks.Sink
	sinks.Lister
}

// Find returns the catalogue of backup id under prefix (the layout's
// BackupPrefix), or with id "latest" the newest complete backup whose
// catalogue validates. Newest is by position in the WAL — the timeline the
// backup ended on, then its end LSN — which no host's clock moves (an ID
// and an end time are the backup host's clock). Catalogues that do not
// decode, and catalogues under a directory that is not a backup ID (a
// newer walship's, a copy under another name), are skipped by "latest"
// and reported in skipped.
func Find(ctx context.Context, st Store, prefix, id string) (cat backup.Catalog, skipped []string, err error) {
	if id != "latest" {
		if _, err := backup.ParseID(id); err != nil {
			return cat, nil, err
		}
		cat, err := readCatalog(ctx, st, prefix, id)
		if errors.Is(err, os.ErrNotExist) {
			if _, serr := st.Head(ctx, backup.StartedKey(prefix, id)); serr == nil {
				return cat, nil, fmt.Errorf("backup %s is %w (no catalogue): it is in progress or it failed; %s exists, %s does not", id, ErrIncomplete, backup.StartedKey(prefix, id), backup.CatalogKey(prefix, id))
			}
			return cat, nil, fmt.Errorf("backup %s is not in the bucket (no %s; walship backup list shows the backups): %w", id, backup.CatalogKey(prefix, id), os.ErrNotExist)
		}
		return cat, nil, err
	}
	ids, odd, err := completeIDs(ctx, st, prefix)
	if err != nil {
		return cat, nil, err
	}
	for _, k := range odd {
		skipped = append(skipped, fmt.Sprintf("%s: not under a backup ID this build reads (like 20261129T210000Z): a newer walship's, or a copy under another name", k))
	}
	found := false
	for _, id := range ids {
		c, err := readCatalog(ctx, st, prefix, id)
		if ctx.Err() != nil {
			return cat, skipped, ctx.Err()
		}
		if err != nil {
			skipped = append(skipped, fmt.Sprintf("%s: %v", id, err))
			continue
		}
		if !found || c.EndsAfter(&cat) {
			cat, found = c, true
		}
	}
	if !found {
		return cat, skipped, fmt.Errorf("%w under %s", ErrNoBackup, prefix)
	}
	return cat, skipped, nil
}

// completeIDs lists the IDs that have a catalogue, in ID order, and the
// keys of catalogues under a directory that is not a backup ID.
func completeIDs(ctx context.Context, st Store, prefix string) (ids, odd []string, err error) {
	err = st.List(ctx, prefix, func(o sinks.Object) error {
		rest := strings.TrimPrefix(o.Key, prefix)
		if path.Base(rest) != backup.CatalogFile {
			return nil
		}
		id, file, ok := strings.Cut(rest, "/")
		if _, err := backup.ParseID(id); err != nil {
			odd = append(odd, o.Key)
		} else if ok && file == backup.CatalogFile {
			ids = append(ids, id)
		}
		return nil
	})
	if err != nil {
		return nil, nil, fmt.Errorf("list %s: %w", prefix, err)
	}
	sort.Strings(ids)
	sort.Strings(odd)
	return ids, odd, nil
}

// readCatalog reads, decodes and validates one catalogue.
func readCatalog(ctx context.Context, st sinks.Sink, prefix, id string) (backup.Catalog, error) {
	key := backup.CatalogKey(prefix, id)
	rc, meta, err := st.Get(ctx, key)
	if err != nil {
		return backup.Catalog{}, err
	}
	defer rc.Close()
	var buf bytes.Buffer
	if _, err := buf.ReadFrom(io.LimitReader(rc, maxCatalog+1)); err != nil {
		return backup.Catalog{}, fmt.Errorf("read %s: %w", key, err)
	}
	if buf.Len() > maxCatalog {
		return backup.Catalog{}, fmt.Errorf("%s: larger than %d bytes: not a catalogue", key, maxCatalog)
	}
	if sum := sha256.Sum256(buf.Bytes()); meta.SHA256 != "" && meta.SHA256 != hex.EncodeToString(sum[:]) {
		return backup.Catalog{}, fmt.Errorf("%s: its bytes do not match the SHA-256 in its metadata", key)
	}
	cat, err := backup.DecodeCatalog(buf.Bytes())
	if err != nil {
		return cat, fmt.Errorf("%s: %w", key, err)
	}
	if cat.ID != id {
		return cat, fmt.Errorf("%s: the catalogue names backup %s", key, cat.ID)
	}
	return cat, nil
}
