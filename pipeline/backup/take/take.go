// Package take takes a base backup through walship's pipeline: BASE_BACKUP
// on its own replication connection (not the slot), each archive's tar
// stream and the backup manifest cut into chunks, each chunk staged in the
// JetStream object store and published as a pipeline.KindBackup event for
// the archivers, at most a window of them unconfirmed and in memory at a
// time. Once every chunk is confirmed archived and the bucket holds the
// WAL from the backup's start to its end LSN, the catalogue is written:
// only then is the backup complete.
package take

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"

	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/walship/walship/compress"
	"github.com/walship/walship/internal/backoff"
	"github.com/walship/walship/internal/ratelog"
	"github.com/walship/walship/pipeline"
	"github.com/walship/walship/pipeline/backup"
	"github.com/walship/walship/pipeline/receiver"
	"github.com/walship/walship/sinks"
)

// Bus is what taking a backup needs from JetStream: staging a chunk's
// bytes, publishing its event, and the archived confirmations.
type Bus interface {
	PutObject(ctx context.Context, name string, r io.Reader) error
	PublishSegment(ctx context.Context, ev *pipeline.SegmentEvent) (uint64, error)
	// WatchArchived calls fn for every confirmation of server since the
	// given time, then each new one, until ctx is done.
	WatchArchived(ctx context.Context, server string, since time.Time, fn func(pipeline.ArchivedEvent), bad func(error)) error
}

// Config configures a backup.
type Config struct {
	// Server is the server name the receiver and archivers use; empty:
	// pg-<system identifier>, as the receiver's default.
	Server  string
	Options Options
	// ChunkSize is the raw size of each chunk (0: 16 MiB).
	ChunkSize int
	// Window is how many chunks may be published and unconfirmed (0: 4).
	Window int
	// RepublishAfter publishes a chunk again when it is not confirmed
	// within this time (0: 5 minutes).
	RepublishAfter time.Duration
	// Timeout bounds the whole backup: the data, the confirmations and
	// the wait for the WAL (0: none but ctx's).
	Timeout time.Duration
	// Dest is the sink's ID (sinks.DestID); confirmations naming another
	// are not counted. Empty: any.
	Dest string
	// Layout is the server's key layout; it is built for Server, once it
	// is known, by LayoutFor.
	LayoutFor func(server string) sinks.Layout
	// Connect opens a physical replication connection.
	Connect func(ctx context.Context) (*pgconn.PgConn, error)
	Host    string // recorded in started.json
	Log     *slog.Logger
	Now     func() time.Time
	// PollWAL is how often the bucket is looked at for the WAL (0: 1s).
	PollWAL time.Duration
}

// Taker takes one backup.
type Taker struct {
	cfg  Config
	bus  Bus
	sink sinks.Sink
	log  *slog.Logger
	rl   *ratelog.Limiter
	run  string
}

// New builds a Taker.
func New(cfg Config, bus Bus, sink sinks.Sink) (*Taker, error) {
	if err := cfg.Options.Validate(); err != nil {
		return nil, err
	}
	if cfg.ChunkSize == 0 {
		cfg.ChunkSize = 16 << 20
	}
	if cfg.ChunkSize < 64<<10 || cfg.ChunkSize > 512<<20 {
		return nil, fmt.Errorf("chunk size %d: use 64 KiB to 512 MiB", cfg.ChunkSize)
	}
	if cfg.Window == 0 {
		cfg.Window = 4
	}
	if cfg.Window < 1 || cfg.Window > 256 {
		return nil, fmt.Errorf("window %d: use 1 to 256 chunks", cfg.Window)
	}
	if cfg.RepublishAfter <= 0 {
		cfg.RepublishAfter = 5 * time.Minute
	}
	if cfg.PollWAL <= 0 {
		cfg.PollWAL = time.Second
	}
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.DiscardHandler)
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	var b [8]byte
	rand.Read(b[:])
	return &Taker{cfg: cfg, bus: bus, sink: sink, log: cfg.Log, rl: ratelog.New(cfg.Log, 30*time.Second), run: hex.EncodeToString(b[:])}, nil
}

