// Package bus is walship's NATS JetStream adapter: it creates the streams,
// consumer, object store and key-value bucket of DESIGN.md, and carries
// segment bytes and events between the receiver and the archivers.
package bus

import (
	"bytes"
	"context"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/walship/walship/internal/backoff"
	"github.com/walship/walship/internal/ratelog"
	"github.com/walship/walship/pipeline"
)

// Names are the JetStream resource names; DefaultNames gives DESIGN's.
type Names struct {
	Segments string // work-queue stream of segment events
	Archived string // limits stream of archived confirmations
	Spool    string // object store of staged segment bytes
	State    string // key-value bucket of per-server state
	Consumer string // durable consumer of the archiver pool
}

// DefaultNames are the resource names DESIGN.md gives.
func DefaultNames() Names {
	return Names{
		Segments: "WALSHIP_SEGMENTS",
		Archived: "WALSHIP_ARCHIVED",
		Spool:    "WALSHIP_SPOOL",
		State:    "WALSHIP_STATE",
		Consumer: "walship-archivers",
	}
}

// Options configure the bus.
type Options struct {
	Names    Names
	Replicas int           // 1 for one node, 3 in a cluster
	AckWait  time.Duration // how long an archiver may hold an event between progress signals
	// ArchivedMaxAge bounds how long confirmations are kept; receivers
	// replay the recent ones on restart.
	ArchivedMaxAge time.Duration
	DedupWindow    time.Duration
}

// DefaultOptions are the defaults for one node.
func DefaultOptions() Options {
	return Options{Names: DefaultNames(), Replicas: 1, AckWait: time.Minute, ArchivedMaxAge: 7 * 24 * time.Hour, DedupWindow: 2 * time.Minute}
}

// Bus is a connection to JetStream with walship's resources in place.
type Bus struct {
	nc   *nats.Conn
	js   jetstream.JetStream
	opts Options
	obj  jetstream.ObjectStore
	kv   jetstream.KeyValue
	log  *slog.Logger
	rl   *ratelog.Limiter

	consMu sync.Mutex
	cons   jetstream.Consumer // the archivers' consumer, looked up on first use
}

// SegmentSubject is the subject of a server's segment events.
func SegmentSubject(server string) string { return "walship." + server + ".segment" }

// ArchivedSubject is the subject of a server's archived confirmations.
func ArchivedSubject(server string) string { return "walship." + server + ".archived" }

// Connect dials NATS and creates or updates the resources. After a
// successful connect the client reconnects forever; callers see errors from
// individual operations while NATS is away, and retry.
func Connect(ctx context.Context, url string, opts Options, log *slog.Logger, extra ...nats.Option) (*Bus, error) {
	nopts := append([]nats.Option{
		nats.Name("walship"),
		nats.MaxReconnects(-1),
		nats.ReconnectWait(time.Second),
		nats.Timeout(5 * time.Second),
		nats.DisconnectErrHandler(func(_ *nats.Conn, err error) {
			if err != nil {
				log.Warn("nats disconnected", "error", err)
			}
		}),
		nats.ReconnectHandler(func(c *nats.Conn) { log.Info("nats reconnected", "url", c.ConnectedUrlRedacted()) }),
	}, extra...)
	nc, err := nats.Connect(url, nopts...)
	if err != nil {
		return nil, fmt.Errorf("cannot reach NATS at %s: %v: start a JetStream-enabled nats-server or fix --nats", redact(url), err)
	}
	js, err := jetstream.New(nc)
	if err != nil {
		nc.Close()
		return nil, fmt.Errorf("jetstream: %w", err)
	}
	b := &Bus{nc: nc, js: js, opts: opts, log: log, rl: ratelog.New(log, 30*time.Second)}
	if err := b.setup(ctx); err != nil {
		nc.Close()
		return nil, err
	}
	return b, nil
}

// Close drains nothing and closes the connection.
func (b *Bus) Close() { b.nc.Close() }

// Conn is the underlying connection, for health checks.
func (b *Bus) Conn() *nats.Conn { return b.nc }

