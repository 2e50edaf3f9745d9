// Package bus is walship's NATS JetStream adapter: it creates the streams,
// consumer, object store and key-value bucket of DESIGN.md, and carries
// segment bytes and events between the receiver and the archivers.
package bus

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
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
	// Processes is the key-value bucket where each walship process records
	// whether it can reach what it needs; its entries expire.
	Processes string
}

// DefaultNames are the resource names DESIGN.md gives.
func DefaultNames() Names {
	return Names{
		Segments:  "WALSHIP_SEGMENTS",
		Archived:  "WALSHIP_ARCHIVED",
		Spool:     "WALSHIP_SPOOL",
		State:     "WALSHIP_STATE",
		Consumer:  "walship-archivers",
		Processes: "WALSHIP_PROCESSES",
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

// Bus is a connection to JetStream with walship's resources in place, or,
// from Open, on its way there: until Setup has created the resources every
// operation fails with an error wrapping ErrNotReady (Next and
// WatchArchived wait instead).
type Bus struct {
	nc   *nats.Conn
	js   jetstream.JetStream
	url  string
	opts Options
	log  *slog.Logger
	rl   *ratelog.Limiter

	setupMu sync.Mutex
	res     atomic.Pointer[resources] // nil until Setup created them
	ready   chan struct{}             // closed when res is set
	wake    chan struct{}             // the connection was made or lost: check now
	connErr atomic.Pointer[error]     // the last failed connection attempt

	pool  pool         // the archivers' consumers, one per server (fair.go)
	fetch consumeState // how the archivers' last fetch went (Consuming)
}

// resources are what Setup creates.
type resources struct {
	obj   jetstream.ObjectStore
	kv    jetstream.KeyValue
	procs jetstream.KeyValue
}

// ErrNotReady is wrapped by operations tried before Setup has created
// walship's resources (NATS unreachable since the process started).
var ErrNotReady = errors.New("nats not ready")

// errNotConnected is the reason while no connection attempt has failed yet.
var errNotConnected = errors.New("not connected")

// SegmentSubject is the subject of a server's segment events.
func SegmentSubject(server string) string { return "walship." + server + ".segment" }

// ArchivedSubject is the subject of a server's archived confirmations.
func ArchivedSubject(server string) string { return "walship." + server + ".archived" }

// Connect dials NATS and creates or updates the resources; an unreachable
// server is an error at once. After a successful connect the client
// reconnects forever; callers see errors from individual operations while
// NATS is away, and retry. Unavailable tells from its error whether NATS
// was only unreachable.
func Connect(ctx context.Context, url string, opts Options, log *slog.Logger, extra ...nats.Option) (*Bus, error) {
	b, err := dial(url, opts, log, false, extra...)
	if err != nil {
		return nil, err
	}
	if err := b.Setup(ctx); err != nil {
		b.Close()
		return nil, err
	}
	return b, nil
}

// Open is Connect for a process that waits out an unreachable NATS: it
// returns at once, the client connects (and reconnects) in the background
// every second, and the resources are created by Setup, which the caller
// retries until it succeeds (ConnChanged says when a connection was made).
// Only a malformed URL or option is an error.
func Open(url string, opts Options, log *slog.Logger, extra ...nats.Option) (*Bus, error) {
	return dial(url, opts, log, true, extra...)
}

func dial(url string, opts Options, log *slog.Logger, retry bool, extra ...nats.Option) (*Bus, error) {
	b := &Bus{url: url, opts: opts, log: log, rl: ratelog.New(log, 30*time.Second),
		ready: make(chan struct{}), wake: make(chan struct{}, 1)}
	b.pool.init()
	nudge := func() {
		select {
		case b.wake <- struct{}{}:
		default:
		}
	}
	nopts := append([]nats.Option{
		nats.Name("walship"),
		nats.MaxReconnects(-1),
		nats.ReconnectWait(time.Second),
		nats.Timeout(5 * time.Second),
		nats.RetryOnFailedConnect(retry),
		nats.DisconnectErrHandler(func(_ *nats.Conn, err error) {
			if err != nil {
				log.Warn("nats disconnected", "error", err)
			}
			nudge()
		}),
		nats.ReconnectErrHandler(func(_ *nats.Conn, err error) {
			if err != nil {
				b.connErr.Store(&err)
			}
		}),
		// Asynchronous errors (a permissions violation above all) go to the
		// log, not to nats.go's default of printing on stderr.
		nats.ErrorHandler(func(_ *nats.Conn, _ *nats.Subscription, err error) {
			if Permission(err) {
				b.rl.Warn("nats-permission", "NATS refused an operation: grant the user the subject (see deploy/nats/accounts.conf)", "error", err)
				return
			}
			b.rl.Warn("nats-async", "nats error", "error", err)
		}),
		nats.ConnectHandler(func(c *nats.Conn) {
			log.Info("nats connected", "url", c.ConnectedUrlRedacted())
			nudge()
		}),
		nats.ReconnectHandler(func(c *nats.Conn) {
			log.Info("nats reconnected", "url", c.ConnectedUrlRedacted())
			nudge()
		}),
	}, extra...)
	nc, err := nats.Connect(url, nopts...)
	if err != nil {
		if e := explainConnError(url, err); e != err {
			return nil, e
		}
		return nil, fmt.Errorf("cannot reach NATS at %s: %w: start a JetStream-enabled nats-server or fix --nats", redact(url), err)
	}
	js, err := jetstream.New(nc)
	if err != nil {
		nc.Close()
		return nil, fmt.Errorf("jetstream: %w", err)
	}
	b.nc, b.js = nc, js
	return b, nil
}

// Close drains nothing and closes the connection.
func (b *Bus) Close() { b.nc.Close() }

// Conn is the underlying connection, for health checks.
func (b *Bus) Conn() *nats.Conn { return b.nc }

// ConnChanged is signalled when the client connects, reconnects or
// disconnects: a moment to call Setup without waiting for the next retry.
func (b *Bus) ConnChanged() <-chan struct{} { return b.wake }

// Setup creates or updates walship's resources once a server answers, and
// after that reports whether the bus can be used now: nil when connected
// and JetStream answers. Its errors satisfy Unavailable when NATS is only
// unreachable or not answering, so that the caller waits and tries again.
func (b *Bus) Setup(ctx context.Context) error {
	b.setupMu.Lock()
	defer b.setupMu.Unlock()
	if !b.nc.IsConnected() {
		return b.unreachable()
	}
	if b.res.Load() != nil {
		if _, err := b.js.AccountInfo(ctx); err != nil {
			return fmt.Errorf("nats at %s: jetstream: %w", redact(b.url), err)
		}
		return nil
	}
	r, err := b.setupRetrying(ctx)
	if err != nil {
		return err
	}
	b.res.Store(r)
	close(b.ready)
	return nil
}

// unreachable says why there is no connection.
func (b *Bus) unreachable() error {
	cause := errNotConnected
	if p := b.connErr.Load(); p != nil {
		cause = *p
		if e := explainConnError(b.url, cause); e != cause {
			return e
		}
	}
	if b.nc.IsClosed() {
		cause = fmt.Errorf("%w: %w", nats.ErrConnectionClosed, cause)
	}
	return fmt.Errorf("cannot reach NATS at %s: %w", redact(b.url), cause)
}

// resources returns walship's resources, or why they are not there yet.
func (b *Bus) resources() (*resources, error) {
	if r := b.res.Load(); r != nil {
		return r, nil
	}
	reason := errors.New("creating walship's JetStream resources")
	if !b.nc.IsConnected() {
		reason = b.unreachable()
	}
	return nil, fmt.Errorf("%w: %w", ErrNotReady, reason)
}

// awaitSetup waits up to d for Setup to have created the resources.
func (b *Bus) awaitSetup(ctx context.Context, d time.Duration) bool {
	if b.res.Load() != nil {
		return true
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-b.ready:
		return true
	case <-ctx.Done():
	case <-t.C:
	}
	return false
}

// Unavailable reports whether err means NATS cannot be reached or cannot
// answer now — no connection, a timeout, no responders, a JetStream
// that is temporarily unavailable (a cluster without a leader), out of
// resources — so that waiting and trying again may succeed. Everything
// else is taken for a misconfiguration that no retry fixes: a malformed
// URL, authorization or TLS failures, JetStream disabled, a resource
// configured otherwise than walship needs.
func Unavailable(err error) bool {
	if err == nil || errors.Is(err, ErrMisconfigured) || errors.Is(err, nats.ErrAuthorization) || errors.Is(err, nats.ErrAuthExpired) ||
		errors.Is(err, nats.ErrAuthRevoked) || errors.Is(err, nats.ErrAccountAuthExpired) ||
		errors.Is(err, jetstream.ErrJetStreamNotEnabled) || errors.Is(err, jetstream.ErrJetStreamNotEnabledForAccount) {
		return false
	}
	for _, target := range []error{ErrNotReady, errNotConnected, nats.ErrNoServers, nats.ErrTimeout, nats.ErrNoResponders,
		nats.ErrConnectionReconnecting, nats.ErrDisconnected, nats.ErrStaleConnection, context.DeadlineExceeded, io.EOF} {
		if errors.Is(err, target) {
			return true
		}
	}
	var api *jetstream.APIError
	if errors.As(err, &api) {
		return api.Code == 503 || api.ErrorCode == 10008 // JetStream system temporarily unavailable
	}
	var ae *net.AddrError
	if errors.As(err, &ae) {
		return false
	}
	var oe *net.OpError
	var de *net.DNSError
	return errors.As(err, &oe) || errors.As(err, &de) || errors.Is(err, syscall.ECONNREFUSED) || errors.Is(err, syscall.ECONNRESET)
}

// setupRetrying is setup with attempts of their own deadline. In a
// cluster, processes that start together race to create the same stream,
// and nats-server (2.15.2) never answers a create that duplicates one in
// flight: it applies it as already answered. The next attempt, after a
// random pause that ends the race, finds the resources and updates them,
// which is answered. setup is idempotent.
func (b *Bus) setupRetrying(ctx context.Context) (*resources, error) {
	attempt := 2 * time.Second
	for {
		actx, cancel := context.WithTimeout(ctx, attempt)
		r, err := b.setup(actx)
		timedOut := actx.Err() != nil
		cancel()
		if err == nil || !timedOut || ctx.Err() != nil {
			return r, err
		}
		b.log.Warn("nats: no answer while setting up JetStream resources; trying again", "error", err)
		attempt = min(2*attempt, 10*time.Second)
		select {
		case <-ctx.Done():
		case <-time.After(rand.N(time.Second)):
		}
	}
}

func (b *Bus) setup(ctx context.Context) (*resources, error) {
	n := b.opts.Names
	if _, err := b.js.AccountInfo(ctx); err != nil {
		if errors.Is(err, jetstream.ErrJetStreamNotEnabled) || errors.Is(err, jetstream.ErrJetStreamNotEnabledForAccount) {
			return nil, fmt.Errorf("NATS server has JetStream disabled (%w): start nats-server with -js", err)
		}
		return nil, fmt.Errorf("jetstream account info: %w", err)
	}
	// Replicas only ever go up: a process started with the default (1)
	// must not scale down what a cluster's operator made R3.
	replicas := b.opts.Replicas
	if s, err := b.js.Stream(ctx, n.Segments); err == nil && s.CachedInfo().Config.Replicas > replicas {
		replicas = s.CachedInfo().Config.Replicas
		b.log.Warn("walship's streams have more replicas than --nats-replicas asks; keeping them", "replicas", replicas, "nats_replicas", b.opts.Replicas)
	}
	_, err := b.js.CreateOrUpdateStream(ctx, jetstream.StreamConfig{
		Name:        n.Segments,
		Description: "walship segment events, consumed once by the archiver pool",
		Subjects:    []string{"walship.*.segment"},
		Retention:   jetstream.WorkQueuePolicy,
		Storage:     jetstream.FileStorage,
		Replicas:    replicas,
		Duplicates:  b.opts.DedupWindow,
	})
	if err != nil {
		return nil, fmt.Errorf("create stream %s: %w", n.Segments, err)
	}
	_, err = b.js.CreateOrUpdateStream(ctx, jetstream.StreamConfig{
		Name:        n.Archived,
		Description: "walship confirmations: WAL files durably in the sink",
		Subjects:    []string{"walship.*.archived"},
		Retention:   jetstream.LimitsPolicy,
		Storage:     jetstream.FileStorage,
		Replicas:    replicas,
		MaxAge:      b.opts.ArchivedMaxAge,
		Duplicates:  b.opts.DedupWindow,
	})
	if err != nil {
		return nil, fmt.Errorf("create stream %s: %w", n.Archived, err)
	}
	r := &resources{}
	r.obj, err = b.js.CreateOrUpdateObjectStore(ctx, jetstream.ObjectStoreConfig{
		Bucket:      n.Spool,
		Description: "walship staged segment bytes",
		Storage:     jetstream.FileStorage,
		Replicas:    replicas,
	})
	if err != nil {
		return nil, fmt.Errorf("create object store %s: %w", n.Spool, err)
	}
	r.kv, err = b.js.CreateOrUpdateKeyValue(ctx, jetstream.KeyValueConfig{
		Bucket:      n.State,
		Description: "walship per-server state",
		Storage:     jetstream.FileStorage,
		Replicas:    replicas,
	})
	if err != nil {
		return nil, fmt.Errorf("create key-value %s: %w", n.State, err)
	}
	if n.Processes != "" {
		r.procs, err = b.js.CreateOrUpdateKeyValue(ctx, jetstream.KeyValueConfig{
			Bucket:      n.Processes,
			Description: "walship processes and what they can reach; entries expire",
			Storage:     jetstream.FileStorage,
			Replicas:    replicas,
			TTL:         ProcessTTL,
		})
		if err != nil {
			// Only `walship status` reads it: a process that may not create
			// it (an operator made the resources, permissions are narrow)
			// works without.
			b.log.Warn("cannot create the processes bucket; this process will not show in 'walship status --processes'", "bucket", n.Processes, "error", err)
			r.procs = nil
		}
	}
	return r, nil
}

// ProcessTTL is how long a process's record outlives its last refresh.
const ProcessTTL = 10 * time.Minute

// PutObject stages a WAL file's bytes in the object store.
func (b *Bus) PutObject(ctx context.Context, name string, r io.Reader) error {
	res, err := b.resources()
	if err != nil {
		return fmt.Errorf("stage object %s: %w", name, err)
	}
	// Large chunks mean fewer messages per segment: less CPU on both ends.
	chunk := min(b.nc.MaxPayload()-8192, 1<<20)
	meta := jetstream.ObjectMeta{Name: name, Opts: &jetstream.ObjectMetaOptions{ChunkSize: uint32(max(chunk, 128<<10))}}
	if _, err := res.obj.Put(ctx, meta, r); err != nil {
		return fmt.Errorf("stage object %s: %w", name, err)
	}
	return nil
}

// GetObject reads a staged object fully into buf (reused when large
// enough) and returns the bytes. A missing object wraps os.ErrNotExist.
//
// With replicas, any replica may serve a read (the object's info comes by
// a direct get, its chunks through an ordered consumer), and one a moment
// behind the leader answers "not found", or ends the chunks early, for an
// object just staged. So such a read is tried again for a while, and
// "not found" is believed only when the stream leader says it too.
func (b *Bus) GetObject(ctx context.Context, name string, buf []byte) ([]byte, error) {
	delay := 50 * time.Millisecond
	for {
		out, err := b.getObject(ctx, name, buf)
		stale := errors.Is(err, os.ErrNotExist) || errors.Is(err, jetstream.ErrDigestMismatch) ||
			errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, io.EOF)
		if !stale || b.opts.Replicas <= 1 || ctx.Err() != nil {
			return out, err
		}
		if delay > 2*time.Second {
			if errors.Is(err, os.ErrNotExist) {
				if held, lerr := b.leaderHasObject(ctx, name); lerr != nil || held {
					return nil, fmt.Errorf("get staged object %s: replicas answer not found, the stream leader does not (%v): try again", name, lerr)
				}
			}
			return out, err
		}
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-time.After(delay):
		}
		delay *= 2
	}
}

