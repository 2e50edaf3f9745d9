// Package archiver is the worker pool that takes segment events from
// JetStream, verifies the bytes, compresses them (and encrypts them, with
// recipients), stores them in the sink
// with put-if-absent, and confirms with an archived event. An event is
// acknowledged only after the object is durable and the confirmation is
// acknowledged by JetStream.
//
// Every delivery ends in exactly one of: Ack (archived and confirmed); Nak
// with a delay (a transient failure: the sink, NATS, or a conflict an
// operator must resolve; it is retried forever); Term (the event is
// malformed, or its bytes are gone or corrupt: the receiver, which still
// holds the file, publishes it again). Handle makes the decision; Run
// feeds it deliveries.
//
// Bytes staged over HTTP (an event with a URL, --stage http) follow the
// same rules: the receiver answering 404 is a missing staged object (Term,
// unless the bucket holds the file); a receiver that does not answer, or
// answers 5xx, is transient (Nak with back-off); one that has not answered
// for longer than the fetcher's give-up bound is gone, and its events are
// terminated like missing objects (see stagehttp.Client.Fetch for why
// neither loses WAL nor freezes flush).
package archiver

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"strconv"
	"sync"
	"time"

	"filippo.io/age"
	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/sync/errgroup"

	"github.com/walship/walship/compress"
	"github.com/walship/walship/crypt"
	"github.com/walship/walship/internal/backoff"
	"github.com/walship/walship/internal/ratelog"
	"github.com/walship/walship/pipeline"
	"github.com/walship/walship/sinks"
)

// Delivery is one segment event handed to an archiver and the answers
// JetStream takes for it.
type Delivery interface {
	Data() []byte
	// NumDelivered counts deliveries of the event, this one included.
	NumDelivered() uint64
	// Ack acknowledges the event and waits for the server to confirm.
	Ack(ctx context.Context) error
	// Nak hands the event back, to be delivered again after delay.
	Nak(delay time.Duration) error
	// Term removes the event for good.
	Term(reason string) error
	// InProgress resets the event's acknowledgement timer.
	InProgress() error
}

// Source hands out deliveries: Next waits a few seconds for one and
// returns nil, nil when none came.
type Source interface {
	Next(ctx context.Context) (Delivery, error)
}

// SourceFunc adapts a function to Source.
type SourceFunc func(ctx context.Context) (Delivery, error)

// Next implements Source.
func (f SourceFunc) Next(ctx context.Context) (Delivery, error) { return f(ctx) }

// Bus is what the archiver needs from JetStream besides deliveries.
type Bus interface {
	// GetObject reads a staged object into buf (reused when large
	// enough); a missing object wraps os.ErrNotExist.
	GetObject(ctx context.Context, name string, buf []byte) ([]byte, error)
	DeleteObject(ctx context.Context, name string) error
	// PublishArchived publishes a confirmation and waits for the server's
	// acknowledgement.
	PublishArchived(ctx context.Context, ev *pipeline.ArchivedEvent) error
}

// BacklogReader is an optional capability of a Bus: the events waiting for
// or held by the pool.
type BacklogReader interface {
	Pending(ctx context.Context) (uint64, error)
}

// Fetcher reads the size bytes of a file announced with SHA-256 sum from
// a receiver's stage URL into buf (reused when large enough). A file the
// receiver no longer holds, or a receiver gone for good, wraps
// os.ErrNotExist (the event is then terminated unless the bucket holds the
// file); other errors are transient (see package stagehttp).
type Fetcher interface {
	Fetch(ctx context.Context, url, sum string, size int64, buf []byte) ([]byte, error)
}

// Config configures the pool.
type Config struct {
	Workers int
	Codec   compress.Codec
	Level   int
	// Recipients, when any, encrypt every WAL object after compression
	// (age); the object's metadata records the scheme. The SHA-256 in the
	// metadata stays that of the raw WAL, which restore checks after
	// decrypting and decompressing.
	Recipients []age.Recipient
	Layout     func(server string) sinks.Layout
	Dest       string // the sink's ID (sinks.DestID), named in every confirmation
	// ReadSpool reads segments from the receiver's spool path when present
	// (archivers in the receiver's process); OpenSpool opens it (nil: os.Open).
	ReadSpool bool
	OpenSpool func(path string) (io.ReadCloser, error)
	// Fetch reads a file from the receiver's HTTP stage when its event
	// carries a URL (--stage http); nil: such events wait, handed back
	// with a back-off, until an archiver that can fetch them takes them.
	Fetch Fetcher
	// KeepAlive is how often InProgress is sent while an event is being
	// archived (0: 15s; negative: never).
	KeepAlive time.Duration
	// ConflictRetry is how long a conflicting event waits before it is
	// tried again (0: 5 minutes).
	ConflictRetry time.Duration
	Log           *slog.Logger
	Metrics       *Metrics
}

