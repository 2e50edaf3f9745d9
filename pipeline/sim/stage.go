package sim

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path"
	"strings"
	"time"

	"github.com/walship/walship/pipeline"
	"github.com/walship/walship/pipeline/archiver"
	"github.com/walship/walship/pipeline/receiver"
	"github.com/walship/walship/pipeline/stagehttp"
)

// The HTTP stage (--stage http) in the simulation: on some of the seeds
// that stage bytes for remote archivers, the receivers stage nothing in
// the object store; their events carry a URL, and each receiver process
// serves its held files through the real stagehttp.Server (auth, path,
// 503 while the receiver restarts, the receiver's real OpenHeld lookup),
// driven in memory without sockets. Archivers fetch through the real
// stagehttp.Client (classification, give-up on the virtual clock) whose
// transport is stageTransport below.
//
// Faults: a host's stage unreachable for a while (often longer than the
// give-up bound, shrunk here to seconds or minutes), a receiver process
// killed and restarted (sometimes elsewhere: a new URL, a new run), a
// receiver host lost with its spool, 5xx answers, an archiver started with
// a wrong secret (401), a response cut short, and fetches racing the
// file's removal after its confirmation (other actors run while a fetch
// is on its way and between the file's opening and its sending).
//
// Invariant (f): an archiver terminates an event with a URL only when, at
// its fetch in that delivery, the receiver serving the URL answered 404
// while it did not hold the file (no receiver running there, its spool
// without those bytes, or the bucket already holding them), or the URL's
// host had been unreachable, without one answer, for the give-up bound.

const stageSecret = "sim-stage-secret"

// httpStage is the seed's HTTP staging.
type httpStage struct {
	giveUp time.Duration
	// listening maps a URL host to the host whose receiver process
	// listens there now.
	listening map[string]*host
	// served: every time a receiver served its files at a URL host.
	served map[string][]span2
}

// span2 is a time interval [from, to) and the host it was of.
type span2 struct {
	from, to time.Time
	h        *host
}

// forever ends an interval that has not ended.
var forever = time.Date(9999, 1, 1, 0, 0, 0, 0, time.UTC)

// servedDuring: a receiver served its files at addr, with its host's
// network up, at a time in [from, to); at is the first such time.
func (w *World) servedDuring(addr string, from, to time.Time) (at time.Time, ok bool) {
	for _, l := range w.http.served[addr] {
		cur, end := maxTime(from, l.from), minTime(to, l.to)
		for moved := true; moved && cur.Before(end); {
			moved = false
			for _, p := range l.h.st.parts {
				if !p.from.After(cur) && p.to.After(cur) {
					cur, moved = p.to, true
				}
			}
		}
		if cur.Before(end) {
			return cur, true
		}
	}
	return time.Time{}, false
}

func maxTime(a, b time.Time) time.Time {
	if a.After(b) {
		return a
	}
	return b
}

func minTime(a, b time.Time) time.Time {
	if a.Before(b) {
		return a
	}
	return b
}

// hostStage is one receiver host's side of the stage.
type hostStage struct {
	machine  int    // the host's incarnation: a lost host comes back as a new machine
	port     int    // a process restarted elsewhere listens on another port
	addr     string // URL host while a process listens, else ""
	srv      *stagehttp.Server
	release  func()
	downTill time.Time // the network to this host is cut
	parts    []span2   // every cut
	moved    bool      // the next process starts elsewhere
}

// archStage is one archiver process's side of the stage.
type archStage struct {
	wrongSecret bool // the next start takes a wrong secret
	badClient   bool // this process has a wrong secret
	handles     int  // deliveries handled
	last        *fetchRecord
	// downSince: URL host → first failure since its last answer, as this
	// process's client saw it (an independent record, for invariant (f)).
	downSince map[string]time.Time
	// fails: URL host → the times of its failures since its last answer.
	fails map[string][]time.Time
}

// fetchRecord is the last fetch an archiver made, as the network saw it.
type fetchRecord struct {
	handle  int
	url     string
	at      time.Time
	status  int  // 0: no answer
	failed  bool // no answer, 5xx, or a body cut short
	notHeld bool // with a 404: the simulation agrees the file was not held
	why     string
}

