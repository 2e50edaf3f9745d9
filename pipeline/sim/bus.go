package sim

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"time"

	"github.com/walship/walship/pipeline"
	"github.com/walship/walship/pipeline/archiver"
	"github.com/walship/walship/pipeline/receiver"
)

// errOutage is what every JetStream or S3 call answers while it is down.
var errOutage = errors.New("sim: unreachable")

// jetStream is the simulated NATS JetStream: the work-queue stream of
// segment events with the archivers' durable consumer, the limits stream
// of confirmations, and the object store of staged bytes. Like a
// single-node server that fsyncs on an interval, a crash loses what was
// stored in the last moments, acknowledged or not.
type jetStream struct {
	w        *World
	downTill time.Time
	segments stream
	archived stream
	objects  map[string]*object
}

type stream struct {
	msgs    []*msg // by sequence
	lastSeq uint64
	dedup   map[string]*msg // by message ID, within the window
}

type msg struct {
	seq    uint64
	id     string
	data   []byte
	stored time.Time
	// The work-queue consumer's state.
	availableAt time.Time
	inflight    bool
	deadline    time.Time
	delivered   uint64
}

type object struct {
	data   []byte
	sum    string
	stored time.Time
}

const (
	dedupWindow = 2 * time.Minute
	ackWait     = time.Minute
)

func newJetStream(w *World) *jetStream {
	return &jetStream{w: w, segments: stream{dedup: map[string]*msg{}}, archived: stream{dedup: map[string]*msg{}}, objects: map[string]*object{}}
}

func (js *jetStream) down() bool { return js.w.now.Before(js.downTill) }

// call is the entry of every client call: other actors may run first (the
// call takes time), then it fails while JetStream is down or the caller is
// dead.
func (js *jetStream) call(ctx context.Context, actor string) error {
	js.w.interfere(actor)
	if err := ctx.Err(); err != nil {
		return err
	}
	if js.down() {
		return errOutage
	}
	return nil
}

func (s *stream) publish(w *World, id string, data []byte) (*msg, bool) {
	if m, ok := s.dedup[id]; ok && w.now.Sub(m.stored) < dedupWindow {
		return m, true
	}
	s.lastSeq++
	m := &msg{seq: s.lastSeq, id: id, data: data, stored: w.now, availableAt: w.now}
	s.msgs = append(s.msgs, m)
	s.dedup[id] = m
	return m, false
}

func (s *stream) remove(m *msg) {
	for i, x := range s.msgs {
		if x == m {
			s.msgs = append(s.msgs[:i], s.msgs[i+1:]...)
			return
		}
	}
}

func (s *stream) get(seq uint64) *msg {
	for _, m := range s.msgs {
		if m.seq == seq {
			return m
		}
	}
	return nil
}

// lose drops what was stored after cut: messages, their dedup entries, and
// the sequence numbers, which are handed out again.
func (s *stream) lose(cut time.Time) int {
	kept, n := s.msgs[:0], 0
	for _, m := range s.msgs {
		if m.stored.After(cut) {
			n++
			continue
		}
		kept = append(kept, m)
	}
	s.msgs = kept
	for id, m := range s.dedup {
		if m.stored.After(cut) {
			delete(s.dedup, id)
		}
	}
	s.lastSeq = 0
	for _, m := range s.msgs {
		s.lastSeq = max(s.lastSeq, m.seq)
	}
	for _, m := range s.msgs {
		m.inflight = false // consumers start over after a restart
	}
	return n
}

// crash restarts JetStream, losing up to window of the newest writes.
func (js *jetStream) crash(window time.Duration) int {
	cut := js.w.now.Add(-window)
	n := js.segments.lose(cut) + js.archived.lose(cut)
	for name, o := range js.objects {
		if o.stored.After(cut) {
			delete(js.objects, name)
			n++
		}
	}
	return n
}

// publisher is JetStream as the receiver sees it.
type publisher struct{ js *jetStream }

var (
	_ receiver.Publisher     = publisher{}
	_ receiver.QueueChecker  = publisher{}
	_ receiver.ObjectChecker = publisher{}
)

func (p publisher) PutObject(ctx context.Context, name string, r io.Reader) error {
	var buf bytes.Buffer
	buf.Grow(int(p.js.w.size) + 1024)
	if _, err := buf.ReadFrom(r); err != nil {
		return err
	}
	if err := p.js.call(ctx, "pub"); err != nil {
		return err
	}
	p.js.objects[name] = &object{data: buf.Bytes(), stored: p.js.w.now}
	return p.js.w.maybeLostReply()
}