// leaderHasObject asks the object store stream's leader, and only it (a
// STREAM.MSG.GET, not a direct get), whether it holds name.
func (b *Bus) leaderHasObject(ctx context.Context, name string) (bool, error) {
	stream := "OBJ_" + b.opts.Names.Spool
	req, _ := json.Marshal(map[string]string{
		"last_by_subj": "$O." + b.opts.Names.Spool + ".M." + base64.URLEncoding.EncodeToString([]byte(name)),
	})
	msg, err := b.nc.RequestWithContext(ctx, "$JS.API.STREAM.MSG.GET."+stream, req)
	if err != nil {
		return false, err
	}
	var resp struct {
		Error *struct {
			ErrCode     int    `json:"err_code"`
			Description string `json:"description"`
		} `json:"error"`
		Message *struct {
			Data []byte `json:"data"`
		} `json:"message"`
	}
	if err := json.Unmarshal(msg.Data, &resp); err != nil {
		return false, err
	}
	if resp.Error != nil {
		if resp.Error.ErrCode == 10037 { // no message found
			return false, nil
		}
		return false, errors.New(resp.Error.Description)
	}
	if resp.Message == nil {
		return false, errors.New("empty answer")
	}
	var info struct {
		Deleted bool `json:"deleted"`
	}
	if err := json.Unmarshal(resp.Message.Data, &info); err != nil {
		return false, err
	}
	return !info.Deleted, nil
}