// setupStage decides whether the seed stages over HTTP. It draws nothing
// from the seed's generator unless it does, so other seeds replay as
// before.
func (w *World) setupStage() {
	if !w.stage || w.opt.Seed%2 != 0 {
		return
	}
	giveUp := time.Duration(20+w.rng.IntN(280)) * time.Second
	w.http = &httpStage{giveUp: giveUp, listening: map[string]*host{}, served: map[string][]span2{}}
	w.count("seeds staging over http")
	w.logf("stage http: give-up %s", giveUp)
}

// stageListen starts h's stage server when its process is new, and
// returns the base URL for the receiver's core ("" without HTTP staging).
func (w *World) stageListen(h *host) string {
	if w.http == nil {
		return ""
	}
	st := &h.st
	if st.addr == "" {
		if st.moved || st.srv != nil && w.rng.IntN(3) == 0 {
			st.port++ // restarted elsewhere
			w.count("http receivers moved")
		}
		st.moved = false
		st.addr = fmt.Sprintf("%s-%d.sim:%d", h.name, st.machine, 8400+st.port)
		// The server checks each request's signature for its own address,
		// as a real one for its --stage-url's host. (Signatures carry the
		// wall clock's time, not the virtual one: both ends read it.)
		st.srv = stagehttp.NewServerConfig(stagehttp.ServerConfig{Secrets: [][]byte{[]byte(stageSecret)},
			Host: st.addr, Log: w.logger(h.name + "-stage")})
		w.http.listening[st.addr] = h
		w.logf("%s: stage server listens at %s", h.name, st.addr)
	}
	return "http://" + st.addr
}

// stageHold serves core's held files, as Receiver.Run does once the core
// has started.
func (w *World) stageHold(h *host, core *receiver.Core) {
	if w.http == nil {
		return
	}
	h.st.release = h.st.srv.Hold(server, racingHolder{w: w, core: core})
	w.http.served[h.st.addr] = append(w.http.served[h.st.addr], span2{from: w.now, to: forever, h: h})
}

// stageRelease: the receiver starts over within its process; its server
// answers 503 until the next core holds.
func (w *World) stageRelease(h *host) {
	if h.st.release != nil {
		h.st.release()
		h.st.release = nil
		l := w.http.served[h.st.addr]
		l[len(l)-1].to = w.now
	}
}

// stageProcessDies: the receiver's process is gone, and its server with
// it.
func (w *World) stageProcessDies(h *host) {
	if w.http == nil {
		return
	}
	w.stageRelease(h)
	if h.st.addr != "" {
		delete(w.http.listening, h.st.addr)
		h.st.addr = ""
	}
}

// racingHolder is the receiver's real OpenHeld; once a file is open, the
// world goes on before its bytes are sent: a confirmation may remove it.
type racingHolder struct {
	w    *World
	core *receiver.Core
}

func (r racingHolder) OpenHeld(name, sum string) (io.ReadCloser, int64, error) {
	f, size, err := r.core.OpenHeld(name, sum)
	if err == nil {
		h := r.w.holderOf(r.core)
		if h == nil || !r.w.race(h, name) {
			r.w.interfere("stage")
		}
		if h != nil {
			if _, ok := h.fs.files[path.Join(spoolDir, name)]; !ok {
				// Confirmed and removed while it was sent: the archiver
				// still gets the bytes it opened.
				r.w.count("http sent after removal")
			}
		}
	}
	return f, size, err
}

// holderOf is the host core runs on.
func (w *World) holderOf(core *receiver.Core) *host {
	for _, h := range w.hosts {
		if h.core == core {
			return h
		}
	}
	return nil
}

// race is the fault "stage-race": while a file is being sent, its event
// outlives its acknowledgement deadline (a stalled worker), another
// archiver archives it, and the receiver takes the confirmation and
// removes the file - all before the first archiver has the bytes.
func (w *World) race(h *host, name string) bool {
	if !w.faultsOn || w.depth > 0 || w.opt.Skip["stage-race"] || w.rng.IntN(2) != 0 || w.busy[h.actor("watch")] {
		return false
	}
	var b *arch
	for _, x := range w.archs {
		if !w.busy[x.name] {
			b = x
			break
		}
	}
	if b == nil {
		return false
	}
	expired := false
	for _, m := range w.js.segments.msgs {
		var ev pipeline.SegmentEvent
		if m.inflight && json.Unmarshal(m.data, &ev) == nil && ev.URL != "" && path.Base(ev.URL) == name {
			m.deadline, expired = w.now, true
		}
	}
	if !expired {
		return false
	}
	w.res.Faults["stage-race"]++
	w.logf("%s: while %s is sent, its event is redelivered to %s", h.name, name, b.name)
	w.depth++
	defer func() { w.depth-- }()
	for i := 0; i < 3; i++ {
		w.run(action{name: "archive", actor: b.name, do: func() { w.archiveStep(b) }})
	}
	w.run(action{name: "recv-confirm", actor: h.actor("watch"), do: func() {
		for i := 0; i < 6 && h.core != nil && !w.js.down(); i++ {
			w.recvConfirm(h)
		}
	}})
	return true
}