func (b *Bus) setup(ctx context.Context) error {
	n := b.opts.Names
	if _, err := b.js.AccountInfo(ctx); err != nil {
		if errors.Is(err, jetstream.ErrJetStreamNotEnabled) || errors.Is(err, jetstream.ErrJetStreamNotEnabledForAccount) {
			return errors.New("NATS server has JetStream disabled: start nats-server with -js")
		}
		return fmt.Errorf("jetstream account info: %w", err)
	}
	_, err := b.js.CreateOrUpdateStream(ctx, jetstream.StreamConfig{
		Name:        n.Segments,
		Description: "walship segment events, consumed once by the archiver pool",
		Subjects:    []string{"walship.*.segment"},
		Retention:   jetstream.WorkQueuePolicy,
		Storage:     jetstream.FileStorage,
		Replicas:    b.opts.Replicas,
		Duplicates:  b.opts.DedupWindow,
	})
	if err != nil {
		return fmt.Errorf("create stream %s: %w", n.Segments, err)
	}
	_, err = b.js.CreateOrUpdateStream(ctx, jetstream.StreamConfig{
		Name:        n.Archived,
		Description: "walship confirmations: WAL files durably in the sink",
		Subjects:    []string{"walship.*.archived"},
		Retention:   jetstream.LimitsPolicy,
		Storage:     jetstream.FileStorage,
		Replicas:    b.opts.Replicas,
		MaxAge:      b.opts.ArchivedMaxAge,
		Duplicates:  b.opts.DedupWindow,
	})
	if err != nil {
		return fmt.Errorf("create stream %s: %w", n.Archived, err)
	}
	_, err = b.js.CreateOrUpdateConsumer(ctx, n.Segments, jetstream.ConsumerConfig{
		Durable:       n.Consumer,
		Description:   "walship archiver pool",
		AckPolicy:     jetstream.AckExplicitPolicy,
		AckWait:       b.opts.AckWait,
		MaxDeliver:    -1,
		MaxAckPending: 1024,
		FilterSubject: "walship.*.segment",
	})
	if err != nil {
		return fmt.Errorf("create consumer %s: %w", n.Consumer, err)
	}
	b.obj, err = b.js.CreateOrUpdateObjectStore(ctx, jetstream.ObjectStoreConfig{
		Bucket:      n.Spool,
		Description: "walship staged segment bytes",
		Storage:     jetstream.FileStorage,
		Replicas:    b.opts.Replicas,
	})
	if err != nil {
		return fmt.Errorf("create object store %s: %w", n.Spool, err)
	}
	b.kv, err = b.js.CreateOrUpdateKeyValue(ctx, jetstream.KeyValueConfig{
		Bucket:      n.State,
		Description: "walship per-server state",
		Storage:     jetstream.FileStorage,
		Replicas:    b.opts.Replicas,
	})
	if err != nil {
		return fmt.Errorf("create key-value %s: %w", n.State, err)
	}
	return nil
}

// PutObject stages a WAL file's bytes in the object store.
func (b *Bus) PutObject(ctx context.Context, name string, r io.Reader) error {
	// Large chunks mean fewer messages per segment: less CPU on both ends.
	chunk := min(b.nc.MaxPayload()-8192, 1<<20)
	meta := jetstream.ObjectMeta{Name: name, Opts: &jetstream.ObjectMetaOptions{ChunkSize: uint32(max(chunk, 128<<10))}}
	if _, err := b.obj.Put(ctx, meta, r); err != nil {
		return fmt.Errorf("stage object %s: %w", name, err)
	}
	return nil
}