func (b *Bus) getObject(ctx context.Context, name string, buf []byte) ([]byte, error) {
	rs, err := b.resources()
	if err != nil {
		return nil, fmt.Errorf("get staged object %s: %w", name, err)
	}
	res, err := rs.obj.Get(ctx, name)
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
	res, err := b.resources()
	if err != nil {
		return fmt.Errorf("delete staged object %s: %w", name, err)
	}
	if err := res.obj.Delete(ctx, name); err != nil && !errors.Is(err, jetstream.ErrObjectNotFound) {
		return fmt.Errorf("delete staged object %s: %w", name, err)
	}
	return nil
}

// HasObject reports whether the object store holds name with the given
// SHA-256 (hex), so a republish needs no new copy of the bytes.
func (b *Bus) HasObject(ctx context.Context, name, sha256 string) (bool, error) {
	res, err := b.resources()
	if err != nil {
		return false, fmt.Errorf("staged object %s: %w", name, err)
	}
	info, err := res.obj.GetInfo(ctx, name)
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
	if _, err := b.resources(); err != nil {
		return 0, fmt.Errorf("publish segment event %s: %w", ev.File, err)
	}
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
	if _, err := b.resources(); err != nil {
		return false, err
	}
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
	if _, err := b.resources(); err != nil {
		return fmt.Errorf("publish archived event %s: %w", ev.File, err)
	}
	data, err := json.Marshal(ev)
	if err != nil {
		return err
	}
	if _, err := b.js.Publish(ctx, ArchivedSubject(ev.Server), data, jetstream.WithMsgID(ev.PublishID()+"/archived")); err != nil {
		return fmt.Errorf("publish archived event %s: %w", ev.File, err)
	}
	return nil
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
		if !b.awaitSetup(ctx, time.Minute) {
			continue
		}
		// One reset attempt: nats.go resets an ordered consumer under the
		// same consumer name, and in a cluster an R1 consumer placed on a
		// node that has just died keeps that name unanswered until the
		// node returns. A failed reset is reported to the error handler,
		// and the watch starts over with a new consumer, placed afresh.
		cfg := jetstream.OrderedConsumerConfig{FilterSubjects: []string{subject}, MaxResetAttempts: 1}
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
		var delivered atomic.Bool
		restart := make(chan error, 1)
		if err == nil {
			cc, err = c.Consume(func(m jetstream.Msg) {
				mu.Lock()
				defer mu.Unlock()
				if stopped {
					return
				}
				delivered.Store(true)
				if md, err := m.Metadata(); err == nil {
					last.Store(md.Sequence.Stream)
				}
				ev, err := pipeline.DecodeArchivedEvent(m.Data())
				if err != nil {
					bad(err)
					return
				}
				fn(ev)
			}, jetstream.ConsumeErrHandler(func(_ jetstream.ConsumeContext, err error) {
				b.log.Debug("confirmation watch", "server", server, "error", err)
				if !errors.Is(err, jetstream.ErrNoHeartbeat) { // which nats.go resets itself
					select {
					case restart <- err:
					default:
					}
				}
			}))
		}
		if err != nil {
			b.rl.Warn("watch/"+server, "cannot watch confirmations; retrying", "server", server, "subject", subject, "error", err)
			bo.Wait(ctx)
			continue
		}
		b.rl.Reset("watch/" + server)
		select {
		case <-ctx.Done():
		case <-cc.Closed():
		case err := <-restart:
			b.rl.Warn("watch/"+server, "confirmation watch interrupted; starting it again", "server", server, "error", err)
		}
		cc.Stop()
		mu.Lock()
		stopped = true
		mu.Unlock()
		if delivered.Load() {
			bo.Reset()
		}
		bo.Wait(ctx)
	}
	return nil
}

