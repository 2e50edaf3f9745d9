package bus

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// The archiver pool takes events from one durable consumer per server,
// round-robin, so that one busy server cannot starve the others: a single
// consumer on walship.*.segment hands out events in the order they were
// published, and a server that floods the queue with a thousand segments
// puts every other server's next segment behind them. With a consumer per
// server, a worker that asks for the next event gets one from the server
// after the one the last event came from, among those that have events
// waiting.
//
// A work-queue stream forbids consumers whose subjects overlap, so the
// consumers are `<Names.Consumer>_<server>`, each filtered to
// walship.<server>.segment, and the one consumer of walship.*.segment that
// walship before this change used (named Names.Consumer) is deleted when
// found. Deleting a consumer deletes no event: on a work-queue stream an
// event goes only when a consumer acknowledges it, so the events it held go
// to the new consumers, and those it had handed out come again (archiving
// is idempotent). Every archiver of a pool must run this version: an older
// one recreates the single consumer, and then neither kind can create its
// consumers while the other's exist (each says so in its log).
//
// Archivers create the consumers: every few seconds (scanEvery) they list
// the stream's consumers and the servers with events in the stream, and
// create the consumer of any server that has events but no consumer.
// Events wait in the stream until then: nothing is lost, a new server's
// first event waits at most one scan.

// ServerConsumer is the name of the archivers' durable consumer of a
// server's segment events.
func (n Names) ServerConsumer(server string) string { return n.Consumer + "_" + server }

const (
	// scanEvery is how often the servers with events in the stream are
	// listed again: the bound on how late a quiet server's event is
	// noticed while the pool waits on another server's consumer.
	scanEvery = time.Second
	// busyScan is how often they are listed while events come.
	busyScan = 250 * time.Millisecond
)

// pool is an archiver process's consumers, one per server, and where the
// round-robin stands.
type pool struct {
	lock    chan struct{} // one fetcher at a time: held by Next
	cons    map[string]jetstream.Consumer
	order   []string        // servers with a consumer, sorted
	next    int             // index into order of the server to try first
	active  map[string]bool // servers that may have an event to fetch
	scanned time.Time       // the last successful scan; zero: scan now
	busy    bool            // the last round found an event
	listed  bool            // the former single consumer was looked for

	mu     sync.Mutex
	broken map[string]error // servers whose consumer cannot be had, and why (Consuming reads it)
}

func (p *pool) init() {
	if p.lock == nil {
		p.lock = make(chan struct{}, 1)
		p.cons = map[string]jetstream.Consumer{}
		p.active = map[string]bool{}
		p.broken = map[string]error{}
	}
}

// Next waits up to expires for the next segment event for the archivers,
// taken from the servers in turn; it returns nil, nil when none came (also
// while Setup has not yet created the resources). An error is returned when
// no consumer could be asked (NATS away, the stream gone); a consumer that
// fails is looked up again at the next scan.
//
// Which servers are asked: those that had events at the last scan (a
// stream info every scanEvery gives each server's count). A server whose
// fetch finds nothing is not asked again before the next scan says it has
// events. When none has, the fetch waits on one server's consumer, the next
// in turn, until the next scan. So a quiet pool costs about three requests a
// second per process whatever the number of servers, a lone server's event
// is taken the moment it comes, and a quiet server's among many within
// scanEvery.
func (b *Bus) Next(ctx context.Context, expires time.Duration) (*Delivery, error) {
	if !b.awaitSetup(ctx, expires) {
		return nil, nil // NATS not reached since the start: nothing to fetch yet
	}
	p := &b.pool
	select {
	case p.lock <- struct{}{}:
	case <-ctx.Done():
		return nil, nil
	}
	defer func() { <-p.lock }()
	deadline := time.Now().Add(expires)
	for ctx.Err() == nil {
		// While events come, the counts are read again every busyScan, so
		// a quiet server's new event waits at most that long behind busy
		// servers; while none come, every scanEvery.
		if since := time.Since(p.scanned); since >= scanEvery || (p.busy && since >= busyScan) {
			err := errors.New("not connected to NATS")
			if b.nc.IsConnected() {
				sctx, cancel := context.WithTimeout(ctx, max(time.Until(deadline), 2*time.Second))
				err = b.scan(sctx)
				cancel()
			}
			if err != nil {
				if ctx.Err() != nil {
					return nil, nil
				}
				err = fmt.Errorf("fetch segment events: %w", err)
				b.fetchDone(err)
				return nil, err
			}
		}
		d, err := b.round(ctx, deadline)
		p.busy = d != nil
		if d != nil || err != nil {
			return d, err
		}
		if time.Until(deadline) <= 0 {
			return nil, nil
		}
		if p.scanned.IsZero() {
			// A consumer failed (its leader lost, deleted): scan again
			// after a breath, not in a tight loop.
			sleepCtx(ctx, 100*time.Millisecond)
			continue
		}
		// No server has an event: wait for one on the next server in turn
		// until the next scan, so that a lone server's event is taken the
		// moment it comes, and any other's within a scan.
		wait := min(time.Until(deadline), time.Until(p.scanned.Add(scanEvery)))
		if len(p.order) == 0 || wait < 10*time.Millisecond {
			sleepCtx(ctx, max(wait, time.Millisecond))
			continue
		}
		s := p.order[p.next%len(p.order)]
		p.next = (p.next + 1) % len(p.order)
		d, err = b.fetchFrom(ctx, s, wait)
		if err != nil {
			b.forget(s)
			sleepCtx(ctx, 100*time.Millisecond) // as after a failed round
			continue
		}
		b.fetchDone(nil)
		if d != nil {
			if d.pending > 0 {
				p.active[s] = true
			}
			p.busy = true
			return d, nil
		}
	}
	return nil, nil
}