// GetObject reads a staged object fully into buf (reused when large
// enough) and returns the bytes. A missing object wraps os.ErrNotExist.
func (b *Bus) GetObject(ctx context.Context, name string, buf []byte) ([]byte, error) {
	res, err := b.obj.Get(ctx, name)
	if errors.Is(err, jetstream.ErrObjectNotFound) {
		return nil, fmt.Errorf("get staged object %s: %w", name, os.ErrNotExist)
	}
	if err != nil {
		return nil, fmt.Errorf("get staged object %s: %w", name, err)
	}
	defer res.Close()
	info, err := res.Info()
	if err != nil {
		return nil, fmt.Errorf("get staged object %s: %w", name, err)
	}
	size := int(info.Size)
	if cap(buf) < size {
		buf = make([]byte, size)
	}
	out := buf[:size]
	if _, err := io.ReadFull(res, out); err != nil {
		return nil, fmt.Errorf("read staged object %s: %w", name, err)
	}
	return out, nil
}

// DeleteObject removes a staged object; a missing one is not an error.
func (b *Bus) DeleteObject(ctx context.Context, name string) error {
	if err := b.obj.Delete(ctx, name); err != nil && !errors.Is(err, jetstream.ErrObjectNotFound) {
		return fmt.Errorf("delete staged object %s: %w", name, err)
	}
	return nil
}

// HasObject reports whether the object store holds name with the given
// SHA-256 (hex), so a republish needs no new copy of the bytes.
func (b *Bus) HasObject(ctx context.Context, name, sha256 string) (bool, error) {
	info, err := b.obj.GetInfo(ctx, name)
	if errors.Is(err, jetstream.ErrObjectNotFound) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("staged object %s: %w", name, err)
	}
	if info.Deleted {
		return false, nil
	}
	got, err := jetstream.DecodeObjectDigest(info.Digest)
	if err != nil {
		return false, nil
	}
	want, err := hex.DecodeString(sha256)
	return err == nil && bytes.Equal(got, want), nil
}

// PublishSegment publishes a segment event, waits for JetStream's ack and
// returns the event's stream sequence.
func (b *Bus) PublishSegment(ctx context.Context, ev *pipeline.SegmentEvent) (uint64, error) {
	data, err := json.Marshal(ev)
	if err != nil {
		return 0, err
	}
	ack, err := b.js.Publish(ctx, SegmentSubject(ev.Server), data, jetstream.WithMsgID(ev.PublishID()))
	if err != nil {
		return 0, fmt.Errorf("publish segment event %s: %w", ev.File, err)
	}
	return ack.Sequence, nil
}

// Queued reports whether the segment event with stream sequence seq and
// message ID msgID is still in the work queue: not yet acknowledged or
// terminated by an archiver.
func (b *Bus) Queued(ctx context.Context, seq uint64, msgID string) (bool, error) {
	s, err := b.js.Stream(ctx, b.opts.Names.Segments)
	if err != nil {
		return false, fmt.Errorf("stream %s: %w", b.opts.Names.Segments, err)
	}
	m, err := s.GetMsg(ctx, seq)
	if errors.Is(err, jetstream.ErrMsgNotFound) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("stream %s message %d: %w", b.opts.Names.Segments, seq, err)
	}
	return m.Header.Get(jetstream.MsgIDHeader) == msgID, nil
}

// PublishArchived publishes an archived confirmation and waits for
// JetStream's ack.
func (b *Bus) PublishArchived(ctx context.Context, ev *pipeline.ArchivedEvent) error {
	data, err := json.Marshal(ev)
	if err != nil {
		return err
	}
	if _, err := b.js.Publish(ctx, ArchivedSubject(ev.Server), data, jetstream.WithMsgID(ev.PublishID()+"/archived")); err != nil {
		return fmt.Errorf("publish archived event %s: %w", ev.File, err)
	}
	return nil
}

// Consumer is the archiver pool's durable consumer.
func (b *Bus) consumer(ctx context.Context) (jetstream.Consumer, error) {
	c, err := b.js.Consumer(ctx, b.opts.Names.Segments, b.opts.Names.Consumer)
	if err != nil {
		return nil, fmt.Errorf("consumer %s: %w", b.opts.Names.Consumer, err)
	}
	return c, nil
}