// Archiver is a pool of workers sharing one durable consumer.
type Archiver struct {
	cfg  Config
	bus  Bus
	sink sinks.Sink
	log  *slog.Logger
	rl   *ratelog.Limiter

	mu         sync.Mutex
	identities map[string]error // server → refusal, once an identity conflict is found
	seen       map[string]bool  // servers whose series exist
	conflicts  map[string]bool  // keys whose conflict was logged
}

// New builds an archiver pool.
func New(cfg Config, bus Bus, sink sinks.Sink) (*Archiver, error) {
	if cfg.Workers <= 0 {
		cfg.Workers = 1
	}
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.DiscardHandler)
	}
	if cfg.Metrics == nil {
		cfg.Metrics = NewMetrics(prometheus.NewRegistry())
	}
	if cfg.OpenSpool == nil {
		cfg.OpenSpool = func(p string) (io.ReadCloser, error) { return os.Open(p) }
	}
	if cfg.KeepAlive == 0 {
		cfg.KeepAlive = 15 * time.Second
	}
	if cfg.ConflictRetry <= 0 {
		cfg.ConflictRetry = 5 * time.Minute
	}
	if _, err := compress.NewEncoder(cfg.Codec, cfg.Level); err != nil {
		return nil, err
	}
	return &Archiver{cfg: cfg, bus: bus, sink: sink, log: cfg.Log, rl: ratelog.New(cfg.Log, 30*time.Second),
		identities: map[string]error{}, seen: map[string]bool{}, conflicts: map[string]bool{}}, nil
}

// Run runs the workers until ctx is done. Each finishes the event it holds
// before returning, unless ctx cancellation interrupts a network call; an
// interrupted event is handed back and redelivered.
func (a *Archiver) Run(ctx context.Context, src Source) error {
	g, ctx := errgroup.WithContext(ctx)
	if br, ok := a.bus.(BacklogReader); ok {
		g.Go(func() error { return a.watchBacklog(ctx, br, 10*time.Second) })
	}
	for i := 0; i < a.cfg.Workers; i++ {
		g.Go(func() error { return a.worker(ctx, src) })
	}
	return g.Wait()
}

// watchBacklog publishes the consumer's backlog (events waiting plus in
// flight) as a gauge.
func (a *Archiver) watchBacklog(ctx context.Context, br BacklogReader, every time.Duration) error {
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		if n, err := br.Pending(ctx); err == nil {
			a.cfg.Metrics.Backlog.Set(float64(n))
		}
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
	}
}

// Worker is one worker's reusable state: an encoder, an encrypter (nil
// without recipients) and a buffer.
type Worker struct {
	enc   *compress.Encoder
	crypt *crypt.Encrypter
	raw   []byte
}

// NewWorker builds a worker's state.
func (a *Archiver) NewWorker() *Worker {
	enc, _ := compress.NewEncoder(a.cfg.Codec, a.cfg.Level) // checked in New
	return &Worker{enc: enc, crypt: crypt.NewEncrypter(a.cfg.Recipients)}
}

func (a *Archiver) worker(ctx context.Context, src Source) error {
	w := a.NewWorker()
	bo := backoff.New(500*time.Millisecond, 15*time.Second)
	for ctx.Err() == nil {
		d, err := src.Next(ctx)
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			a.fail("consume", "cannot fetch segment events; retrying", "", err)
			bo.Wait(ctx)
			continue
		}
		bo.Reset()
		a.rl.Reset("consume/")
		if d != nil {
			a.Handle(ctx, w, d)
		}
	}
	return nil
}

func (a *Archiver) fail(stage, msg, server string, err error, args ...any) {
	a.cfg.Metrics.Errors.WithLabelValues(server, stage).Inc()
	a.rl.Warn(stage+"/"+server, msg, append([]any{"server", server, "stage", stage, "error", err}, args...)...)
}

// Outcome is how Handle answered a delivery.
type Outcome int