func sleepCtx(ctx context.Context, d time.Duration) {
	select {
	case <-ctx.Done():
	case <-time.After(d):
	}
}

// round asks each server that may have events, from the one after the
// server served last, for an event without waiting. It returns the first
// event found; an error only when every consumer asked failed. A server
// that has none leaves the active set; one whose consumer failed is
// forgotten after the round, and the next scan comes at once.
func (b *Bus) round(ctx context.Context, deadline time.Time) (*Delivery, error) {
	p := &b.pool
	n := len(p.order)
	var asked int
	var failed []string
	var last error
	defer func() {
		for _, s := range failed {
			b.forget(s)
		}
	}()
	for i := 0; i < n; i++ {
		s := p.order[(p.next+i)%n]
		if !p.active[s] {
			continue
		}
		if ctx.Err() != nil || time.Now().After(deadline) {
			break // each fetch may take a second while NATS is away
		}
		if !b.nc.IsConnected() {
			err := errors.New("fetch segment events: not connected to NATS")
			b.fetchDone(err)
			return nil, err
		}
		asked++
		d, err := b.fetchFrom(ctx, s, 0)
		if err != nil {
			failed = append(failed, s)
			last = err
			continue
		}
		if d == nil || d.pending == 0 {
			// None waiting after this one (handed-back ones aside, which
			// the next scan finds): not asked again before a scan.
			delete(p.active, s)
		}
		if d == nil {
			continue
		}
		p.next = (p.next + i + 1) % n
		b.fetchDone(nil)
		return d, nil
	}
	if asked > 0 && len(failed) == asked && ctx.Err() == nil {
		last = fmt.Errorf("fetch segment events: %w", last)
		b.fetchDone(last)
		return nil, last
	}
	if asked > len(failed) {
		b.fetchDone(nil)
	}
	return nil, nil
}

// fetchFrom takes one event from server's consumer: at once (wait 0) or
// waiting up to wait.
func (b *Bus) fetchFrom(ctx context.Context, server string, wait time.Duration) (*Delivery, error) {
	c := b.pool.cons[server]
	var batch jetstream.MessageBatch
	var err error
	if wait == 0 {
		batch, err = c.FetchNoWait(1)
	} else {
		batch, err = c.Fetch(1, jetstream.FetchMaxWait(wait))
	}
	if err == nil {
		var d *Delivery
		for msg := range batch.Messages() {
			n, pending := uint64(1), uint64(1)
			if md, err := msg.Metadata(); err == nil {
				n, pending = md.NumDelivered, md.NumPending
			}
			d = &Delivery{msg: msg, n: n, nc: b.nc, pending: pending}
		}
		err = batch.Error()
		if d != nil || err == nil || errors.Is(err, jetstream.ErrNoMessages) || errors.Is(err, context.DeadlineExceeded) || errors.Is(err, nats.ErrTimeout) {
			return d, nil
		}
	}
	if ctx.Err() != nil {
		return nil, nil
	}
	return nil, fmt.Errorf("server %s: %w", server, err)
}

// forget drops a server's consumer until the next scan, which comes at once.
func (b *Bus) forget(server string) {
	p := &b.pool
	delete(p.cons, server)
	delete(p.active, server)
	p.order = slices.DeleteFunc(p.order, func(s string) bool { return s == server })
	p.scanned = time.Time{}
}

