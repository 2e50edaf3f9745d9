// Package archiver is the worker pool that takes segment events from
// JetStream, verifies the bytes, compresses them, stores them in the sink
// with put-if-absent, and confirms with an archived event. An event is
// acknowledged only after the object is durable and the confirmation is
// acknowledged by JetStream; a failed upload is retried forever.
package archiver

import (
	"context"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"strconv"
	"sync"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/sync/errgroup"

	"github.com/walship/walship/compress"
	"github.com/walship/walship/internal/backoff"
	"github.com/walship/walship/internal/ratelog"
	"github.com/walship/walship/pipeline"
	"github.com/walship/walship/sinks"
)

// Bus is what the archiver needs from JetStream.
type Bus interface {
	Consumer(ctx context.Context) (jetstream.Consumer, error)
	GetObject(ctx context.Context, name string, buf []byte) ([]byte, error)
	DeleteObject(ctx context.Context, name string) error
	PublishArchived(ctx context.Context, ev *pipeline.ArchivedEvent) error
	Pending(ctx context.Context) (uint64, error)
}

// Config configures the pool.
type Config struct {
	Workers   int
	Codec     compress.Codec
	Level     int
	Layout    func(server string) sinks.Layout
	ReadSpool bool // read segments from the receiver's spool path when present (same host)
	Log       *slog.Logger
	Metrics   *Metrics
}

// Archiver is a pool of workers sharing one durable consumer.
type Archiver struct {
	cfg  Config
	bus  Bus
	sink sinks.Sink
	log  *slog.Logger
	rl   *ratelog.Limiter

	mu         sync.Mutex
	identities map[string]error // server → result of the identity check
	seen       map[string]bool  // servers whose series exist
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
	if _, err := compress.NewEncoder(cfg.Codec, cfg.Level); err != nil {
		return nil, err
	}
	return &Archiver{cfg: cfg, bus: bus, sink: sink, log: cfg.Log, rl: ratelog.New(cfg.Log, 30*time.Second),
		identities: map[string]error{}, seen: map[string]bool{}}, nil
}

// Run runs the workers until ctx is done. Each finishes the event it holds
// before returning, unless ctx cancellation interrupts a network call; an
// interrupted event is simply redelivered.
func (a *Archiver) Run(ctx context.Context) error {
	g, ctx := errgroup.WithContext(ctx)
	g.Go(func() error { return a.watchBacklog(ctx, 10*time.Second) })
	for i := 0; i < a.cfg.Workers; i++ {
		g.Go(func() error { return a.worker(ctx) })
	}
	return g.Wait()
}

// watchBacklog publishes the consumer's backlog (events waiting plus in
// flight) as a gauge.
func (a *Archiver) watchBacklog(ctx context.Context, every time.Duration) error {
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		if n, err := a.bus.Pending(ctx); err == nil {
			a.cfg.Metrics.Backlog.Set(float64(n))
		}
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
	}
}

type worker struct {
	enc *compress.Encoder
	raw []byte
}

func (a *Archiver) worker(ctx context.Context) error {
	enc, err := compress.NewEncoder(a.cfg.Codec, a.cfg.Level)
	if err != nil {
		return err
	}
	w := &worker{enc: enc}
	bo := backoff.New(500*time.Millisecond, 15*time.Second)
	var cons jetstream.Consumer
	for ctx.Err() == nil {
		if cons == nil {
			if cons, err = a.bus.Consumer(ctx); err != nil {
				cons = nil
				a.fail("consume", "cannot reach the archiver consumer; retrying", "", err)
				bo.Wait(ctx)
				continue
			}
		}
		fctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		batch, err := cons.Fetch(1, jetstream.FetchContext(fctx))
		if err != nil {
			cancel()
			if ctx.Err() != nil {
				return nil
			}
			a.fail("consume", "cannot fetch segment events; retrying", "", err)
			cons = nil
			bo.Wait(ctx)
			continue
		}
		for msg := range batch.Messages() {
			a.handle(ctx, w, msg)
		}
		cancel()
		if err := batch.Error(); err != nil && !errors.Is(err, jetstream.ErrNoMessages) &&
			!errors.Is(err, context.DeadlineExceeded) && !errors.Is(err, context.Canceled) && ctx.Err() == nil {
			a.fail("consume", "fetch failed; retrying", "", err)
			cons = nil
			bo.Wait(ctx)
			continue
		}
		bo.Reset()
		a.rl.Reset("consume")
	}
	return nil
}