// The outcomes of Handle.
const (
	Acked     Outcome = iota // archived and confirmed
	Naked                    // handed back, to be retried after a delay
	Termed                   // removed: malformed, or bytes gone or corrupt
	Abandoned                // ctx ended: handed back at once
)

func (o Outcome) String() string {
	return [...]string{"ack", "nak", "term", "abandoned"}[o]
}

// errUnavailable marks a file whose bytes this archiver cannot get or
// cannot trust: the receiver, which holds the file, must publish it again.
var errUnavailable = errors.New("bytes unavailable")

// errNoStageSecret marks an event served by its receiver over HTTP that
// this archiver cannot fetch: it has no stage secret. The event is handed
// back (the receiver still holds the WAL), never terminated.
var errNoStageSecret = errors.New("served by its receiver over HTTP (--stage http) but this archiver has no stage secret")

// errConflict marks a key that holds something else: only an operator can
// resolve it; the event waits meanwhile and the slot holds.
var errConflict = errors.New("archive conflict")

// RetryDelay is how long a failed event waits before its next delivery:
// doubling from one second with each delivery, up to 30 seconds.
func RetryDelay(delivered uint64) time.Duration {
	d := time.Second
	for i := uint64(1); i < delivered && d < 30*time.Second; i++ {
		d *= 2
	}
	return min(d, 30*time.Second)
}

// Handle processes one delivery and answers it exactly once.
func (a *Archiver) Handle(ctx context.Context, w *Worker, d Delivery) Outcome {
	ev, err := pipeline.DecodeSegmentEvent(d.Data())
	if err != nil {
		a.cfg.Metrics.Malformed.Inc()
		a.log.Error("terminating malformed segment event", "error", err)
		d.Term("malformed: " + err.Error())
		return Termed
	}
	a.initSeries(ev.Server)
	// Tell JetStream we are alive while we work, so long uploads are not
	// redelivered to another worker.
	stop := keepAlive(ctx, d, a.cfg.KeepAlive)
	defer stop()

	res, err := a.archive(ctx, w, &ev, d.NumDelivered() > 1)
	switch {
	case ctx.Err() != nil:
		d.Nak(0)
		return Abandoned
	case errors.Is(err, errUnavailable):
		a.cfg.Metrics.Unavailable.WithLabelValues(ev.Server).Inc()
		a.log.Warn("handing a segment event back to the receiver, which publishes the file again", "server", ev.Server, "segment", ev.File, "error", err)
		d.Term(err.Error())
		return Termed
	case errors.Is(err, errConflict):
		d.Nak(a.cfg.ConflictRetry)
		return Naked
	case errors.Is(err, errNoStageSecret):
		a.cfg.Metrics.NoStageSecret.WithLabelValues(ev.Server).Inc()
		a.rl.Error("stage-secret", "cannot fetch segments served over HTTP by their receiver (--stage http): set WALSHIP_STAGE_SECRET or --stage-secret-file on the archivers (the receivers' secret); events are handed back meanwhile",
			"server", ev.Server, "segment", ev.File, "error", err)
		d.Nak(RetryDelay(d.NumDelivered()))
		return Naked
	case err != nil:
		a.fail("archive", "cannot archive segment; it will be retried", ev.Server, err, "segment", ev.File)
		d.Nak(RetryDelay(d.NumDelivered()))
		return Naked
	}
	if err := a.bus.PublishArchived(ctx, res); err != nil {
		if ctx.Err() != nil {
			d.Nak(0)
			return Abandoned
		}
		// The object is in the sink; the redelivery finds it there and
		// confirms without uploading again.
		a.fail("confirm", "cannot publish archived event; it will be retried", ev.Server, err, "segment", ev.File)
		d.Nak(RetryDelay(d.NumDelivered()))
		return Naked
	}
	if err := d.Ack(ctx); err != nil {
		a.fail("ack", "cannot acknowledge segment event; it may be redelivered, which is harmless", ev.Server, err, "segment", ev.File)
	}
	if ev.Object != "" {
		if err := a.bus.DeleteObject(ctx, ev.Object); err != nil {
			a.fail("cleanup", "cannot delete staged object", ev.Server, err, "segment", ev.File)
		}
	}
	a.count(&ev, res)
	a.rl.Reset("archive/" + ev.Server)
	a.log.Debug("archived", "server", ev.Server, "segment", ev.File, "key", res.Key, "existed", res.Existed)
	if ev.Ranges && (ev.Kind == pipeline.KindSegment || ev.Kind == pipeline.KindPartial) {
		// The whole file is durable and confirmed: its ranges are redundant.
		a.deleteRanges(ctx, &ev)
	}
	return Acked
}