// WatchArchived calls fn for every archived confirmation of server stored
// since the given time, then for each new one, one at a time, until ctx is
// done. It uses an ordered consumer, which recreates itself across NATS
// outages; when the consumer cannot be created at all (NATS unreachable at
// that moment) it retries with back-off, so it returns only when ctx is
// done. After a recreation it resumes after the last event it delivered.
// Events it cannot decode go to bad.
func (b *Bus) WatchArchived(ctx context.Context, server string, since time.Time, fn func(pipeline.ArchivedEvent), bad func(error)) error {
	subject := ArchivedSubject(server)
	bo := backoff.New(250*time.Millisecond, 10*time.Second)
	var last atomic.Uint64 // stream sequence of the last event delivered
	for ctx.Err() == nil {
		cfg := jetstream.OrderedConsumerConfig{FilterSubjects: []string{subject}}
		if seq := last.Load(); seq == 0 {
			cfg.DeliverPolicy, cfg.OptStartTime = jetstream.DeliverByStartTimePolicy, &since
		} else {
			cfg.DeliverPolicy, cfg.OptStartSeq = jetstream.DeliverByStartSequencePolicy, seq+1
		}
		c, err := b.js.OrderedConsumer(ctx, b.opts.Names.Archived, cfg)
		var cc jetstream.ConsumeContext
		// Callbacks run on the client's goroutine; none may run after the
		// watch returns (the caller may be gone).
		var mu sync.Mutex
		stopped := false
		if err == nil {
			cc, err = c.Consume(func(m jetstream.Msg) {
				mu.Lock()
				defer mu.Unlock()
				if stopped {
					return
				}
				if md, err := m.Metadata(); err == nil {
					last.Store(md.Sequence.Stream)
				}
				ev, err := pipeline.DecodeArchivedEvent(m.Data())
				if err != nil {
					bad(err)
					return
				}
				fn(ev)
			})
		}
		if err != nil {
			b.rl.Warn("watch/"+server, "cannot watch confirmations; retrying", "server", server, "subject", subject, "error", err)
			bo.Wait(ctx)
			continue
		}
		b.rl.Reset("watch/" + server)
		bo.Reset()
		select {
		case <-ctx.Done():
		case <-cc.Closed():
		}
		cc.Stop()
		mu.Lock()
		stopped = true
		mu.Unlock()
	}
	return nil
}

// PutState records a server's state (JSON) in the key-value bucket.
func (b *Bus) PutState(ctx context.Context, server string, state []byte) error {
	if _, err := b.kv.Put(ctx, server, state); err != nil {
		return fmt.Errorf("put state %s: %w", server, err)
	}
	return nil
}

// Pending is the number of segment events not yet acknowledged by the
// archiver pool: waiting plus in flight.
func (b *Bus) Pending(ctx context.Context) (uint64, error) {
	c, err := b.consumer(ctx)
	if err != nil {
		return 0, err
	}
	info, err := c.Info(ctx)
	if err != nil {
		return 0, err
	}
	return info.NumPending + uint64(info.NumAckPending), nil
}

// redact removes a password from a NATS URL before it is shown.
func redact(url string) string {
	if at := strings.LastIndex(url, "@"); at >= 0 {
		if scheme := strings.Index(url, "://"); scheme >= 0 && scheme < at {
			return url[:scheme+3] + "***" + url[at:]
		}
	}
	return url
}