func (a *Archiver) fail(stage, msg, server string, err error, args ...any) {
	a.cfg.Metrics.Errors.WithLabelValues(server, stage).Inc()
	a.rl.Warn(stage+"/"+server, msg, append([]any{"server", server, "stage", stage, "error", err}, args...)...)
}

// handle processes one event. Every path ends in exactly one of: ack
// (archived and confirmed), nak with delay (try again later), or term
// (malformed, never processable).
func (a *Archiver) handle(ctx context.Context, w *worker, msg jetstream.Msg) {
	ev, err := pipeline.DecodeSegmentEvent(msg.Data())
	if err != nil {
		a.cfg.Metrics.Malformed.Inc()
		a.log.Error("terminating malformed segment event", "error", err, "subject", msg.Subject())
		msg.Term()
		return
	}
	a.initSeries(ev.Server)
	// Tell JetStream we are alive while we work, so long uploads are not
	// redelivered to another worker.
	stop := keepAlive(ctx, msg, 15*time.Second)
	defer stop()

	res, err := a.archive(ctx, w, &ev)
	if err != nil {
		if ctx.Err() != nil {
			msg.Nak()
			return
		}
		var delay time.Duration = 30 * time.Second
		if errors.Is(err, errConflict) {
			delay = 5 * time.Minute
		}
		a.fail("archive", "cannot archive segment; it will be retried", ev.Server, err, "segment", ev.File)
		msg.NakWithDelay(delay)
		return
	}
	bo := backoff.New(250*time.Millisecond, 10*time.Second)
	for {
		err := a.bus.PublishArchived(ctx, res)
		if err == nil {
			break
		}
		if ctx.Err() != nil {
			return // not acked: redelivered, and the upload is idempotent
		}
		a.fail("confirm", "cannot publish archived event; retrying", ev.Server, err, "segment", ev.File)
		bo.Wait(ctx)
	}
	if err := msg.DoubleAck(ctx); err != nil {
		a.fail("ack", "cannot acknowledge segment event; it may be redelivered", ev.Server, err, "segment", ev.File)
	}
	if ev.Object != "" {
		if err := a.bus.DeleteObject(ctx, ev.Object); err != nil {
			a.fail("cleanup", "cannot delete staged object", ev.Server, err, "segment", ev.File)
		}
	}
	m := a.cfg.Metrics
	m.Segments.WithLabelValues(ev.Server).Inc()
	m.RawBytes.WithLabelValues(ev.Server).Add(float64(ev.Size))
	m.CompressedBytes.WithLabelValues(ev.Server).Add(float64(res.CompressedSize))
	m.Upload.WithLabelValues(ev.Server).Observe(res.UploadSeconds)
	a.rl.Reset("archive/" + ev.Server)
	a.log.Debug("archived", "server", ev.Server, "segment", ev.File, "key", res.Key, "existed", res.Existed)
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
	for _, stage := range []string{"archive", "upload", "confirm", "ack", "cleanup"} {
		m.Errors.WithLabelValues(server, stage).Add(0)
	}
	m.Conflicts.WithLabelValues(server).Add(0)
	m.Corrupt.WithLabelValues(server).Add(0)
	m.Segments.WithLabelValues(server).Add(0)
	m.RawBytes.WithLabelValues(server).Add(0)
	m.CompressedBytes.WithLabelValues(server).Add(0)
}

var errConflict = errors.New("archive conflict")

