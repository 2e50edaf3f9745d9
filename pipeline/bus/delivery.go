package bus

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// Delivery is one segment event handed to an archiver, with the
// acknowledgements JetStream takes for it. It satisfies the archiver's
// Delivery interface.
type Delivery struct {
	msg jetstream.Msg
	n   uint64
	nc  *nats.Conn
	// pending is how many events of the same server wait for the pool
	// after this one (JetStream's count; those handed back not included).
	pending uint64
}

// Data is the event's body.
func (d *Delivery) Data() []byte { return d.msg.Data() }

// NumDelivered counts deliveries of this event, this one included.
func (d *Delivery) NumDelivered() uint64 { return d.n }

// Ack acknowledges the event and waits for JetStream to confirm it.
func (d *Delivery) Ack(ctx context.Context) error { return d.msg.DoubleAck(ctx) }

// Nak hands the event back, to be delivered again after delay, and waits
// for JetStream to confirm it. In a cluster the consumer's leader may have
// just died, its successor elected seconds later: a nak nobody received
// leaves the event for --ack-wait instead of delay, and the flush
// watermark with it. So while the connection is up, an unconfirmed nak is
// sent again, for up to nakConfirmFor.
func (d *Delivery) Nak(delay time.Duration) error {
	body := []byte("-NAK")
	if delay > 0 {
		body = fmt.Appendf(nil, `-NAK {"delay": %d}`, delay.Nanoseconds())
	}
	deadline := time.Now().Add(nakConfirmFor)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		_, err := d.nc.RequestWithContext(ctx, d.msg.Reply(), body)
		cancel()
		if err == nil || !d.nc.IsConnected() || time.Now().After(deadline) {
			return err
		}
		time.Sleep(250 * time.Millisecond)
	}
}

// nakConfirmFor bounds how long Nak tries to have its nak confirmed: a
// consumer leader election takes a few seconds, more on a loaded machine.
const nakConfirmFor = 30 * time.Second

// Term removes the event from the work queue for good.
func (d *Delivery) Term(reason string) error { return d.msg.TermWithReason(reason) }

// InProgress resets the event's acknowledgement timer.
func (d *Delivery) InProgress() error { return d.msg.InProgress() }

// consumeState is whether the archivers' consumer answers fetches.
type consumeState struct {
	mu      sync.Mutex
	fetched bool  // a fetch has succeeded
	err     error // the last fetch's error, nil after a success
}

func (b *Bus) fetchDone(err error) {
	b.fetch.mu.Lock()
	defer b.fetch.mu.Unlock()
	b.fetch.err = err
	if err == nil {
		b.fetch.fetched = true
	}
}

// Consuming is nil while the archivers consume segment events: the
// client is connected and the last fetch from their consumer succeeded
// (with or without an event). Before
// the first fetch, and after one failed, it says why not. It is the
// archivers' part of /readyz.
func (b *Bus) Consuming() error {
	b.fetch.mu.Lock()
	defer b.fetch.mu.Unlock()
	if !b.nc.IsConnected() {
		// A fetch while the client reconnects times out like one that
		// found an empty queue.
		return errors.New("not consuming segment events: not connected to NATS")
	}
	if b.fetch.err != nil {
		return fmt.Errorf("not consuming segment events: %w", b.fetch.err)
	}
	if !b.fetch.fetched {
		return errors.New("not consuming segment events yet")
	}
	if s, err := b.pool.brokenServer(); err != nil {
		return fmt.Errorf("not consuming segment events of server %s: %w", s, err)
	}
	return nil
}