// state is one backup in progress.
type state struct {
	t        *Taker
	ctx      context.Context
	w        *window
	id       string
	server   string
	sysID    string
	segSize  pipeline.SegmentSize
	pgVer    int
	layout   sinks.Layout
	start    position
	startAt  time.Time
	cur      *chunker
	archives []*backup.Archive // in the order the server sent them
	cks      map[*backup.Archive]*chunker
	manBytes bytes.Buffer
	inMan    bool
	sent     int64 // raw bytes published
	logged   int64 // sent at the last progress line
	// queue, when set, takes each new chunk instead of publishing it at
	// once (Steps: the caller publishes).
	queue func(ev *pipeline.SegmentEvent, data []byte)
}

// Run takes the backup and returns its catalogue, written to the sink.
// Any failure returns an error and leaves no catalogue.
func (t *Taker) Run(ctx context.Context) (*backup.Catalog, error) {
	if t.cfg.Timeout > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, t.cfg.Timeout)
		defer cancel()
	}
	conn, err := t.cfg.Connect(ctx)
	if err != nil {
		return nil, err
	}
	defer conn.Close(context.Background())
	sys, err := pglogrepl.IdentifySystem(ctx, conn)
	if err != nil {
		return nil, fmt.Errorf("IDENTIFY_SYSTEM: %w", err)
	}
	s := &state{t: t, ctx: ctx, sysID: sys.SystemID, server: t.cfg.Server, cks: map[*backup.Archive]*chunker{}}
	if s.server == "" {
		s.server = "pg-" + sys.SystemID
	}
	if s.pgVer, err = showInt(ctx, conn, "server_version_num"); err != nil {
		return nil, err
	}
	if s.pgVer < 150000 {
		return nil, fmt.Errorf("PostgreSQL %d.%d: walship backup needs PostgreSQL 15 or later (its BASE_BACKUP protocol)", s.pgVer/10000, s.pgVer%10000)
	}
	if s.segSize, err = receiver.SegmentSizeOf(ctx, conn); err != nil {
		return nil, err
	}
	s.layout = t.cfg.LayoutFor(s.server)
	if err := s.checkIdentity(); err != nil {
		return nil, err
	}
	s.w = newWindow(t.cfg.Window, t.cfg.ChunkSize, t.cfg.Dest)
	if err := s.newID(); err != nil {
		return nil, err
	}

	wctx, stopWatch := context.WithCancel(ctx)
	var wg sync.WaitGroup
	defer func() { stopWatch(); wg.Wait() }()
	wg.Add(2)
	go func() {
		defer wg.Done()
		t.bus.WatchArchived(wctx, s.server, s.startAt.Add(-time.Minute), func(ev pipeline.ArchivedEvent) { s.w.confirm(ev) },
			func(err error) {
				t.rl.Warn("undecodable", "ignoring an archived event that cannot be decoded", "error", err)
			})
	}()
	go func() { defer wg.Done(); s.republish(wctx) }()

	opts := t.cfg.Options
	if opts.Label == "" {
		opts.Label = "walship " + s.id
	}
	end, err := baseBackup(ctx, conn, opts, s.started, s)
	if err == nil {
		err = s.closeCurrent()
	}
	if err != nil {
		return nil, s.explain("take the backup", err)
	}
	endAt := t.cfg.Now()
	t.log.Info("backup data sent; waiting for the archivers to confirm its chunks", "backup", s.id, "server", s.server,
		"start_lsn", s.start.LSN.String(), "end_lsn", end.LSN.String(), "in_flight", s.w.inFlight())
	if err := s.w.wait(ctx); err != nil {
		return nil, s.explain("wait for the chunks' confirmations", err)
	}
	path, err := s.path(ctx, conn, end)
	if err != nil {
		return nil, s.explain("read the timeline history", err)
	}
	if err := s.waitWAL(ctx, end, path); err != nil {
		return nil, err
	}
	cat, err := s.catalog(ctx, end, endAt)
	if err != nil {
		return nil, s.explain("write the catalogue", err)
	}
	return cat, nil
}