// PutState records a server's state (JSON) in the key-value bucket.
func (b *Bus) PutState(ctx context.Context, server string, state []byte) error {
	res, err := b.resources()
	if err != nil {
		return fmt.Errorf("put state %s: %w", server, err)
	}
	if _, err := res.kv.Put(ctx, server, state); err != nil {
		return fmt.Errorf("put state %s: %w", server, err)
	}
	return nil
}

// PutProcess records a process's state (JSON) under key in the processes
// bucket, where it expires ProcessTTL after its last refresh. Keys are
// made of letters, digits, '-', '_', '=' and '.'.
func (b *Bus) PutProcess(ctx context.Context, key string, state []byte) error {
	res, err := b.resources()
	if err != nil {
		return fmt.Errorf("put process %s: %w", key, err)
	}
	if res.procs == nil {
		return nil
	}
	if _, err := res.procs.Put(ctx, key, state); err != nil {
		return fmt.Errorf("put process %s: %w", key, err)
	}
	return nil
}

// DeleteProcess removes a process's record, when it stops.
func (b *Bus) DeleteProcess(ctx context.Context, key string) error {
	res, err := b.resources()
	if err != nil || res.procs == nil {
		return err
	}
	return res.procs.Delete(ctx, key)
}

// Pending is the number of segment events not yet acknowledged by the
// archiver pool, of every server: waiting plus in flight. On a work-queue
// stream that is the stream's message count.
func (b *Bus) Pending(ctx context.Context) (uint64, error) {
	if _, err := b.resources(); err != nil {
		return 0, err
	}
	s, err := b.js.Stream(ctx, b.opts.Names.Segments)
	if err != nil {
		return 0, err
	}
	info, err := s.Info(ctx)
	if err != nil {
		return 0, err
	}
	return info.State.Msgs, nil
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
func Inspect(ctx context.Context, url string, names Names, extra ...nats.Option) ([]string, error) {
	nc, err := nats.Connect(url, append([]nats.Option{nats.Name("walship-check"), nats.Timeout(5 * time.Second)}, extra...)...)
	if err != nil {
		if e := explainConnError(url, err); e != err {
			return nil, e
		}
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
		// A user that may not list consumers (a narrow role) gets no
		// answer: give up on the consumers after a few seconds.
		lctx, cancel := context.WithTimeout(ctx, 3*time.Second)
		defer cancel()
		lister := s.ListConsumers(lctx)
		for ci := range lister.Info() {
			cfg := ci.Config
			if ci.Name == names.Consumer {
				probs = append(probs, fmt.Sprintf("consumer %s is the single archivers' consumer of walship before one per server: every archiver must run this version (they delete it at start)", ci.Name))
				continue
			}
			if !strings.HasPrefix(ci.Name, names.Consumer+"_") {
				continue
			}
			if cfg.AckPolicy != jetstream.AckExplicitPolicy || (cfg.MaxDeliver != -1 && cfg.MaxDeliver != 0) {
				probs = append(probs, fmt.Sprintf("consumer %s: ack %s, max deliver %d; want explicit and unlimited so no segment is dropped", ci.Name, cfg.AckPolicy, cfg.MaxDeliver))
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
	// ServerBacklog is each server's part of Backlog (servers with none
	// are absent).
	ServerBacklog map[string]uint64
	Processes     []pipeline.ProcessState // walship processes that recorded themselves recently
}

// ReadSnapshot reads every server's state, its last archived
// confirmation, and the archiver backlog, without changing anything.
func ReadSnapshot(ctx context.Context, url string, names Names, extra ...nats.Option) (*Snapshot, error) {
	nc, err := nats.Connect(url, append([]nats.Option{nats.Name("walship-status"), nats.Timeout(5 * time.Second)}, extra...)...)
	if err != nil {
		if e := explainConnError(url, err); e != err {
			return nil, e
		}
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
			if ev, at, ok := lastWALArchived(ctx, stream, ArchivedSubject(st.Server)); ok {
				snap.LastArchived[st.Server] = ev
				snap.ArchivedAt[st.Server] = at
			}
		}
	}
	if names.Processes != "" {
		if pkv, err := js.KeyValue(ctx, names.Processes); err == nil {
			pkeys, _ := pkv.Keys(ctx)
			for _, k := range pkeys {
				e, err := pkv.Get(ctx, k)
				if err != nil {
					continue
				}
				var ps pipeline.ProcessState
				if json.Unmarshal(e.Value(), &ps) == nil && ps.Role != "" {
					snap.Processes = append(snap.Processes, ps)
				}
			}
		}
	}
	if s, err := js.Stream(ctx, names.Segments); err == nil {
		// A work-queue stream holds exactly the events no archiver has
		// acknowledged yet: waiting, handed out, or handed back.
		if info, err := s.Info(ctx, jetstream.WithSubjectFilter("walship.*.segment")); err == nil {
			snap.Backlog = info.State.Msgs
			snap.BacklogKnown = true
			snap.ServerBacklog = map[string]uint64{}
			for subj, n := range info.State.Subjects {
				if server, ok := serverOfSubject(subj); ok {
					snap.ServerBacklog[server] = n
				}
			}
		}
	}
	return snap, nil
}
