package retention

import (
	"context"
	"errors"
	"fmt"
	"os"
	"sort"
	"strings"
	"time"

	"github.com/walship/walship/pipeline"
	"github.com/walship/walship/pipeline/backup"
	"github.com/walship/walship/sinks"
)

// Policy is which backups to keep. A complete backup is kept when either
// rule keeps it.
type Policy struct {
	// Keep keeps the Keep newest complete backups that can be restored
	// onto the newest timeline (newest by end timeline and end LSN,
	// State.Complete). A broken backup (Window.Broken: the WAL from its
	// start to its end is not all in the bucket), or one whose window ends
	// on an older timeline than the newest any backup's window reaches (a
	// PITR branched off before its end), does not count: the newer such
	// ones are kept besides, so prune never leaves only backups that
	// cannot restore the timeline production runs on.
	Keep int
	// KeepWithin keeps every complete backup that ended within it of Now,
	// plus the newest one that ended before Now-KeepWithin and counts as
	// for Keep (and any newer ones that do not count), without which
	// recovery could not reach back to Now-KeepWithin.
	KeepWithin time.Duration
	// IncompleteAfter: a backup without a catalogue that started longer
	// ago than this is deleted; newer ones may be in progress.
	IncompleteAfter time.Duration
	Now             time.Time
}

// Validate checks the policy.
func (p Policy) Validate() error {
	switch {
	case p.Keep < 0 || p.KeepWithin < 0:
		return errors.New("--keep and --keep-within must not be negative")
	case p.Keep == 0 && p.KeepWithin == 0:
		return errors.New("say what to keep: --keep N (the N newest backups) and/or --keep-within DURATION (e.g. 7d)")
	case p.IncompleteAfter <= 0:
		return errors.New("--incomplete-after must be positive")
	}
	return nil
}

// Plan is what a prune deletes, and why.
type Plan struct {
	Keep             []*Backup // complete backups kept
	Delete           []*Backup // complete backups outside the policy
	DeleteIncomplete []*Backup // incomplete backups older than IncompleteAfter
	LeaveIncomplete  []*Backup // incomplete backups that may be in progress
	// Floor: WAL whose segment ends at or before it is deleted, on every
	// timeline; 0 deletes no WAL. It is the start of the segment holding
	// the oldest start LSN among the kept backups, other tools' backups
	// and backups in progress.
	Floor       pipeline.LSN
	FloorReason string
	// WAL are the WAL objects (segments, .partial, ranges) below Floor,
	// oldest first.
	WAL []sinks.Object
	// Note says why no WAL goes, when none does.
	Note string
	// Warnings are what an operator should look at: kept backups that
	// cannot be restored, end times in the future.
	Warnings []string
}