// initSeries creates a server's series at zero the first time it is seen,
// so alerts on increases work from the first error rather than the second.
func (a *Archiver) initSeries(server string) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.seen[server] {
		return
	}
	a.seen[server] = true
	m := a.cfg.Metrics
	for _, stage := range []string{"archive", "upload", "confirm", "ack", "cleanup", "ranges"} {
		m.Errors.WithLabelValues(server, stage).Add(0)
	}
	m.Conflicts.WithLabelValues(server).Add(0)
	m.Corrupt.WithLabelValues(server).Add(0)
	m.Unavailable.WithLabelValues(server).Add(0)
	m.NoStageSecret.WithLabelValues(server).Add(0)
	m.Segments.WithLabelValues(server).Add(0)
	m.RawBytes.WithLabelValues(server).Add(0)
	m.CompressedBytes.WithLabelValues(server).Add(0)
	m.PartialUploads.WithLabelValues(server).Add(0)
	m.PartialBytes.WithLabelValues(server).Add(0)
	m.PartialDeleted.WithLabelValues(server).Add(0)
	m.BackupChunks.WithLabelValues(server).Add(0)
	m.BackupBytes.WithLabelValues(server).Add(0)
}

// archive reads, verifies, compresses and uploads one WAL file. A file
// that may be archived already (a redelivery, or one the receiver
// published again) is looked up in the sink first.
func (a *Archiver) archive(ctx context.Context, w *Worker, ev *pipeline.SegmentEvent, redelivered bool) (*pipeline.ArchivedEvent, error) {
	layout := a.cfg.Layout(ev.Server)
	if err := a.checkIdentity(ctx, layout, ev); err != nil {
		return nil, err
	}
	key := objectKey(layout, ev, a.cfg.Codec.Ext())
	if redelivered || ev.Attempt > 0 {
		switch found, err := a.inSink(ctx, key, ev); {
		case err != nil && !errors.Is(err, os.ErrNotExist):
			return nil, err
		case found:
			return a.result(ev, key, 0, 0, true), nil
		}
	}
	raw, err := a.read(ctx, w, ev)
	if errors.Is(err, os.ErrNotExist) {
		// The bytes are gone from the spool and the object store: the file
		// was confirmed and removed, or NATS lost it. The sink says which.
		if found, herr := a.inSink(ctx, key, ev); herr == nil && found {
			return a.result(ev, key, 0, 0, true), nil
		} else if herr != nil && !errors.Is(herr, os.ErrNotExist) {
			return nil, herr
		}
		return nil, fmt.Errorf("%w: %s %s: %v", errUnavailable, ev.Kind, eventName(ev), err)
	}
	if err != nil {
		return nil, err
	}
	if err := verify(raw, ev); err != nil {
		a.cfg.Metrics.Corrupt.WithLabelValues(ev.Server).Inc()
		a.log.Error("WAL bytes fail verification", "server", ev.Server, "segment", ev.File, "kind", ev.Kind, "name", eventName(ev), "error", err)
		return nil, fmt.Errorf("%w: %v", errUnavailable, err)
	}
	body, err := w.enc.Encode(raw)
	if err != nil {
		return nil, fmt.Errorf("compress %s: %w", ev.File, err)
	}
	meta := sinks.Metadata{
		SHA256: ev.SHA256, StartLSN: ev.StartLSN.String(), EndLSN: ev.EndLSN.String(),
		Timeline: ev.Timeline, SystemID: ev.SystemID, Codec: string(a.cfg.Codec), RawSize: ev.Size,
	}
	if w.crypt != nil {
		// Compressed, then encrypted: ciphertext does not compress.
		if body, err = w.crypt.Encrypt(body); err != nil {
			return nil, fmt.Errorf("encrypt %s: %w", ev.File, err)
		}
		meta.Encryption = crypt.Scheme
	}
	began := time.Now()
	err = a.sink.Put(ctx, key, body, meta)
	took := time.Since(began).Seconds()
	if errors.Is(err, sinks.ErrExists) {
		found, herr := a.inSink(ctx, key, ev)
		if herr != nil {
			return nil, herr
		}
		if !found {
			return nil, fmt.Errorf("%w: %s appeared and then vanished", errConflict, key)
		}
		return a.result(ev, key, int64(len(body)), took, true), nil
	}
	if err != nil {
		a.fail("upload", "upload failed; the event will be retried", ev.Server, err, "segment", ev.File, "key", key)
		return nil, err
	}
	return a.result(ev, key, int64(len(body)), took, false), nil
}