// scan finds the servers with events in the segment stream, makes them
// active, and gets the consumer of every one this process has none of,
// creating it if need be. The first scan also lists the stream's
// consumers and deletes the single consumer older walship used; so does a
// scan after a create that this consumer's subjects overlap.
func (b *Bus) scan(ctx context.Context) error {
	n := b.opts.Names
	p := &b.pool
	stream, err := b.js.Stream(ctx, n.Segments)
	if err != nil {
		return fmt.Errorf("stream %s: %w", n.Segments, err)
	}
	if !p.listed {
		if err := b.replaceFormer(ctx, stream); err != nil {
			return err
		}
		p.listed = true
	}
	info, err := stream.Info(ctx, jetstream.WithSubjectFilter("walship.*.segment"))
	if err != nil {
		return fmt.Errorf("stream %s: %w", n.Segments, err)
	}
	waiting := map[string]bool{}
	for subj, count := range info.State.Subjects {
		s, ok := serverOfSubject(subj)
		if !ok || count == 0 {
			continue
		}
		waiting[s] = true
		p.active[s] = true
		if p.cons[s] != nil {
			continue
		}
		c, err := stream.CreateOrUpdateConsumer(ctx, b.consumerConfig(s))
		if err != nil {
			if ctx.Err() != nil {
				return err
			}
			if errors.Is(err, jetstream.ErrConsumerMultipleFilterSubjectsNotSupported) || strings.Contains(err.Error(), "not unique") {
				p.listed = false // someone made the former consumer again
				err = fmt.Errorf("%w: another consumer of %s takes this server's events (the former single consumer %s, made again by an older walship?)", err, n.Segments, n.Consumer)
			}
			// One server's consumer that cannot be made must not stop the
			// others'; Consuming says so, and the next scan tries again.
			p.mu.Lock()
			p.broken[s] = err
			p.mu.Unlock()
			b.rl.Warn("consumer:"+s, "cannot create the archivers' consumer of a server: its events wait; trying again", "server", s, "consumer", n.ServerConsumer(s), "error", err)
			continue
		}
		p.mu.Lock()
		delete(p.broken, s)
		p.mu.Unlock()
		p.cons[s] = c
		p.order = append(p.order, s)
	}
	p.mu.Lock()
	maps.DeleteFunc(p.broken, func(s string, _ error) bool { return !waiting[s] })
	p.mu.Unlock()
	slices.Sort(p.order)
	p.scanned = time.Now()
	if len(p.order) == 0 {
		b.fetchDone(nil) // nothing to fetch from yet (Consuming reports broken consumers)
	}
	return nil
}

// brokenServer is a server whose consumer cannot be had (the first by
// name), and why.
func (p *pool) brokenServer() (string, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, s := range slices.Sorted(maps.Keys(p.broken)) {
		return s, p.broken[s]
	}
	return "", nil
}

// replaceFormer deletes the single consumer of every server's events that
// walship used before one per server.
func (b *Bus) replaceFormer(ctx context.Context, stream jetstream.Stream) error {
	name := b.opts.Names.Consumer
	// Look before deleting: a user whose permissions were written for
	// this version may not delete (nor need to) on a fresh install.
	if _, err := stream.Consumer(ctx, name); errors.Is(err, jetstream.ErrConsumerNotFound) {
		return nil
	} else if err != nil && ctx.Err() == nil {
		// Cannot tell (a permission, a timeout): go on; if it is there,
		// creating a server's consumer fails as overlapping, which is
		// reported and brings this back.
		b.rl.Warn("former-consumer", "cannot look for the archivers' former single consumer; going on", "consumer", name, "error", err)
		return nil
	}
	err := stream.DeleteConsumer(ctx, name)
	switch {
	case err == nil:
		b.log.Info("deleted the archivers' former single consumer: one per server replaces it", "consumer", name)
	case errors.Is(err, jetstream.ErrConsumerNotFound):
	default:
		return fmt.Errorf("delete the archivers' former single consumer %s (one per server replaces it; every walship process must run this version, and archivers need $JS.API.CONSUMER.DELETE.%s.%s, see deploy/nats/accounts.conf): %w",
			name, b.opts.Names.Segments, name, err)
	}
	return nil
}

// consumerConfig is the archivers' consumer of a server's segment events:
// explicit acknowledgements, delivered again forever.
func (b *Bus) consumerConfig(server string) jetstream.ConsumerConfig {
	return jetstream.ConsumerConfig{
		Durable:       b.opts.Names.ServerConsumer(server),
		Description:   "walship archiver pool, server " + server,
		AckPolicy:     jetstream.AckExplicitPolicy,
		AckWait:       b.opts.AckWait,
		MaxDeliver:    -1,
		MaxAckPending: 1024,
		FilterSubject: SegmentSubject(server),
	}
}

// serverOfSubject is the server of a walship.<server>.segment subject.
func serverOfSubject(subj string) (string, bool) {
	s, ok := strings.CutPrefix(subj, "walship.")
	if !ok {
		return "", false
	}
	s, ok = strings.CutSuffix(s, ".segment")
	return s, ok && s != "" && !strings.Contains(s, ".")
}