// newID picks the backup's ID, its start time to the second: a backup
// that follows another within the same second waits for the next one.
// (Two started at once by different processes: the second one's
// started.json is refused, put-if-absent, and it fails.)
func (s *state) newID() error {
	for range 3 {
		s.startAt = s.t.cfg.Now()
		s.id = backup.NewID(s.startAt)
		_, err := s.t.sink.Head(s.ctx, backup.StartedKey(s.layout.BackupPrefix(), s.id))
		if errors.Is(err, os.ErrNotExist) {
			return nil
		}
		if err != nil {
			return fmt.Errorf("look up backup %s: %w", s.id, err)
		}
		next := s.startAt.Truncate(time.Second).Add(time.Second)
		if !backoff.Sleep(s.ctx, next.Sub(s.t.cfg.Now())+10*time.Millisecond) {
			return s.ctx.Err()
		}
	}
	return fmt.Errorf("backup %s exists already: is another walship backup running for server %s?", s.id, s.server)
}

// explain turns an error into the line an operator reads.
func (s *state) explain(what string, err error) error {
	if errors.Is(err, context.DeadlineExceeded) && s.t.cfg.Timeout > 0 {
		if n := s.w.inFlight(); n > 0 {
			return fmt.Errorf("backup %s: %d chunks not confirmed archived after --timeout %s: are archivers (walship run or archive) running against this NATS with this --dest, and can they reach the bucket?",
				s.id, n, s.t.cfg.Timeout)
		}
		return fmt.Errorf("backup %s: cannot %s within --timeout %s", s.id, what, s.t.cfg.Timeout)
	}
	return fmt.Errorf("backup %s: %s: %w", s.id, what, err)
}

// checkIdentity refuses a destination that holds another cluster's
// archive under this server's name.
func (s *state) checkIdentity() error {
	id, err := sinks.ReadIdentity(s.ctx, s.t.sink, s.layout)
	if errors.Is(err, sinks.ErrNoIdentity) {
		return nil // nothing archived yet: the archivers write it
	}
	if err != nil {
		return fmt.Errorf("read the archive's identity: %w", err)
	}
	if id.SystemID != s.sysID {
		return fmt.Errorf("%s belongs to system %s, this server is %s: check --server and --dest", s.layout.IdentityKey(), id.SystemID, s.sysID)
	}
	return nil
}

// started writes started.json once the server has begun the backup.
func (s *state) started(p position, _ []tablespace) error {
	s.start = p
	host := s.t.cfg.Host
	st := backup.Started{V: backup.CatalogVersion, ID: s.id, Server: s.server, SystemID: s.sysID, Timeline: p.Timeline,
		StartLSN: p.LSN, StartTime: s.startAt.UTC(), Host: host}
	body, err := json.MarshalIndent(st, "", "  ")
	if err != nil {
		return err
	}
	key := backup.StartedKey(s.layout.BackupPrefix(), s.id)
	if err := s.t.sink.Put(s.ctx, key, body, jsonMeta(body, s.sysID, p)); err != nil {
		if errors.Is(err, sinks.ErrExists) {
			return fmt.Errorf("%s exists already (two backups in the same second?): try again", key)
		}
		return fmt.Errorf("write %s: %w", key, err)
	}
	s.t.log.Info("backup started", "backup", s.id, "server", s.server, "lsn", p.LSN.String(), "timeline", p.Timeline)
	return nil
}

func jsonMeta(body []byte, sysID string, p position) sinks.Metadata {
	return sinks.Metadata{SHA256: hashHex(body), SystemID: sysID, Codec: string(compress.None), RawSize: int64(len(body)),
		StartLSN: p.LSN.String(), EndLSN: p.LSN.String(), Timeline: p.Timeline}
}

// archive implements stream: a new tar stream begins.
func (s *state) archive(name, location string) error {
	if err := s.closeCurrent(); err != nil {
		return err
	}
	arch, ok := strings.CutSuffix(name, ".tar")
	if !ok || !pipeline.ValidBackupChunk(backup.ChunkName(s.id, arch, 0)) || arch == backup.ArchiveManifest {
		return fmt.Errorf("BASE_BACKUP sent archive %q: expected base.tar or <tablespace oid>.tar (is a server-side compression or target configured?)", name)
	}
	return s.begin(&backup.Archive{Name: arch, Location: location}, false)
}