// inSink reports whether the sink holds ev's bytes at key, by the SHA-256
// in the object's metadata. An object with other bytes, or without
// walship's metadata (which restore needs to verify it), is a conflict: it
// is never overwritten and never confirmed. A missing object wraps
// os.ErrNotExist.
func (a *Archiver) inSink(ctx context.Context, key string, ev *pipeline.SegmentEvent) (bool, error) {
	meta, err := a.sink.Head(ctx, key)
	if err != nil {
		return false, err
	}
	if meta.SHA256 == ev.SHA256 {
		if s, ok := a.sink.(sinks.Syncer); ok {
			// Another writer may have died before making it durable.
			if err := s.Sync(ctx, key); err != nil {
				return false, err
			}
		}
		return true, nil
	}
	a.cfg.Metrics.Conflicts.WithLabelValues(ev.Server).Inc()
	a.mu.Lock()
	logged := a.conflicts[key]
	a.conflicts[key] = true
	a.mu.Unlock()
	why := "different bytes (sha256 " + meta.SHA256 + ")"
	if meta.SHA256 == "" {
		why = "an object without walship's sha256 metadata, which restore could not verify"
	}
	if !logged {
		a.log.Error("archive conflict: the sink holds "+why+" under this key; refusing to overwrite it or confirm it, so the slot holds here until an operator removes it",
			"server", ev.Server, "segment", ev.File, "key", key, "sha256", ev.SHA256)
	}
	return false, fmt.Errorf("%w: %s holds %s, not %s %s", errConflict, key, why, ev.Kind, eventName(ev))
}

func (a *Archiver) result(ev *pipeline.SegmentEvent, key string, compressed int64, took float64, existed bool) *pipeline.ArchivedEvent {
	return &pipeline.ArchivedEvent{SegmentEvent: *ev, Key: key, Dest: a.cfg.Dest, Codec: string(a.cfg.Codec),
		CompressedSize: compressed, UploadSeconds: took, Existed: existed}
}

// archiveName is the file name the archive uses: .partial for the last
// segment of an ended timeline.
func archiveName(ev *pipeline.SegmentEvent) string {
	if ev.Kind == pipeline.KindPartial {
		return ev.File + ".partial"
	}
	return ev.File
}

// read loads the raw bytes: from the local spool when allowed and present,
// else from the receiver's HTTP stage when the event names one, else from
// the object store. Bytes that are nowhere wrap os.ErrNotExist.
func (a *Archiver) read(ctx context.Context, w *Worker, ev *pipeline.SegmentEvent) ([]byte, error) {
	if a.cfg.ReadSpool && ev.Spool != "" {
		f, err := a.cfg.OpenSpool(ev.Spool)
		if err == nil {
			defer f.Close()
			if cap(w.raw) < int(ev.Size) {
				w.raw = make([]byte, ev.Size)
			}
			buf := w.raw[:ev.Size]
			if _, err := io.ReadFull(f, buf); err != nil {
				return nil, fmt.Errorf("read spool %s: %w", ev.Spool, err)
			}
			return buf, nil
		}
		if ev.Object == "" && ev.URL == "" {
			return nil, err
		}
	}
	var data []byte
	var err error
	switch {
	case ev.URL != "" && a.cfg.Fetch == nil:
		return nil, fmt.Errorf("%w: %s %s", errNoStageSecret, ev.Kind, eventName(ev))
	case ev.URL != "":
		data, err = a.cfg.Fetch.Fetch(ctx, ev.URL, ev.SHA256, ev.Size, w.raw)
	case ev.Object == "":
		return nil, fmt.Errorf("segment %s is only in the receiver's spool and this archiver cannot read it: %w", ev.File, os.ErrNotExist)
	default:
		data, err = a.bus.GetObject(ctx, ev.Object, w.raw)
	}
	if err != nil {
		return nil, err
	}
	if cap(data) > cap(w.raw) {
		w.raw = data[:0]
	}
	return data, nil
}

