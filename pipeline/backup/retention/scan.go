// Package retention reads a server's backups back from the sink and
// decides what may go: it scans the backup catalogues and the WAL
// (Scan), computes each complete backup's recovery window (Window), plans
// a prune from a keep policy (NewPlan) and carries it out (Execute). It
// never deletes WAL that a kept backup — walship's, or another tool's in
// the same bucket — needs.
package retention

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"path"
	"sort"
	"strings"
	"time"

	"filippo.io/age"

	"github.com/walship/walship/compress"
	"github.com/walship/walship/pipeline"
	"github.com/walship/walship/pipeline/backup"
	"github.com/walship/walship/pipeline/restore"
	"github.com/walship/walship/sinks"
)

// Backup is one backup found under the layout's BackupPrefix: complete
// (its catalogue validates) or not (a start marker or chunks without one).
type Backup struct {
	ID       string
	Complete bool
	Catalog  *backup.Catalog // complete backups
	Started  *backup.Started // nil when the marker is missing or unreadable
	// StartedAt is the marker's start time, else the time the ID names.
	StartedAt time.Time
	// Objects are every key under <BackupPrefix><id>/, with Bytes their
	// stored size.
	Objects []sinks.Object
	Bytes   int64
	// Window is a complete backup's recovery window.
	Window *Window
	// CatalogStored is when the sink stored the catalogue (its clock, not
	// the backup host's); zero when the sink cannot tell.
	CatalogStored time.Time
}

// EndTime is when a complete backup ended; for others, StartedAt.
func (b *Backup) EndTime() time.Time {
	if b.Catalog != nil {
		return b.Catalog.EndTime
	}
	return b.StartedAt
}

// Foreign is a base backup another tool keeps in the same bucket: its WAL
// from StartLSN on is never deleted, and the backup itself never touched.
type Foreign struct {
	Tool     string       `json:"tool"` // "wal-g" or "barman-cloud"
	Key      string       `json:"key"`  // its catalogue object
	StartLSN pipeline.LSN `json:"start_lsn"`
	Timeline uint32       `json:"timeline"`
}

// walObject is one WAL object: a segment, a .partial, or a range of a
// segment being written.
type walObject struct {
	sinks.Object
	kind     pipeline.Kind
	seg      pipeline.Segment
	from, to uint64 // ranges: bytes of the segment
}

// State is what Scan found for one server.
type State struct {
	Layout  sinks.Layout
	SegSize pipeline.SegmentSize
	// Backups in ID order (oldest first).
	Backups []*Backup
	// Unreadable are catalogues that exist but do not decode (a newer
	// walship's, or damaged), and catalogues and start markers under a
	// directory that is not a backup ID. Prune refuses while there are any.
	Unreadable []string
	Foreign    []Foreign
	// ForeignErrors are other tools' catalogues that could not be read.
	ForeignErrors []string
	wal           []walObject // segments and .partial, by key
	ranges        []walObject
	histories     map[uint32][]pipeline.HistoryEntry
	// HistoryErrors are history files that could not be read: the
	// windows do not follow the timelines they would name.
	HistoryErrors []string
}

// Options tune Scan.
type Options struct {
	// Identities decrypt encrypted history files (the windows follow
	// timelines by them).
	Identities []age.Identity
}