// Inspect reports problems with walship's JetStream resources without
// changing anything: JetStream must be enabled; streams and the consumer,
// where they exist, must have the retention and acknowledgement walship
// relies on. Missing resources are not problems: walship creates them.
func Inspect(ctx context.Context, url string, names Names) ([]string, error) {
	nc, err := nats.Connect(url, nats.Name("walship-check"), nats.Timeout(5*time.Second))
	if err != nil {
		return nil, fmt.Errorf("cannot reach NATS at %s: %v: start a JetStream-enabled nats-server or fix --nats", redact(url), err)
	}
	defer nc.Close()
	js, err := jetstream.New(nc)
	if err != nil {
		return nil, err
	}
	if _, err := js.AccountInfo(ctx); err != nil {
		if errors.Is(err, jetstream.ErrJetStreamNotEnabled) || errors.Is(err, jetstream.ErrJetStreamNotEnabledForAccount) {
			return nil, errors.New("NATS server has JetStream disabled: start nats-server with -js")
		}
		return nil, fmt.Errorf("jetstream: %w", err)
	}
	var probs []string
	if s, err := js.Stream(ctx, names.Segments); err == nil {
		if cfg := s.CachedInfo().Config; cfg.Retention != jetstream.WorkQueuePolicy {
			probs = append(probs, fmt.Sprintf("stream %s has %s retention, want workqueue: delete it and let walship recreate it", names.Segments, cfg.Retention))
		}
		if c, err := s.Consumer(ctx, names.Consumer); err == nil {
			cfg := c.CachedInfo().Config
			if cfg.AckPolicy != jetstream.AckExplicitPolicy || (cfg.MaxDeliver != -1 && cfg.MaxDeliver != 0) {
				probs = append(probs, fmt.Sprintf("consumer %s: ack %s, max deliver %d; want explicit and unlimited so no segment is dropped", names.Consumer, cfg.AckPolicy, cfg.MaxDeliver))
			}
		}
	}
	if s, err := js.Stream(ctx, names.Archived); err == nil {
		if cfg := s.CachedInfo().Config; cfg.Retention != jetstream.LimitsPolicy {
			probs = append(probs, fmt.Sprintf("stream %s has %s retention, want limits", names.Archived, cfg.Retention))
		}
	}
	return probs, nil
}

// Snapshot is what `walship status` reads from JetStream.
type Snapshot struct {
	States       []pipeline.ServerState
	LastArchived map[string]*pipeline.ArchivedEvent // by server
	ArchivedAt   map[string]time.Time
	Backlog      uint64
	BacklogKnown bool
}

// ReadSnapshot reads every server's state, its last archived
// confirmation, and the archiver backlog, without changing anything.
func ReadSnapshot(ctx context.Context, url string, names Names) (*Snapshot, error) {
	nc, err := nats.Connect(url, nats.Name("walship-status"), nats.Timeout(5*time.Second))
	if err != nil {
		return nil, fmt.Errorf("cannot reach NATS at %s: %v: fix --nats", redact(url), err)
	}
	defer nc.Close()
	js, err := jetstream.New(nc)
	if err != nil {
		return nil, err
	}
	snap := &Snapshot{LastArchived: map[string]*pipeline.ArchivedEvent{}, ArchivedAt: map[string]time.Time{}}
	kv, err := js.KeyValue(ctx, names.State)
	if err != nil {
		return nil, fmt.Errorf("no walship state in NATS (%s: %v): has a receiver run against this NATS?", names.State, err)
	}
	keys, err := kv.Keys(ctx)
	if err != nil && !errors.Is(err, jetstream.ErrNoKeysFound) {
		return nil, fmt.Errorf("list %s: %w", names.State, err)
	}
	stream, serr := js.Stream(ctx, names.Archived)
	for _, k := range keys {
		e, err := kv.Get(ctx, k)
		if err != nil {
			continue
		}
		var st pipeline.ServerState
		if json.Unmarshal(e.Value(), &st) != nil {
			continue
		}
		snap.States = append(snap.States, st)
		if serr == nil {
			if m, err := stream.GetLastMsgForSubject(ctx, ArchivedSubject(st.Server)); err == nil {
				if ev, err := pipeline.DecodeArchivedEvent(m.Data); err == nil {
					snap.LastArchived[st.Server] = &ev
					snap.ArchivedAt[st.Server] = m.Time
				}
			}
		}
	}
	if c, err := js.Consumer(ctx, names.Segments, names.Consumer); err == nil {
		if info, err := c.Info(ctx); err == nil {
			snap.Backlog = info.NumPending + uint64(info.NumAckPending)
			snap.BacklogKnown = true
		}
	}
	return snap, nil
}
