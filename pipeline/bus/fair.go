package bus

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
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
	// scanEvery is how often the consumers and the stream's servers are
	// listed again.
	scanEvery = 2 * time.Second
	// idleWait is how long a fetch waits for an event when no server has
	// one: the pool's reaction time to a quiet server's next segment.
	idleWait = 250 * time.Millisecond
	// idlePerServer spaces the no-wait fetches of servers whose last fetch
	// found nothing, so that a hundred quiet servers cost a few requests a
	// second, not a thousand.
	idlePerServer = 25 * time.Millisecond
)

// pool is an archiver process's consumers, one per server, and where the
// round-robin stands.
type pool struct {
	lock    chan struct{} // one fetcher at a time: held by Next
	cons    map[string]jetstream.Consumer
	order   []string             // servers with a consumer, sorted
	next    int                  // index into order of the server to try first
	idle    map[string]time.Time // server → not worth a no-wait fetch before then
	scanned time.Time            // the last successful scan; zero: scan now
}

func (p *pool) init() {
	if p.lock == nil {
		p.lock = make(chan struct{}, 1)
		p.cons = map[string]jetstream.Consumer{}
		p.idle = map[string]time.Time{}
	}
}

// Next waits up to expires for the next segment event for the archivers,
// taken from the servers in turn; it returns nil, nil when none came (also
// while Setup has not yet created the resources). An error is returned when
// no consumer could be asked (NATS away, the stream gone); a consumer that
// fails is looked up again at the next scan.
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
		if time.Since(p.scanned) >= scanEvery {
			if err := b.scan(ctx); err != nil {
				if ctx.Err() != nil {
					return nil, nil
				}
				err = fmt.Errorf("fetch segment events: %w", err)
				b.fetchDone(err)
				return nil, err
			}
		}
		d, err := b.round(ctx)
		if d != nil || err != nil {
			return d, err
		}
		wait := min(idleWait, time.Until(deadline))
		if wait <= 0 {
			return nil, nil
		}
		if len(p.order) == 0 {
			select {
			case <-ctx.Done():
			case <-time.After(wait):
			}
			continue
		}
		// Nothing anywhere: wait on the next server in turn, so that a
		// lone server is served as soon as its event comes.
		s := p.order[p.next%len(p.order)]
		p.next = (p.next + 1) % len(p.order)
		d, err = b.fetchFrom(ctx, s, wait)
		if err == nil {
			b.fetchDone(nil)
		}
		if d != nil {
			return d, nil
		}
	}
	return nil, nil
}

// round asks each server's consumer, from the one after the server served
// last, for an event without waiting, skipping those that had none a
// moment ago. It returns the first event found; an error only when every
// consumer asked failed.
func (b *Bus) round(ctx context.Context) (*Delivery, error) {
	p := &b.pool
	n := len(p.order)
	now := time.Now()
	rest := max(idleWait, time.Duration(n)*idlePerServer)
	var asked, failed int
	var last error
	for i := 0; i < n; i++ {
		s := p.order[(p.next+i)%n]
		if now.Before(p.idle[s]) {
			continue
		}
		asked++
		d, err := b.fetchFrom(ctx, s, 0)
		if err != nil {
			failed++
			last = err
			continue
		}
		if d == nil {
			p.idle[s] = now.Add(rest)
			continue
		}
		delete(p.idle, s)
		p.next = (p.next + i + 1) % n
		b.fetchDone(nil)
		return d, nil
	}
	if asked > 0 && failed == asked && ctx.Err() == nil {
		last = fmt.Errorf("fetch segment events: %w", last)
		b.fetchDone(last)
		return nil, last
	}
	if asked > 0 {
		b.fetchDone(nil)
	}
	return nil, nil
}

// fetchFrom takes one event from server's consumer: at once (wait 0) or
// waiting up to wait. A consumer that fails is forgotten and looked up at
// the next scan, which comes at once.
func (b *Bus) fetchFrom(ctx context.Context, server string, wait time.Duration) (*Delivery, error) {
	p := &b.pool
	c := p.cons[server]
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
			n := uint64(1)
			if md, err := msg.Metadata(); err == nil {
				n = md.NumDelivered
			}
			d = &Delivery{msg: msg, n: n, nc: b.nc}
		}
		err = batch.Error()
		if d != nil || err == nil || errors.Is(err, jetstream.ErrNoMessages) || errors.Is(err, context.DeadlineExceeded) || errors.Is(err, nats.ErrTimeout) {
			return d, nil
		}
	}
	if ctx.Err() != nil {
		return nil, nil
	}
	b.forget(server)
	return nil, fmt.Errorf("server %s: %w", server, err)
}

// forget drops a server's consumer until the next scan, which comes at once.
func (b *Bus) forget(server string) {
	p := &b.pool
	delete(p.cons, server)
	delete(p.idle, server)
	p.order = slices.DeleteFunc(p.order, func(s string) bool { return s == server })
	p.scanned = time.Time{}
}

// scan lists the segment stream's consumers and the servers with events in
// it; creates the consumer of every server that has events and none; and
// deletes the single consumer older walship used.
func (b *Bus) scan(ctx context.Context) error {
	n := b.opts.Names
	stream, err := b.js.Stream(ctx, n.Segments)
	if err != nil {
		return fmt.Errorf("stream %s: %w", n.Segments, err)
	}
	info, err := stream.Info(ctx, jetstream.WithSubjectFilter("walship.*.segment"))
	if err != nil {
		return fmt.Errorf("stream %s: %w", n.Segments, err)
	}
	want := map[string]bool{}
	for subj := range info.State.Subjects {
		if s, ok := serverOfSubject(subj); ok {
			want[s] = true
		}
	}
	have := map[string]string{} // server → consumer name
	lister := stream.ListConsumers(ctx)
	for ci := range lister.Info() {
		if ci.Name == n.Consumer {
			if err := stream.DeleteConsumer(ctx, ci.Name); err != nil && !errors.Is(err, jetstream.ErrConsumerNotFound) {
				return fmt.Errorf("delete the archivers' former single consumer %s (one per server replaces it; every archiver must run this version): %w", ci.Name, err)
			}
			b.log.Info("deleted the archivers' former single consumer: one per server replaces it", "consumer", ci.Name)
			continue
		}
		s, ok := strings.CutPrefix(ci.Name, n.Consumer+"_")
		if ok && ci.Config.FilterSubject == SegmentSubject(s) {
			have[s] = ci.Name
			want[s] = true
		}
	}
	if err := lister.Err(); err != nil {
		return fmt.Errorf("list consumers of %s: %w", n.Segments, err)
	}
	p := &b.pool
	for s := range want {
		if p.cons[s] != nil {
			continue
		}
		var c jetstream.Consumer
		if name, ok := have[s]; ok {
			c, err = stream.Consumer(ctx, name)
		} else {
			c, err = stream.CreateOrUpdateConsumer(ctx, b.consumerConfig(s))
			if err == nil {
				b.log.Info("created the archivers' consumer of a server", "server", s, "consumer", n.ServerConsumer(s))
			}
		}
		if err != nil {
			if ctx.Err() != nil {
				return err
			}
			// One server's consumer that cannot be made must not stop the
			// others'; the next scan tries again.
			b.rl.Warn("consumer:"+s, "cannot use the archivers' consumer of a server; trying again", "server", s, "consumer", n.ServerConsumer(s), "error", err)
			continue
		}
		p.cons[s] = c
		p.order = append(p.order, s)
	}
	slices.Sort(p.order)
	p.scanned = time.Now()
	if len(p.order) == 0 {
		b.fetchDone(nil) // nothing to fetch from yet, and nothing failed
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