// manifest implements stream: the backup manifest begins.
func (s *state) manifest() error {
	if err := s.closeCurrent(); err != nil {
		return err
	}
	return s.begin(&backup.Archive{Name: backup.ArchiveManifest}, true)
}

func (s *state) begin(a *backup.Archive, manifest bool) error {
	for _, b := range s.archives {
		if b.Name == a.Name {
			return fmt.Errorf("BASE_BACKUP sent archive %q twice", a.Name)
		}
	}
	s.archives = append(s.archives, a)
	s.inMan = manifest
	s.cur = newChunker(a.Name, s.t.cfg.ChunkSize, s.w.buffer, s.emit)
	s.cks[a] = s.cur
	return nil
}

// data implements stream.
func (s *state) data(p []byte) error {
	if s.cur == nil {
		return errors.New("BASE_BACKUP sent data before an archive")
	}
	if s.inMan {
		s.manBytes.Write(p)
	}
	_, err := s.cur.Write(p)
	return err
}

func (s *state) closeCurrent() error {
	if s.cur == nil {
		return nil
	}
	err := s.cur.Close()
	s.cur = nil
	return err
}

// emit publishes a chunk once the window has room.
func (s *state) emit(c chunk) error {
	if err := s.w.acquire(s.ctx); err != nil {
		return err
	}
	name := backup.ChunkName(s.id, c.archive, c.seq)
	ev := pipeline.SegmentEvent{V: pipeline.EventVersion, Server: s.server, SystemID: s.sysID, Timeline: s.start.Timeline,
		File: name, Kind: pipeline.KindBackup, StartLSN: s.start.LSN, EndLSN: s.start.LSN, Size: int64(len(c.data)),
		SegSize: uint64(s.segSize), SHA256: c.sha256, Object: s.server + "/backup/" + name, Run: s.t.run}
	if err := ev.Validate(); err != nil {
		return err
	}
	s.w.add(ev, c.data, s.t.cfg.Now())
	if s.queue != nil {
		s.queue(&ev, c.data)
	} else if err := s.t.publish(s.ctx, &ev, c.data); err != nil {
		return err
	}
	if s.sent += ev.Size; s.sent-s.logged >= 1<<30 {
		s.logged = s.sent
		s.t.log.Info("backup progress", "backup", s.id, "sent_bytes", s.sent, "chunk", name, "in_flight", s.w.inFlight())
	}
	return nil
}

// publish stages a chunk and publishes its event, retrying transient
// failures (NATS away) until ctx ends.
func (t *Taker) publish(ctx context.Context, ev *pipeline.SegmentEvent, data []byte) error {
	bo := backoff.New(250*time.Millisecond, 5*time.Second)
	for {
		err := t.bus.PutObject(ctx, ev.Object, bytes.NewReader(data))
		if err == nil {
			_, err = t.bus.PublishSegment(ctx, ev)
		}
		if err == nil {
			t.rl.Reset("publish")
			return nil
		}
		if ctx.Err() != nil {
			return fmt.Errorf("publish chunk %s: %w (last error: %v; is NATS reachable?)", ev.File, ctx.Err(), err)
		}
		t.rl.Warn("publish", "cannot publish a backup chunk; retrying", "chunk", ev.File, "error", err)
		bo.Wait(ctx)
	}
}

// republish publishes again, from memory, chunks that stay unconfirmed.
func (s *state) republish(ctx context.Context) {
	every := max(s.t.cfg.RepublishAfter/4, 100*time.Millisecond)
	tk := time.NewTicker(every)
	defer tk.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tk.C:
		}
		for _, p := range s.w.due(s.t.cfg.Now(), s.t.cfg.RepublishAfter) {
			s.t.log.Warn("backup chunk not confirmed; publishing it again", "chunk", p.ev.File, "attempt", p.ev.Attempt)
			err := s.t.publish(ctx, &p.ev, p.data)
			s.w.release(p.ev.File, p.data)
			if err != nil {
				return
			}
		}
	}
}