func (p publisher) PublishSegment(ctx context.Context, ev *pipeline.SegmentEvent) (uint64, error) {
	if err := p.js.call(ctx, "pub"); err != nil {
		return 0, err
	}
	data, _ := json.Marshal(ev)
	m, _ := p.js.segments.publish(p.js.w, ev.PublishID(), data)
	p.js.w.count("published")
	if err := p.js.w.maybeLostReply(); err != nil {
		return 0, err
	}
	return m.seq, nil
}

func (p publisher) Queued(ctx context.Context, seq uint64, id string) (bool, error) {
	if err := p.js.call(ctx, "pub"); err != nil {
		return false, err
	}
	m := p.js.segments.get(seq)
	return m != nil && m.id == id, nil
}

func (p publisher) HasObject(ctx context.Context, name, sum string) (bool, error) {
	if err := p.js.call(ctx, "pub"); err != nil {
		return false, err
	}
	o, ok := p.js.objects[name]
	if ok && o.sum == "" {
		s := sha256.Sum256(o.data)
		o.sum = pipeline.SHA256Hex(s[:])
	}
	return ok && o.sum == sum, nil
}

// busFor is JetStream as archiver i sees it.
type busFor struct {
	js *jetStream
	a  *arch
}

var _ archiver.Bus = busFor{}

func (b busFor) GetObject(ctx context.Context, name string, buf []byte) ([]byte, error) {
	if err := b.js.call(ctx, b.a.name); err != nil {
		return nil, err
	}
	o, ok := b.js.objects[name]
	if !ok {
		return nil, fmt.Errorf("staged %s: %w", name, os.ErrNotExist)
	}
	return append(buf[:0], o.data...), nil
}

func (b busFor) DeleteObject(ctx context.Context, name string) error {
	if err := b.js.call(ctx, b.a.name); err != nil {
		return err
	}
	delete(b.js.objects, name)
	return nil
}

func (b busFor) PublishArchived(ctx context.Context, ev *pipeline.ArchivedEvent) error {
	if err := b.js.call(ctx, b.a.name); err != nil {
		return err
	}
	data, _ := json.Marshal(ev)
	b.js.archived.publish(b.js.w, ev.PublishID()+"/archived", data)
	return b.js.w.maybeLostReply()
}

// next hands the lowest available event to an archiver: new, naked and
// due, or held past its acknowledgement deadline.
func (js *jetStream) next(a *arch) *delivery {
	if js.down() {
		return nil
	}
	now := js.w.now
	for _, m := range js.segments.msgs {
		if !m.inflight && !m.availableAt.After(now) || m.inflight && !m.deadline.After(now) {
			m.inflight, m.deadline = true, now.Add(ackWait)
			m.delivered++
			return &delivery{js: js, m: m, a: a, gen: a.gen, n: m.delivered}
		}
	}
	return nil
}

// delivery is one event handed to an archiver; its answers count only
// while that archiver lives and JetStream is up.
type delivery struct {
	js  *jetStream
	m   *msg
	a   *arch
	gen int
	n   uint64
}

var _ archiver.Delivery = (*delivery)(nil)

func (d *delivery) Data() []byte         { return d.m.data }
func (d *delivery) NumDelivered() uint64 { return d.n }

func (d *delivery) answerable() bool {
	return d.a.gen == d.gen && !d.js.down() && d.js.segments.get(d.m.seq) == d.m
}

func (d *delivery) Ack(ctx context.Context) error {
	if err := d.js.call(ctx, d.a.name); err != nil || !d.answerable() {
		return errors.Join(err, errOutage)
	}
	d.js.segments.remove(d.m)
	return d.js.w.maybeLostReply()
}

func (d *delivery) Nak(delay time.Duration) error {
	if !d.answerable() {
		return errOutage
	}
	d.m.inflight, d.m.availableAt = false, d.js.w.now.Add(delay)
	return nil
}

func (d *delivery) Term(reason string) error {
	if !d.answerable() {
		return errOutage
	}
	d.js.segments.remove(d.m)
	return nil
}

func (d *delivery) InProgress() error {
	if d.answerable() {
		d.m.deadline = d.js.w.now.Add(ackWait)
	}
	return nil
}

// archivedAfter is the first confirmation after sequence seq, if any.
func (js *jetStream) archivedAfter(seq uint64) *msg {
	for _, m := range js.archived.msgs {
		if m.seq > seq {
			return m
		}
	}
	return nil
}

// archivedSince is the sequence just before the first confirmation stored
// at or after t.
func (js *jetStream) archivedSince(t time.Time) uint64 {
	for _, m := range js.archived.msgs {
		if !m.stored.Before(t) {
			return m.seq - 1
		}
	}
	return js.archived.lastSeq
}

func equalBytes(a, b []byte) bool { return bytes.Equal(a, b) }