// archive reads, verifies, compresses and uploads one WAL file, retrying
// the upload until it succeeds or ctx ends.
func (a *Archiver) archive(ctx context.Context, w *worker, ev *pipeline.SegmentEvent) (*pipeline.ArchivedEvent, error) {
	layout := a.cfg.Layout(ev.Server)
	if err := a.checkIdentity(ctx, layout, ev); err != nil {
		return nil, err
	}
	key := layout.Key(archiveName(ev), a.cfg.Codec.Ext())
	raw, err := a.read(ctx, w, ev)
	if errors.Is(err, os.ErrNotExist) || errors.Is(err, jetstream.ErrObjectNotFound) {
		// The bytes are gone from the spool and the object store: most
		// likely a redelivery of an event already archived. The sink says.
		meta, herr := a.sink.Head(ctx, key)
		if herr == nil && meta.SHA256 == ev.SHA256 {
			return a.result(ev, key, 0, 0, true), nil
		}
		return nil, fmt.Errorf("segment %s: bytes not available (%v); the receiver will publish it again", ev.File, err)
	}
	if err != nil {
		return nil, err
	}
	if err := verify(raw, ev); err != nil {
		a.cfg.Metrics.Corrupt.WithLabelValues(ev.Server).Inc()
		return nil, err
	}
	body, err := w.enc.Encode(raw)
	if err != nil {
		return nil, fmt.Errorf("compress %s: %w", ev.File, err)
	}
	meta := sinks.Metadata{
		SHA256: ev.SHA256, StartLSN: ev.StartLSN.String(), EndLSN: ev.EndLSN.String(),
		Timeline: ev.Timeline, SystemID: ev.SystemID, Codec: string(a.cfg.Codec), RawSize: ev.Size,
	}
	bo := backoff.New(500*time.Millisecond, 30*time.Second)
	for {
		began := time.Now()
		err := a.sink.Put(ctx, key, body, meta)
		took := time.Since(began).Seconds()
		if err == nil {
			return a.result(ev, key, int64(len(body)), took, false), nil
		}
		if errors.Is(err, sinks.ErrExists) {
			same, err := a.sameObject(ctx, key, ev)
			if err == nil && same {
				return a.result(ev, key, int64(len(body)), took, true), nil
			}
			if err == nil {
				a.cfg.Metrics.Conflicts.WithLabelValues(ev.Server).Inc()
				a.log.Error("archive conflict: the sink holds different bytes under this key; refusing to overwrite",
					"server", ev.Server, "segment", ev.File, "key", key)
				return nil, fmt.Errorf("%w: %s holds different bytes than segment %s", errConflict, key, ev.File)
			}
		}
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		a.fail("upload", "upload failed; retrying", ev.Server, err, "segment", ev.File, "key", key)
		bo.Wait(ctx)
	}
}