// path is the backup's timeline path: when the server changed timeline
// during the backup (a standby whose upstream was promoted), the end
// timeline's history, from the server, says where each timeline began.
func (s *state) path(ctx context.Context, conn *pgconn.PgConn, end position) ([]leg, error) {
	if end.Timeline == s.start.Timeline {
		return timelinePath(s.start.Timeline, end.Timeline, nil)
	}
	h, err := pglogrepl.TimelineHistory(ctx, conn, int32(end.Timeline))
	if err != nil {
		return nil, fmt.Errorf("TIMELINE_HISTORY %d: %w", end.Timeline, err)
	}
	hist, err := pipeline.ParseHistory(h.Content)
	if err != nil {
		return nil, fmt.Errorf("timeline %d's history: %w", end.Timeline, err)
	}
	return timelinePath(s.start.Timeline, end.Timeline, hist)
}

// waitWAL waits until the bucket holds the WAL from the backup's start to
// its end.
func (s *state) waitWAL(ctx context.Context, end position, path []leg) error {
	check := newWALCheck(s.t.sink, s.layout, s.sysID, s.segSize, path, s.start.LSN, end.LSN)
	began := s.t.cfg.Now()
	logged := false
	for {
		missing, err := check.missing(ctx)
		if err == nil && missing == "" {
			return nil
		}
		if err != nil {
			s.t.rl.Warn("wal", "cannot look for the backup's WAL in the bucket; retrying", "error", err)
		} else if !logged || s.t.cfg.Now().Sub(began) > time.Minute {
			s.t.log.Info("waiting for the backup's WAL to be archived", "backup", s.id, "missing", missing, "end_lsn", end.LSN.String())
			logged, began = true, s.t.cfg.Now()
		}
		if !backoff.Sleep(ctx, s.t.cfg.PollWAL) {
			if errors.Is(ctx.Err(), context.DeadlineExceeded) {
				return fmt.Errorf("backup %s: WAL up to %s (segment %s) is not in the bucket after --timeout %s: is walship receive or run running for server %s?",
					s.id, end.LSN, missing, s.t.cfg.Timeout, s.server)
			}
			return fmt.Errorf("backup %s: waiting for WAL up to %s: %w", s.id, end.LSN, ctx.Err())
		}
	}
}

