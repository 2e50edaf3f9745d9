package take

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/walship/walship/pipeline"
	"github.com/walship/walship/pipeline/backup"
)

// Steps drives one backup a step at a time, with no PostgreSQL connection,
// no goroutines and no sleeps, so that a deterministic simulation runs the
// same decisions Run makes: the chunker, the window of unconfirmed chunks,
// the matching of confirmations, the republication of chunks that stay
// unconfirmed, the WAL coverage check and the catalogue. The caller plays
// the server (Started, Archive, Manifest, Data, Close), publishes what
// Next returns, and feeds confirmations; time comes from Config.Now.
type Steps struct {
	s     *state
	out   []*inflight // chunks to publish, in order
	check *walCheck
	end   position
	endAt time.Time
	done  bool // the data ended
}

// Steps begins a backup of a server whose identity the caller gives (what
// Run reads with IDENTIFY_SYSTEM and SHOW). It fails when the archive
// belongs to another system or a backup with this start second exists.
func (t *Taker) Steps(ctx context.Context, server, sysID string, pgVer int, segSize pipeline.SegmentSize) (*Steps, error) {
	s := &state{t: t, ctx: ctx, sysID: sysID, server: server, pgVer: pgVer, segSize: segSize, cks: map[*backup.Archive]*chunker{}}
	s.layout = t.cfg.LayoutFor(server)
	if err := s.checkIdentity(); err != nil {
		return nil, err
	}
	s.w = newWindow(t.cfg.Window, t.cfg.ChunkSize, t.cfg.Dest)
	s.startAt = t.cfg.Now()
	s.id = backup.NewID(s.startAt)
	if _, err := t.sink.Head(ctx, backup.StartedKey(s.layout.BackupPrefix(), s.id)); err == nil {
		return nil, fmt.Errorf("backup %s exists already", s.id)
	}
	b := &Steps{s: s}
	s.queue = func(ev *pipeline.SegmentEvent, data []byte) {
		s.w.hold(ev.File)
		b.out = append(b.out, &inflight{ev: *ev, data: data})
	}
	return b, nil
}

// ID is the backup's ID.
func (b *Steps) ID() string { return b.s.id }

// Started is BASE_BACKUP's start position: started.json is written.
func (b *Steps) Started(tli uint32, lsn pipeline.LSN) error {
	return b.s.started(position{LSN: lsn, Timeline: tli}, nil)
}

// Archive begins an archive's tar stream (name: base.tar, <oid>.tar).
func (b *Steps) Archive(name, location string) error { return b.s.archive(name, location) }

// Manifest begins the backup manifest.
func (b *Steps) Manifest() error { return b.s.manifest() }

// Room is how many bytes Data takes now without waiting for the window;
// CanClose: whether ending the current stream (a last chunk) would not.
func (b *Steps) Room() int {
	free := cap(b.s.w.slots) - len(b.s.w.slots)
	used := 0
	if b.s.cur != nil {
		used = len(b.s.cur.buf)
	}
	return free*b.s.t.cfg.ChunkSize + b.s.t.cfg.ChunkSize - used - 1
}

// CanClose reports whether the window has room for a last chunk.
func (b *Steps) CanClose() bool { return cap(b.s.w.slots) > len(b.s.w.slots) }

// Data is bytes of the current stream; at most Room.
func (b *Steps) Data(p []byte) error {
	if len(p) > b.Room() {
		return errors.New("take: Data past Room")
	}
	return b.s.data(p)
}

// End ends the data at BASE_BACKUP's end position, at time now.
func (b *Steps) End(tli uint32, lsn pipeline.LSN) error {
	if !b.CanClose() {
		return errors.New("take: End without room")
	}
	if err := b.s.closeCurrent(); err != nil {
		return err
	}
	b.end, b.endAt, b.done = position{LSN: lsn, Timeline: tli}, b.s.t.cfg.Now(), true
	path, err := timelinePath(b.s.start.Timeline, tli, nil)
	if err != nil {
		return err
	}
	b.check = newWALCheck(b.s.t.sink, b.s.layout, b.s.sysID, b.s.segSize, path, b.s.start.LSN, lsn)
	return nil
}

// Publish makes one attempt to stage and publish the next chunk waiting
// (Run retries until it succeeds); false: none waits.
func (b *Steps) Publish(ctx context.Context) (bool, error) {
	if len(b.out) == 0 {
		return false, nil
	}
	p := b.out[0]
	err := b.s.t.bus.PutObject(ctx, p.ev.Object, bytes.NewReader(p.data))
	if err == nil {
		_, err = b.s.t.bus.PublishSegment(ctx, &p.ev)
	}
	if err != nil {
		return true, fmt.Errorf("publish chunk %s: %w", p.ev.File, err)
	}
	b.out = b.out[1:]
	b.s.w.release(p.ev.File, p.data)
	return true, nil
}

// Republish queues the chunks unconfirmed for RepublishAfter (Run's
// republish loop); it returns how many.
func (b *Steps) Republish(now time.Time) int {
	due := b.s.w.due(now, b.s.t.cfg.RepublishAfter)
	b.out = append(b.out, due...)
	return len(due)
}

// Confirm takes a confirmation; true when it confirmed a chunk in flight.
func (b *Steps) Confirm(ev pipeline.ArchivedEvent) bool { return b.s.w.confirm(ev) }

// InFlight is the number of chunks not yet confirmed.
func (b *Steps) InFlight() int { return b.s.w.inFlight() }

// MissingWAL is the first WAL file from the backup's start to its end the
// bucket lacks ("": none); only after End.
func (b *Steps) MissingWAL(ctx context.Context) (string, error) {
	if !b.done {
		return "", errors.New("take: MissingWAL before End")
	}
	return b.check.missing(ctx)
}

// Catalog writes the catalogue, as Run does once every chunk is confirmed
// and the WAL is in the bucket.
func (b *Steps) Catalog(ctx context.Context) (*backup.Catalog, error) {
	if !b.done || b.InFlight() > 0 {
		return nil, errors.New("take: Catalog before every chunk is confirmed")
	}
	return b.s.catalog(ctx, b.end, b.endAt)
}