// NewPlan decides what a prune deletes. It refuses (an error) when the
// bucket holds a catalogue it cannot read — a newer walship's or another
// tool's — rather than guess what WAL that backup needs.
func NewPlan(st *State, p Policy) (*Plan, error) {
	if err := p.Validate(); err != nil {
		return nil, err
	}
	if len(st.Unreadable) > 0 {
		return nil, fmt.Errorf("refusing to prune: %s is a backup this build cannot read (a newer walship's, a copy under a name that is not a backup ID, or damaged), so the WAL it needs is unknown; move it out of %s or delete that backup by hand", st.Unreadable[0], st.Layout.BackupPrefix())
	}
	if len(st.ForeignErrors) > 0 {
		return nil, fmt.Errorf("refusing to prune: cannot tell what WAL another tool's backup needs: %s", st.ForeignErrors[0])
	}
	plan := &Plan{}
	complete := st.Complete() // oldest first, by WAL position
	keep := map[*Backup]bool{}
	broken := func(b *Backup) bool { return b.Window == nil || b.Window.Broken }
	// A backup counts when it restores onto the newest timeline any
	// backup's window reaches: one whose window stays on an older timeline
	// (a PITR branched off before its end) cannot restore what production
	// runs on now.
	var newest uint32
	for _, b := range complete {
		if !broken(b) && b.Window.Timeline > newest {
			newest = b.Window.Timeline
		}
	}
	counts := func(b *Backup) bool { return !broken(b) && b.Window.Timeline == newest }
	// Newest first: backups that do not count are kept but not counted.
	for i, n := len(complete)-1, 0; i >= 0 && n < p.Keep; i-- {
		keep[complete[i]] = true
		if counts(complete[i]) {
			n++
		}
	}
	if p.KeepWithin > 0 {
		cut := p.Now.Add(-p.KeepWithin)
		before := false
		for i := len(complete) - 1; i >= 0; i-- {
			b := complete[i]
			if !b.EndTime().Before(cut) {
				keep[b] = true
			} else if !before {
				keep[b], before = true, counts(b)
			}
		}
	}
	for _, b := range complete {
		if keep[b] {
			plan.Keep = append(plan.Keep, b)
			if broken(b) {
				plan.Warnings = append(plan.Warnings, st.brokenWarning(b))
			}
		} else {
			plan.Delete = append(plan.Delete, b)
		}
	}
	for _, b := range st.Future(p.Now) {
		plan.Warnings = append(plan.Warnings, FutureWarning(b, p.Now))
	}
	for _, b := range st.Backups {
		if b.Complete {
			continue
		}
		if p.Now.Sub(b.StartedAt) > p.IncompleteAfter {
			plan.DeleteIncomplete = append(plan.DeleteIncomplete, b)
		} else {
			plan.LeaveIncomplete = append(plan.LeaveIncomplete, b)
		}
	}
	if len(plan.Keep) == 0 {
		plan.Note = "no complete backup: no WAL deleted"
		return plan, nil
	}
	if st.SegSize == 0 {
		plan.Note = "the WAL segment size is unknown: no WAL deleted"
		return plan, nil
	}
	floor, why := pipeline.LSN(0), ""
	lower := func(l pipeline.LSN, reason string) {
		if l != 0 && (floor == 0 || l < floor) {
			floor, why = l, reason
		}
	}
	for _, b := range plan.Keep {
		lower(b.Catalog.StartLSN, "kept backup "+b.ID)
	}
	for _, f := range st.Foreign {
		lower(f.StartLSN, f.Tool+" backup "+f.Key)
	}
	for _, b := range plan.LeaveIncomplete {
		if b.Started != nil {
			lower(b.Started.StartLSN, "backup in progress "+b.ID)
		}
	}
	plan.Floor = st.SegSize.Start(floor)
	plan.FloorReason = fmt.Sprintf("%s starts at %s", why, floor)
	var wal []walObject
	for _, o := range append(append([]walObject(nil), st.wal...), st.ranges...) {
		if o.seg.EndLSN(st.SegSize) <= plan.Floor {
			wal = append(wal, o)
		}
	}
	sort.SliceStable(wal, func(i, j int) bool {
		if wal[i].seg.No != wal[j].seg.No {
			return wal[i].seg.No < wal[j].seg.No
		}
		return wal[i].Key < wal[j].Key
	})
	for _, o := range wal {
		plan.WAL = append(plan.WAL, o.Object)
	}
	return plan, nil
}

// brokenWarning says that a kept backup cannot be restored, and where its
// WAL stops.
func (st *State) brokenWarning(b *Backup) string {
	at := ""
	if w := b.Window; w != nil && st.SegSize != 0 {
		at = fmt.Sprintf(" from segment %s (%s)", pipeline.SegmentOf(w.Timeline, w.EndLSN, st.SegSize).Name(st.SegSize), w.EndLSN)
	}
	return fmt.Sprintf("backup %s cannot be restored: the WAL from its start to its end (%s) is missing%s; kept, not counted toward --keep/--keep-within", b.ID, b.Catalog.EndLSN, at)
}

// lowerFloor keeps the WAL of the incomplete backups that completed
// during the prune: the plan's floor was computed without them (they were
// to be deleted), so it is lowered to the start of the oldest one's start
// segment, and plan.WAL trimmed to what lies below it. It reads each such
// catalogue for its start LSN; when one cannot be read, no WAL is deleted
// (an error: a backup reported complete must restore).
func lowerFloor(ctx context.Context, sink sinks.Sink, st *State, plan *Plan, completed []string) error {
	if len(completed) == 0 || len(plan.WAL) == 0 {
		return nil
	}
	prefix := st.Layout.BackupPrefix()
	for _, id := range completed {
		data, err := readAll(ctx, sink, backup.CatalogKey(prefix, id))
		if err == nil {
			var c backup.Catalog
			if c, err = backup.DecodeCatalog(data); err == nil && c.ID != id {
				err = fmt.Errorf("its catalogue names backup %s", c.ID)
			}
			if err == nil {
				if f := st.SegSize.Start(c.StartLSN); f < plan.Floor {
					plan.Floor = f
					plan.FloorReason = fmt.Sprintf("backup %s, completed during this prune, starts at %s", id, c.StartLSN)
				}
				continue
			}
		}
		plan.WAL = nil
		plan.Note = fmt.Sprintf("backup %s completed during this prune and its start cannot be read: no WAL deleted", id)
		return fmt.Errorf("backup %s completed during the prune, so the WAL it needs is unknown; no WAL deleted (prune again): %w", id, err)
	}
	end := map[string]pipeline.LSN{}
	for _, o := range append(append([]walObject(nil), st.wal...), st.ranges...) {
		end[o.Key] = o.seg.EndLSN(st.SegSize)
	}
	var wal []sinks.Object
	for _, o := range plan.WAL {
		if e, ok := end[o.Key]; ok && e <= plan.Floor {
			wal = append(wal, o)
		}
	}
	plan.WAL = wal
	return nil
}