// catalog verifies every chunk in the sink and writes the catalogue.
func (s *state) catalog(ctx context.Context, end position, endAt time.Time) (*backup.Catalog, error) {
	cat := &backup.Catalog{V: backup.CatalogVersion, ID: s.id, Server: s.server, SystemID: s.sysID, PGVersion: s.pgVer,
		SegSize: uint64(s.segSize), Timeline: s.start.Timeline, StartLSN: s.start.LSN, EndLSN: end.LSN, EndTimeline: end.Timeline,
		StartTime: s.startAt.UTC(), EndTime: endAt.UTC(), Label: s.t.cfg.Options.Label}
	if cat.Label == "" {
		cat.Label = "walship " + s.id
	}
	sizes := map[string]int64{}
	if l, ok := s.t.sink.(sinks.Lister); ok {
		l.List(ctx, s.layout.BackupPrefix()+s.id+"/", func(o sinks.Object) error { sizes[o.Key] = o.Size; return nil })
	}
	encryption := ""
	for i, a := range s.archives {
		ck := s.cks[a]
		a.Size, a.SHA256 = ck.total, ck.Sum()
		for seq := 0; seq < ck.seq; seq++ {
			name := backup.ChunkName(s.id, a.Name, seq)
			ev, ok := s.w.confirmed(name)
			if !ok {
				return nil, fmt.Errorf("chunk %s was never confirmed", name)
			}
			if cat.Codec == "" {
				cat.Codec = ev.Codec
			} else if ev.Codec != cat.Codec {
				return nil, fmt.Errorf("chunks stored with codecs %s and %s: archivers with different --compression served this backup", cat.Codec, ev.Codec)
			}
			meta, err := s.t.sink.Head(ctx, ev.Key)
			if err != nil {
				return nil, fmt.Errorf("chunk %s: %w", ev.Key, err)
			}
			if meta.SHA256 != ev.SHA256 {
				return nil, fmt.Errorf("chunk %s holds sha256 %s, not %s", ev.Key, meta.SHA256, ev.SHA256)
			}
			if seq == 0 && i == 0 {
				encryption = meta.Encryption
			} else if meta.Encryption != encryption {
				return nil, fmt.Errorf("chunk %s is stored with encryption %q, others with %q", ev.Key, meta.Encryption, encryption)
			}
			stored := ev.CompressedSize
			if n, ok := sizes[ev.Key]; ok {
				stored = n
			}
			a.Chunks = append(a.Chunks, backup.Chunk{Seq: seq, Key: ev.Key, Size: ev.Size, SHA256: ev.SHA256, StoredSize: stored})
			cat.StoredSize += stored
		}
		if a.Name == backup.ArchiveManifest {
			cat.Manifest = *a
		} else {
			cat.Size += a.Size
		}
	}
	cat.Encryption = encryption
	// The base archive first, then the tablespaces in the server's order.
	var arch []backup.Archive
	for _, a := range s.archives {
		if a.Name == backup.ArchiveBase {
			arch = append(arch, *a)
		}
	}
	for _, a := range s.archives {
		if a.Name != backup.ArchiveBase && a.Name != backup.ArchiveManifest {
			arch = append(arch, *a)
		}
	}
	cat.Archives = arch
	var man struct {
		Checksum string `json:"Manifest-Checksum"`
	}
	if err := json.Unmarshal(s.manBytes.Bytes(), &man); err != nil || man.Checksum == "" {
		return nil, fmt.Errorf("the server's backup manifest has no Manifest-Checksum (%v)", err)
	}
	cat.ManifestChecksum = man.Checksum
	if err := cat.Validate(); err != nil {
		return nil, err
	}
	body, err := cat.Encode()
	if err != nil {
		return nil, err
	}
	key := backup.CatalogKey(s.layout.BackupPrefix(), s.id)
	meta := jsonMeta(body, s.sysID, s.start)
	meta.EndLSN = end.LSN.String()
	if err := s.t.sink.Put(ctx, key, body, meta); err != nil {
		// ErrExists with our own bytes: a retried PUT whose first attempt
		// landed. It is written; check as for a PUT that succeeded.
		have, herr := s.t.sink.Head(ctx, key)
		if !errors.Is(err, sinks.ErrExists) || herr != nil || have.SHA256 != meta.SHA256 {
			return nil, fmt.Errorf("write %s: %w", key, err)
		}
	}
	if err := s.stillThere(ctx, cat); err != nil {
		// A prune took this backup for an abandoned one (older than its
		// --incomplete-after) while it completed: it deletes the start
		// marker first, then looks for a catalogue before it deletes
		// chunks. Take the catalogue back rather than leave a complete
		// backup with chunks missing.
		if d, ok := s.t.sink.(sinks.Deleter); ok {
			if derr := d.Delete(ctx, key); derr != nil {
				return nil, fmt.Errorf("%v; and cannot delete the catalogue %s: %v (delete it by hand)", err, key, derr)
			}
		}
		return nil, err
	}
	return cat, nil
}

// stillThere checks, after the catalogue is written, that the start
// marker and every chunk are still in the sink.
func (s *state) stillThere(ctx context.Context, cat *backup.Catalog) error {
	keys := []string{backup.StartedKey(s.layout.BackupPrefix(), s.id)}
	for _, a := range append(append([]backup.Archive(nil), cat.Archives...), cat.Manifest) {
		for _, ch := range a.Chunks {
			keys = append(keys, ch.Key)
		}
	}
	for _, k := range keys {
		if _, err := s.t.sink.Head(ctx, k); err != nil {
			return fmt.Errorf("backup %s: %s is gone after the catalogue was written (a prune with an --incomplete-after shorter than this backup took?): %w", s.id, k, err)
		}
	}
	return nil
}

// showInt reads a numeric server setting.
func showInt(ctx context.Context, conn *pgconn.PgConn, name string) (int, error) {
	s, err := receiver.ShowSetting(ctx, conn, name)
	if err != nil {
		return 0, err
	}
	n, err := strconv.Atoi(s)
	if err != nil {
		return 0, fmt.Errorf("SHOW %s: %q is not a number", name, s)
	}
	return n, nil
}