// Scan lists and reads one server's backups, WAL and other tools'
// catalogues under layout.
func Scan(ctx context.Context, sink sinks.Sink, layout sinks.Layout, o Options) (*State, error) {
	lister, ok := sink.(sinks.Lister)
	if !ok {
		return nil, errors.New("this destination cannot be listed: retention needs a sink that lists (s3:// or file://)")
	}
	st := &State{Layout: layout, histories: map[uint32][]pipeline.HistoryEntry{}}
	if err := st.scanBackups(ctx, sink, lister); err != nil {
		return nil, err
	}
	id, err := sinks.ReadIdentity(ctx, sink, layout)
	switch {
	case err == nil:
		st.SegSize = pipeline.SegmentSize(id.SegmentSize)
	case !errors.Is(err, sinks.ErrNoIdentity):
		return nil, err
	}
	if st.SegSize.ValidateEvent() != nil { // the identity archivers write from events (the simulation's segments are small)
		st.SegSize = 0
		for _, b := range st.Backups {
			if b.Complete {
				st.SegSize = pipeline.SegmentSize(b.Catalog.SegSize)
			}
		}
	}
	var histKeys []walObject
	err = lister.List(ctx, layout.WALPrefix(), func(ob sinks.Object) error {
		name := path.Base(ob.Key)
		if ob.Key == layout.IdentityKey() {
			return nil
		}
		file, _ := compress.SplitExt(name)
		switch {
		case strings.HasSuffix(file, ".history"):
			if t, ok := pipeline.ParseHistoryFileName(file); ok {
				histKeys = append(histKeys, walObject{Object: ob, kind: pipeline.KindHistory, seg: pipeline.Segment{Timeline: t}})
			}
		case pipeline.IsSegmentName(strings.TrimSuffix(file, ".partial")):
			if st.SegSize == 0 {
				return fmt.Errorf("%s: cannot tell the WAL segment size (no identity object at %s and no backup catalogue)", ob.Key, layout.IdentityKey())
			}
			seg, err := pipeline.ParseSegmentName(strings.TrimSuffix(file, ".partial"), st.SegSize)
			if err != nil {
				return nil // not WAL of this cluster's segment size: left alone
			}
			kind := pipeline.KindSegment
			if strings.HasSuffix(file, ".partial") {
				kind = pipeline.KindPartial
			}
			st.wal = append(st.wal, walObject{Object: ob, kind: kind, seg: seg})
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("list %s: %w", layout.WALPrefix(), err)
	}
	root := layout.RangePrefix("")
	err = lister.List(ctx, root, func(ob sinks.Object) error {
		name, leaf, _ := strings.Cut(strings.TrimPrefix(ob.Key, root), "/")
		leaf, _ = compress.SplitExt(leaf)
		from, to, ok := pipeline.ParseRangeSuffix(leaf)
		if st.SegSize == 0 || !ok {
			return nil
		}
		seg, err := pipeline.ParseSegmentName(name, st.SegSize)
		if err != nil || to > uint64(st.SegSize) {
			return nil
		}
		st.ranges = append(st.ranges, walObject{Object: ob, kind: pipeline.KindRange, seg: seg, from: from, to: to})
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("list %s: %w", root, err)
	}
	for _, h := range histKeys {
		entries, err := readHistory(ctx, sink, h.Key, o.Identities)
		if err != nil {
			st.HistoryErrors = append(st.HistoryErrors, fmt.Sprintf("%s: %v", h.Key, err))
			continue
		}
		st.histories[h.seg.Timeline] = entries
	}
	if err := st.scanForeign(ctx, sink, lister); err != nil {
		return nil, err
	}
	for _, b := range st.Backups {
		if b.Complete {
			w := st.Window(b.Catalog)
			b.Window = &w
		}
	}
	return st, nil
}

// scanBackups lists BackupPrefix and reads every catalogue and marker.
func (st *State) scanBackups(ctx context.Context, sink sinks.Sink, lister sinks.Lister) error {
	prefix := st.Layout.BackupPrefix()
	byID := map[string]*Backup{}
	err := lister.List(ctx, prefix, func(ob sinks.Object) error {
		rest := strings.TrimPrefix(ob.Key, prefix)
		id, _, ok := strings.Cut(rest, "/")
		t, err := backup.ParseID(id)
		if !ok || err != nil {
			// A catalogue or marker under a directory that is not an ID
			// this build reads (a newer walship's ID format, a copy under
			// another name) is a backup whose WAL needs are unknown: it
			// makes prune refuse, never counts as absent. Other objects
			// here are not a backup's: left alone.
			if leaf := path.Base(rest); leaf == backup.CatalogFile || leaf == backup.StartedFile {
				st.Unreadable = append(st.Unreadable, ob.Key)
			}
			return nil
		}
		b := byID[id]
		if b == nil {
			b = &Backup{ID: id, StartedAt: t}
			byID[id] = b
		}
		b.Objects = append(b.Objects, ob)
		b.Bytes += ob.Size
		return nil
	})
	if err != nil {
		return fmt.Errorf("list %s: %w", prefix, err)
	}
	for id, b := range byID {
		for _, ob := range b.Objects {
			switch ob.Key {
			case backup.CatalogKey(prefix, id):
				data, err := readAll(ctx, sink, ob.Key)
				if err != nil {
					return err
				}
				c, err := backup.DecodeCatalog(data)
				if err != nil || c.ID != id {
					st.Unreadable = append(st.Unreadable, ob.Key)
					continue
				}
				b.Catalog, b.Complete, b.CatalogStored = &c, true, ob.Modified
			case backup.StartedKey(prefix, id):
				data, err := readAll(ctx, sink, ob.Key)
				if err != nil {
					return err
				}
				var s backup.Started
				if json.Unmarshal(data, &s) == nil && !s.StartTime.IsZero() {
					b.Started, b.StartedAt = &s, s.StartTime
				}
			}
		}
		st.Backups = append(st.Backups, b)
	}
	sort.Slice(st.Backups, func(i, j int) bool { return st.Backups[i].ID < st.Backups[j].ID })
	sort.Strings(st.Unreadable)
	return nil
}

// Complete is the complete backups, oldest first by where they end in the
// WAL (end timeline, then end LSN: backup.Catalog.EndsAfter), never by
// the backup host's clock.
func (st *State) Complete() []*Backup {
	var out []*Backup
	for _, b := range st.Backups {
		if b.Complete {
			out = append(out, b)
		}
	}
	sort.SliceStable(out, func(i, j int) bool { return out[j].Catalog.EndsAfter(out[i].Catalog) })
	return out
}

// futureSlack is how far ahead of now an end time may be before it is
// reported as the backup host's clock running ahead.
const futureSlack = time.Minute

// Future is the complete backups whose end time is later than now: taken
// on a host whose clock runs ahead. They are ordered by their WAL
// position all the same; this is for warnings.
func (st *State) Future(now time.Time) []*Backup {
	var out []*Backup
	for _, b := range st.Complete() {
		if b.EndTime().After(now.Add(futureSlack)) {
			out = append(out, b)
		}
	}
	return out
}

// FutureWarning says what a backup with an end time in the future means.
func FutureWarning(b *Backup, now time.Time) string {
	return fmt.Sprintf("backup %s ended at %s, %s after now by this host's clock: the clock of the host that took it runs ahead (it is ordered by its end LSN %s, not its time)",
		b.ID, b.EndTime().UTC().Format(time.RFC3339), b.EndTime().Sub(now).Round(time.Second), b.Catalog.EndLSN)
}

func readAll(ctx context.Context, sink sinks.Sink, key string) ([]byte, error) {
	rc, _, err := sink.Get(ctx, key)
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", key, err)
	}
	defer rc.Close()
	data, err := io.ReadAll(io.LimitReader(rc, 64<<20))
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", key, err)
	}
	return data, nil
}

// readHistory reads a history file as fetch does: decrypt, decompress,
// parse.
func readHistory(ctx context.Context, sink sinks.Sink, key string, ids []age.Identity) ([]pipeline.HistoryEntry, error) {
	rc, meta, err := sink.Get(ctx, key)
	if err != nil {
		return nil, err
	}
	body, err := io.ReadAll(io.LimitReader(rc, 1<<20))
	rc.Close()
	if err != nil {
		return nil, err
	}
	_, codec := compress.SplitExt(path.Base(key))
	raw, err := restore.Open(key, codec, body, meta, ids)
	if errors.Is(err, restore.ErrCannotDecrypt) {
		return nil, fmt.Errorf("%w (give --decrypt-identity)", err)
	}
	if err != nil {
		return nil, err
	}
	return pipeline.ParseHistory(raw)
}