// Result counts what a prune deleted.
type Result struct {
	Backups    int   `json:"backups"`
	Incomplete int   `json:"incomplete"`
	WAL        int   `json:"wal"`
	Objects    int   `json:"objects"`
	Bytes      int64 `json:"bytes"`
	// Completed are incomplete backups the plan deleted whose catalogue
	// appeared meanwhile: left alone (but their start marker).
	Completed []string `json:"completed,omitempty"`
}

// Execute carries out a plan: each backup's catalogue first (a backup
// half deleted is never seen complete), then its chunks, its start marker
// last; then incomplete backups, start marker first (a backup still
// running re-checks it after writing its catalogue, and fails), then a
// Head of the catalogue just before the chunks: a backup that completed
// since the scan is left alone; then the WAL, oldest first (an
// interrupted prune never leaves a hole inside what remains). When an
// incomplete backup completed meanwhile, the floor is first lowered to its
// start: Execute then updates plan.Floor, FloorReason and WAL to what it
// deletes.
func Execute(ctx context.Context, sink sinks.Sink, st *State, plan *Plan) (Result, error) {
	var res Result
	del, ok := sink.(sinks.Deleter)
	if !ok {
		return res, errors.New("this destination cannot delete objects: prune needs a sink that deletes (s3:// or file://)")
	}
	rm := func(o sinks.Object) error {
		if err := del.Delete(ctx, o.Key); err != nil {
			return err
		}
		res.Objects++
		res.Bytes += o.Size
		return nil
	}
	prefix := st.Layout.BackupPrefix()
	dropBackup := func(b *Backup) error {
		cat, started := backup.CatalogKey(prefix, b.ID), backup.StartedKey(prefix, b.ID)
		var first, last []sinks.Object
		var rest []sinks.Object
		for _, o := range b.Objects {
			switch o.Key {
			case cat:
				first = append(first, o)
			case started:
				last = append(last, o)
			default:
				rest = append(rest, o)
			}
		}
		for _, o := range append(append(first, rest...), last...) {
			if err := rm(o); err != nil {
				return fmt.Errorf("delete backup %s: %w", b.ID, err)
			}
		}
		return nil
	}
	for _, b := range plan.Delete {
		if err := dropBackup(b); err != nil {
			return res, err
		}
		res.Backups++
	}
	for _, b := range plan.DeleteIncomplete {
		started := backup.StartedKey(prefix, b.ID)
		var rest []sinks.Object
		for _, o := range b.Objects {
			if o.Key != started {
				rest = append(rest, o)
			} else if err := rm(o); err != nil {
				return res, fmt.Errorf("delete incomplete backup %s: %w", b.ID, err)
			}
		}
		cat := backup.CatalogKey(prefix, b.ID)
		if _, err := sink.Head(ctx, cat); err == nil {
			res.Completed = append(res.Completed, b.ID)
			continue
		} else if !errors.Is(err, os.ErrNotExist) {
			return res, fmt.Errorf("delete incomplete backup %s: cannot tell whether it completed meanwhile: %w", b.ID, err)
		}
		for _, o := range rest {
			if err := rm(o); err != nil {
				return res, fmt.Errorf("delete incomplete backup %s: %w", b.ID, err)
			}
		}
		res.Incomplete++
	}
	if err := lowerFloor(ctx, sink, st, plan, res.Completed); err != nil {
		return res, err
	}
	for _, o := range plan.WAL {
		if strings.HasSuffix(o.Key, st.Layout.IdentityKey()) {
			continue // never: a second line of defence
		}
		if err := rm(o); err != nil {
			return res, fmt.Errorf("delete WAL: %w", err)
		}
		res.WAL++
	}
	return res, nil
}