// stageQuiet is the archivers' stage clients' Quiet: a failure after a
// silence this long (nothing asked of the host) starts the give-up count
// over. It is the default's value (one minute plus the one-minute fetch
// timeout), above the archivers' longest retry delay (30 s).
const stageQuiet = 2 * time.Minute

// stageTransport carries one archiver process's fetches to the receivers'
// stage servers in memory.
type stageTransport struct {
	w   *World
	a   *arch
	gen int // the archiver process the client belongs to
}

var _ http.RoundTripper = stageTransport{}

func (t stageTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	w, a := t.w, t.a
	w.interfere(a.name)
	if err := req.Context().Err(); err != nil || a.gen != t.gen {
		return nil, errors.Join(err, context.Canceled)
	}
	w.count("http fetches")
	addr := req.URL.Host
	rec := &fetchRecord{handle: a.st.handles, url: req.URL.String()}
	h := w.http.listening[addr]
	fail := func(why string) {
		a.st.last, rec.at = rec, w.now
		rec.failed, rec.why = true, why
		if _, ok := a.st.downSince[addr]; !ok {
			a.st.downSince[addr] = w.now
		}
		a.st.fails[addr] = append(a.st.fails[addr], w.now)
		w.logf("%s: fetch %s: %s", a.name, req.URL.Path, why)
	}
	switch {
	case h == nil:
		w.count("http refused")
		fail("connection refused")
		return nil, &net.OpError{Op: "dial", Net: "tcp", Err: errors.New("connection refused")}
	case w.now.Before(h.st.downTill):
		w.count("http timeouts")
		fail("i/o timeout")
		return nil, &net.OpError{Op: "dial", Net: "tcp", Err: os.ErrDeadlineExceeded}
	case w.faultsOn && w.rng.IntN(12) == 0:
		w.count("http 5xx injected")
		fail("502 from a proxy")
		rr := httptest.NewRecorder()
		http.Error(rr, "bad gateway", http.StatusBadGateway)
		return rr.Result(), nil
	}
	name := path.Base(req.URL.Path)
	sum := req.Header.Get(stagehttp.SHA256Header)
	notHeld := !w.simHolds(h, name, sum)
	// The request as the server would read it off the wire.
	sreq := req.Clone(req.Context())
	sreq.RequestURI, sreq.Host = req.URL.RequestURI(), req.URL.Host
	rr := httptest.NewRecorder()
	h.st.srv.ServeHTTP(rr, sreq)
	if a.gen != t.gen {
		// The archiver died while the file was sent: its client sees a
		// cancelled request and records nothing.
		return nil, context.Canceled
	}
	resp := rr.Result()
	resp.Request = req
	rec.status = resp.StatusCode
	w.count(fmt.Sprintf("http %d", resp.StatusCode))
	switch {
	case resp.StatusCode == http.StatusNotFound || resp.StatusCode == http.StatusGone:
		// The simulation's view is taken before the request is served and
		// again after: the server's answer falls between the two.
		rec.notHeld = notHeld || !w.simHolds(h, name, sum)
	case resp.StatusCode >= 500:
		fail(resp.Status)
		return resp, nil
	case resp.StatusCode == http.StatusOK && w.faultsOn && w.rng.IntN(8) == 0 && resp.ContentLength > 0:
		w.count("http cut short")
		fail("response cut short")
		resp.Body = io.NopCloser(io.LimitReader(resp.Body, w.rng.Int64N(resp.ContentLength)))
		return resp, nil
	}
	a.st.last, rec.at = rec, w.now
	delete(a.st.downSince, addr) // the host answered
	delete(a.st.fails, addr)
	w.logf("%s: fetch %s: %s", a.name, req.URL.Path, resp.Status)
	return resp, nil
}