// verify checks the bytes against the event: size, SHA-256, and for whole
// and ended-timeline segments the WAL page headers up to the event's end
// and the system identifier; for a range, the page headers that lie inside
// it, and the system identifier when it starts the segment.
func verify(raw []byte, ev *pipeline.SegmentEvent) error {
	if int64(len(raw)) != ev.Size {
		return fmt.Errorf("%s %s: %d bytes, event says %d", ev.Kind, eventName(ev), len(raw), ev.Size)
	}
	sum := sha256.Sum256(raw)
	if got := pipeline.SHA256Hex(sum[:]); got != ev.SHA256 {
		return fmt.Errorf("%s %s: sha256 %s, event says %s", ev.Kind, eventName(ev), got, ev.SHA256)
	}
	if ev.Kind == pipeline.KindBackup {
		return nil // a piece of a tar stream or manifest: no WAL pages to check
	}
	if ev.Kind == pipeline.KindHistory {
		if _, err := pipeline.ParseHistory(raw); err != nil {
			return fmt.Errorf("history %s: %w", ev.File, err)
		}
		return nil
	}
	size := pipeline.SegmentSize(ev.SegSize)
	seg, err := pipeline.ParseSegmentName(ev.File, size)
	if err != nil {
		return err
	}
	from := uint64(0)
	if ev.Kind == pipeline.KindRange {
		from, _ = ev.RangeOffsets()
		err = pipeline.CheckRangePages(raw, seg, size, from)
	} else {
		err = pipeline.CheckSegmentPages(raw, seg, size)
	}
	if err != nil {
		return err
	}
	if id, ok := pipeline.SegmentSystemID(raw); ok && from == 0 && strconv.FormatUint(id, 10) != ev.SystemID {
		return fmt.Errorf("segment %s: written by system %d, event says %s", ev.File, id, ev.SystemID)
	}
	return nil
}

// checkIdentity writes the server's identity object on first use and
// refuses to archive into a prefix that belongs to another cluster.
func (a *Archiver) checkIdentity(ctx context.Context, layout sinks.Layout, ev *pipeline.SegmentEvent) error {
	a.mu.Lock()
	err, done := a.identities[ev.Server]
	a.mu.Unlock()
	if done {
		return err
	}
	want := sinks.Identity{SystemID: ev.SystemID, SegmentSize: ev.SegSize, Server: ev.Server}
	key := layout.IdentityKey()
	body := want.Body()
	err = a.sink.Put(ctx, key, body, sinks.Metadata{SHA256: sha256Hex(body), SystemID: ev.SystemID, Codec: "none", RawSize: int64(len(body))})
	if errors.Is(err, sinks.ErrExists) {
		err = a.compareIdentity(ctx, layout, want)
	}
	if err != nil && !errors.Is(err, errConflict) {
		return err // transient: try again with the next delivery
	}
	if err != nil {
		a.cfg.Metrics.Conflicts.WithLabelValues(ev.Server).Inc()
		a.log.Error("refusing to archive", "server", ev.Server, "error", err)
	}
	a.mu.Lock()
	a.identities[ev.Server] = err
	a.mu.Unlock()
	return err
}

func (a *Archiver) compareIdentity(ctx context.Context, layout sinks.Layout, want sinks.Identity) error {
	have, err := sinks.ReadIdentity(ctx, a.sink, layout)
	if errors.Is(err, sinks.ErrBadIdentity) {
		return fmt.Errorf("%w: %v: choose another --dest prefix", errConflict, err)
	}
	if err != nil {
		return err // transient (a missing one existed a moment ago)
	}
	if have.SystemID != want.SystemID || have.SegmentSize != want.SegmentSize {
		return fmt.Errorf("%w: %s belongs to system %s (segment size %d), not %s (segment size %d): another cluster archives here; use another --server or --dest prefix",
			errConflict, layout.IdentityKey(), have.SystemID, have.SegmentSize, want.SystemID, want.SegmentSize)
	}
	return nil
}

func sha256Hex(b []byte) string {
	sum := sha256.Sum256(b)
	return pipeline.SHA256Hex(sum[:])
}

// keepAlive sends InProgress every interval until stopped; a negative
// interval sends nothing.
func keepAlive(ctx context.Context, d Delivery, every time.Duration) func() {
	if every < 0 {
		return func() {}
	}
	ctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() {
		defer close(done)
		t := time.NewTicker(every)
		defer t.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-t.C:
				d.InProgress()
			}
		}
	}()
	return func() { cancel(); <-done }
}