func (a *Archiver) result(ev *pipeline.SegmentEvent, key string, compressed int64, took float64, existed bool) *pipeline.ArchivedEvent {
	return &pipeline.ArchivedEvent{SegmentEvent: *ev, Key: key, Codec: string(a.cfg.Codec),
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
// else from the object store.
func (a *Archiver) read(ctx context.Context, w *worker, ev *pipeline.SegmentEvent) ([]byte, error) {
	if a.cfg.ReadSpool && ev.Spool != "" {
		f, err := os.Open(ev.Spool)
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
		if ev.Object == "" {
			return nil, err
		}
	}
	if ev.Object == "" {
		return nil, fmt.Errorf("segment %s is only in the receiver's spool and this archiver cannot read it: %w", ev.File, os.ErrNotExist)
	}
	data, err := a.bus.GetObject(ctx, ev.Object, w.raw)
	if err != nil {
		return nil, err
	}
	if cap(data) > cap(w.raw) {
		w.raw = data[:0]
	}
	return data, nil
}

// verify checks the bytes against the event: size, SHA-256, and for
// segments the WAL page headers and the system identifier.
func verify(raw []byte, ev *pipeline.SegmentEvent) error {
	if int64(len(raw)) != ev.Size {
		return fmt.Errorf("segment %s: %d bytes, event says %d", ev.File, len(raw), ev.Size)
	}
	sum := sha256.Sum256(raw)
	if got := pipeline.SHA256Hex(sum[:]); got != ev.SHA256 {
		return fmt.Errorf("segment %s: sha256 %s, event says %s", ev.File, got, ev.SHA256)
	}
	if ev.Kind != pipeline.KindSegment {
		return nil
	}
	size := pipeline.SegmentSize(ev.SegSize)
	seg, err := pipeline.ParseSegmentName(ev.File, size)
	if err != nil {
		return err
	}
	if err := pipeline.CheckSegmentPages(raw, seg, size); err != nil {
		return err
	}
	if id, ok := pipeline.SegmentSystemID(raw); ok && strconv.FormatUint(id, 10) != ev.SystemID {
		return fmt.Errorf("segment %s: written by system %d, event says %s", ev.File, id, ev.SystemID)
	}
	return nil
}

// sameObject reports whether the object at key holds the event's bytes:
// by its metadata, or, when that is missing, by downloading it.
func (a *Archiver) sameObject(ctx context.Context, key string, ev *pipeline.SegmentEvent) (bool, error) {
	meta, err := a.sink.Head(ctx, key)
	if err != nil {
		return false, err
	}
	if meta.SHA256 != "" {
		return meta.SHA256 == ev.SHA256, nil
	}
	rc, meta, err := a.sink.Get(ctx, key)
	if err != nil {
		return false, err
	}
	defer rc.Close()
	codec, ok := compress.CodecForExt(a.cfg.Codec.Ext())
	if !ok {
		codec = compress.None
	}
	dr, err := compress.NewReader(codec, rc)
	if err != nil {
		return false, err
	}
	defer dr.Close()
	h := sha256.New()
	if _, err := io.Copy(h, dr); err != nil {
		return false, fmt.Errorf("read existing %s: %w", key, err)
	}
	return pipeline.SHA256Hex(h.Sum(nil)) == ev.SHA256, nil
}

// Identity is the small object that ties an archive prefix to one cluster.
type Identity struct {
	SystemID    string `json:"system_id"`
	SegmentSize uint64 `json:"wal_segment_size"`
	Server      string `json:"server"`
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
	want := Identity{SystemID: ev.SystemID, SegmentSize: ev.SegSize, Server: ev.Server}
	body, _ := json.Marshal(want)
	key := layout.IdentityKey()
	err = a.sink.Put(ctx, key, body, sinks.Metadata{SystemID: ev.SystemID, Codec: "none", RawSize: int64(len(body))})
	if errors.Is(err, sinks.ErrExists) {
		err = a.compareIdentity(ctx, key, want)
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

func (a *Archiver) compareIdentity(ctx context.Context, key string, want Identity) error {
	rc, _, err := a.sink.Get(ctx, key)
	if err != nil {
		return err
	}
	defer rc.Close()
	var have Identity
	data, err := io.ReadAll(io.LimitReader(rc, 1<<16))
	if err != nil {
		return err
	}
	if err := json.Unmarshal(data, &have); err != nil {
		return fmt.Errorf("%w: %s is not a walship identity object: choose another --dest prefix", errConflict, key)
	}
	if have.SystemID != want.SystemID || have.SegmentSize != want.SegmentSize {
		return fmt.Errorf("%w: %s belongs to system %s (segment size %d), not %s (segment size %d): another cluster archives here; use another --server or --dest prefix",
			errConflict, key, have.SystemID, have.SegmentSize, want.SystemID, want.SegmentSize)
	}
	return nil
}

// keepAlive sends InProgress every interval until stopped.
func keepAlive(ctx context.Context, msg jetstream.Msg, every time.Duration) func() {
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
				msg.InProgress()
			}
		}
	}()
	return func() { cancel(); <-done }
}