// simHolds is the simulation's own view of whether h's receiver holds a
// spool file with SHA-256 sum: it runs, its spool has those bytes under
// that name, and the bucket does not hold them yet (a held file leaves
// the spool only once the bucket holds it).
func (w *World) simHolds(h *host, name, sum string) bool {
	if h.core == nil {
		return false
	}
	ino, ok := h.fs.files[path.Join(spoolDir, name)]
	if !ok || newContent(ino.content()).sum != sum {
		return false
	}
	return !w.bucketHoldsSpoolFile(name)
}

// bucketHoldsSpoolFile: the bucket holds the WAL of the spool file name
// (a range: its range object or its whole segment).
func (w *World) bucketHoldsSpoolFile(name string) bool {
	ext := w.codec.Ext()
	switch {
	case strings.HasSuffix(name, ".range"):
		seg, from, to, ok := w.rangeSpoolFile(name)
		if !ok {
			return false
		}
		segName := seg.Name(w.size)
		return w.walshipObject(w.layout.RangeKey(segName, from, to, ext)) != nil || w.walshipObject(w.layout.Key(segName, ext)) != nil
	case len(name) > 24 && strings.HasPrefix(name[24:], ".partial.ended"):
		return w.walshipObject(w.layout.Key(name[:24]+".partial", ext)) != nil
	}
	return w.walshipObject(w.layout.Key(name, ext)) != nil
}

// fetcher is archiver a's HTTP client for this process.
func (w *World) fetcher(a *arch) archiver.Fetcher {
	if w.http == nil {
		return nil
	}
	a.st.badClient, a.st.wrongSecret = a.st.wrongSecret, false
	a.st.downSince = map[string]time.Time{}
	a.st.fails = map[string][]time.Time{}
	a.st.last = nil
	secret := stageSecret
	if a.st.badClient {
		secret = "not-the-stage-secret"
		w.logf("%s starts with a wrong stage secret", a.name)
	}
	return stagehttp.NewClient(stagehttp.ClientConfig{Secret: []byte(secret), GiveUp: w.http.giveUp, Quiet: stageQuiet,
		Now: func() time.Time { return w.now }, Transport: stageTransport{w: w, a: a, gen: a.gen}})
}

// checkStageOutcome is invariant (f), after each delivery of an event with
// a URL, and counts what the stage did.
func (w *World) checkStageOutcome(a *arch, ev *pipeline.SegmentEvent, out archiver.Outcome) {
	if w.http == nil || ev.URL == "" {
		return
	}
	w.count("http events " + out.String())
	if out != archiver.Termed {
		return
	}
	rec := a.st.last
	switch {
	case rec == nil || rec.handle != a.st.handles || rec.url != ev.URL:
		w.fail("(f) %s terminated %s (%s) without fetching it", a.name, ev.File, ev.URL)
	case rec.status == http.StatusNotFound || rec.status == http.StatusGone:
		if !rec.notHeld {
			w.fail("(f) %s terminated %s after a 404 from a receiver that held it", a.name, ev.File)
		}
		w.count("http terms: not held")
	case rec.failed:
		addr := strings.TrimPrefix(ev.URL, "http://")
		addr = addr[:strings.IndexByte(addr, '/')]
		since, ok := a.st.downSince[addr]
		if !ok || rec.at.Sub(since) < w.http.giveUp {
			w.fail("(f) %s terminated %s after %s, but its host was unreachable only since %s (give-up %s)", a.name, ev.File, rec.why, since, w.http.giveUp)
		}
		w.count("http terms: gone")
		if _, ok := w.servedDuring(addr, since, rec.at); ok {
			// Between failures, the host served (unasked, or answering 5xx
			// by chance): allowed while no silence exceeds the bound.
			w.count("http terms: gone, though served meanwhile")
		}
		// The give-up rests on failures that span the bound with no long
		// silence (nothing asked): after one, an old failure says nothing
		// of the time since. Or on at least three failures since the host
		// last answered this archiver, spanning the bound, however far
		// apart (archivers taking turns at a dead host's event each see it
		// fail only now and then).
		fails := a.st.fails[addr]
		k := 0
		for i := 1; i < len(fails); i++ {
			if fails[i].Sub(fails[i-1]) > stageQuiet {
				k = i
			}
		}
		tally := len(fails) >= 3 && rec.at.Sub(fails[0]) >= w.http.giveUp
		if tally {
			w.count("http terms: gone after three failures")
		}
		if !tally && rec.at.Sub(fails[k]) < w.http.giveUp {
			at, served := w.servedDuring(addr, fails[max(k-1, 0)], fails[k])
			w.fail("(f) %s gave up on %s on failures since %s, but nothing was asked of it from %s to %s (its receiver served meanwhile: %v, at %s)",
				a.name, addr, since.Sub(w.start), fails[max(k-1, 0)].Sub(w.start), fails[k].Sub(w.start), served, at.Sub(w.start))
		}
	case rec.status == http.StatusOK:
		w.count("http terms: bytes failed verification")
	default:
		w.fail("(f) %s terminated %s after an answer %d", a.name, ev.File, rec.status)
	}
}

// stageActions are the stage's faults.
func (w *World) stageActions() []action {
	if w.http == nil {
		return nil
	}
	acts := []action{
		{"stage-partition", "fault", 1, true, func() bool { return len(w.http.listening) > 0 }, w.stagePartition},
	}
	for _, h := range w.hosts {
		h := h
		acts = append(acts, action{"stage-host-lost", "fault", 1, true,
			func() bool { return !h.fs.dying && w.idle(h) }, func() { w.stageHostLost(h) }})
	}
	for _, a := range w.archs {
		a := a
		acts = append(acts, action{"stage-wrong-secret", "fault", 1, true, func() bool { return !a.st.badClient }, func() {
			if w.rng.IntN(3) != 0 {
				return // an operator's rare mistake
			}
			a.st.wrongSecret = true
			w.count("http wrong secrets")
			w.archCrash(a)
		}})
	}
	return acts
}

// stagePartition cuts the network to a listening host for a while, often
// longer than the give-up bound.
func (w *World) stagePartition() {
	for _, h := range w.hosts {
		if h.st.addr == "" || w.rng.IntN(2) == 0 && len(w.http.listening) > 1 {
			continue
		}
		d := time.Duration(1+w.rng.IntN(int(3*w.http.giveUp/time.Second))) * time.Second
		h.st.downTill = w.now.Add(d)
		h.st.parts = append(h.st.parts, span2{from: w.now, to: h.st.downTill})
		w.logf("%s: stage unreachable for %s", h.name, d)
		return
	}
}

// stageHostLost: the receiver's host is gone with its spool; a new
// machine takes its place and starts a receiver from the slot alone.
func (w *World) stageHostLost(h *host) {
	if w.rng.IntN(5) != 0 {
		return // rarer than a crash
	}
	if h.core != nil {
		w.recvCrash(h)
	}
	w.stageProcessDies(h)
	fs := newFileSystem(w)
	fs.onRemove = w.checkRemove
	h.fs = fs
	h.st.machine++
	h.st.moved = true
	h.st.downTill = time.Time{}
	for i := range h.st.parts {
		h.st.parts[i].to = minTime(h.st.parts[i].to, w.now)
	}
	w.logf("%s: host lost with its spool; a new machine replaces it", h.name)
	w.count("http hosts lost")
}

// stageSettle ends the stage's faults: the network heals and archivers
// with a wrong secret are restarted with the right one.
func (w *World) stageSettle() {
	if w.http == nil {
		return
	}
	for _, h := range w.hosts {
		h.st.downTill = w.now
		for i := range h.st.parts {
			h.st.parts[i].to = minTime(h.st.parts[i].to, w.now)
		}
	}
	for _, a := range w.archs {
		if a.st.badClient {
			w.logf("%s: operator fixes the stage secret", a.name)
			w.archCrash(a)
		}
	}
}

// stageDrain is liveness for the stage, once flush has reached the end:
// every event with a URL ends (archived, or terminated once its receiver
// no longer holds the file or its host is gone) within a bounded time,
// however many of its receivers' URLs died in the faults.
func (w *World) stageDrain() {
	if w.http == nil {
		return
	}
	began := w.now
	for {
		left := 0
		for _, m := range w.js.segments.msgs {
			var ev pipeline.SegmentEvent
			if json.Unmarshal(m.data, &ev) == nil && ev.URL != "" {
				left++
			}
		}
		if left == 0 {
			break
		}
		if w.now.Sub(began) > time.Hour+w.http.giveUp || w.steps > w.opt.Steps+200000 {
			w.fail("(d) liveness: %s after flush reached the end, %d events with a URL are still queued (%s)", w.now.Sub(began).Round(time.Second), left, w.pendingSummary())
		}
		w.step(false)
	}
	w.logf("stage drained after %s", w.now.Sub(began).Round(time.Second))
}
