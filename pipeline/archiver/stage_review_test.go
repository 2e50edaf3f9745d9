package archiver

import (
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/walship/walship/pipeline/stagehttp"
)

// Review (rev-stage): the give-up clock of a receiver's URL base starts at
// the first failure "since its last success", but an entry is only removed
// by a success seen by this archiver process. A failure long ago whose
// events ended otherwise (another archiver process fetched them, or a
// redelivery found them in the bucket and never fetched) leaves the entry
// behind; hours later one transient failure from that same, healthy
// receiver (a 503 while it reconnects to PostgreSQL, a refused connection
// while it restarts) is taken for a receiver gone for hours: the event of
// a file the receiver still holds and the bucket lacks is terminated at
// its first delivery instead of being retried a second later. The
// receiver publishes it again only after --republish-after (5 min), so
// flush stalls minutes per blip, on every receiver restart that meets such
// a stale entry.
func TestReviewStageGiveUpClockStartsAtAStaleFailure(t *testing.T) {
	const secret = "archiver-review-secret-0123456789"
	srv := stagehttp.NewServer([]byte(secret), nil, nil)
	hs := httptest.NewServer(srv)
	defer hs.Close()
	clk := &stepClock{t: time.Unix(1e9, 0)}
	client := stagehttp.NewClient(stagehttp.ClientConfig{Secret: []byte(secret), GiveUp: 10 * time.Minute, Timeout: 5 * time.Second, Now: clk.now})

	// 00:00 — the receiver restarts (its holder is released: 503). This
	// archiver gets one event of it and hands it back; the redelivery is
	// handled by another archiver process once the receiver is back.
	first := newFixture(t)
	first.a.cfg.Fetch = client
	f := newFixture(t)
	f.a.cfg.Fetch = client
	release := srv.Hold("db1", &heldBytes{name: f.ev.File, data: f.raw})
	release()
	early := first.ev
	early.Object, early.URL = "", stagehttp.URL(hs.URL, "db1", "000000010000000000000004")
	if _, out := first.handle(t, early, 1); out != Naked {
		t.Fatalf("receiver restarting: %s, want nak", out)
	}

	// 03:00 — the receiver has served every archiver for hours; it
	// restarts again, for a second. This archiver's first delivery of a
	// new event meets that second.
	clk.t = clk.t.Add(3 * time.Hour)
	ev := f.ev
	ev.Object, ev.URL = "", stagehttp.URL(hs.URL, "db1", f.ev.File)
	d, out := f.handle(t, ev, 1)
	if out != Naked {
		t.Errorf("one failed fetch from a receiver that answered everyone for hours: %s (delivery answered %q), want nak with a short back-off: "+
			"the give-up clock started at a failure 3h ago that no success of this process ever cleared", out, d.answer)
	}

	// Once the receiver is back, the event would have been archived.
	defer srv.Hold("db1", &heldBytes{name: f.ev.File, data: f.raw})()
	if _, out := f.handle(t, ev, 2); out != Acked {
		t.Fatalf("receiver back: %s, want ack", out)
	}
}

// Review (rev-stage): an archiver sends the fleet-wide stage secret
// itself, as a bearer token, to whatever URL a segment event names; the
// event's URL is only checked to start with http:// or https://. Any NATS
// principal allowed to publish walship.*.segment — every receiver's
// credential, including receivers deliberately run with --stage nats and
// no secret (ephemeral ones, per the README), or a leaked receiver
// password — can publish one event naming its own host and collect the
// secret, then read every --stage http receiver's WAL. The same happens in
// clear text when an event says http:// for a receiver that serves HTTPS.
// A per-request proof (an HMAC of the path and time under the secret, or a
// token derived per server) would give such a host nothing reusable.
func TestReviewStageSecretSentToAnyEventURL(t *testing.T) {
	const secret = "archiver-review-secret-0123456789"
	var mu sync.Mutex
	var got []string
	collector := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		got = append(got, r.Header.Get("Authorization"))
		mu.Unlock()
		http.NotFound(w, r)
	}))
	defer collector.Close()
	f := newFixture(t)
	f.a.cfg.Fetch = stagehttp.NewClient(stagehttp.ClientConfig{Secret: []byte(secret), Timeout: 5 * time.Second})
	ev := f.ev
	ev.Object, ev.URL = "", collector.URL+"/anything/at/all"
	f.handle(t, ev, 1)
	mu.Lock()
	defer mu.Unlock()
	for _, a := range got {
		if strings.Contains(a, secret) {
			t.Errorf("the archiver sent the stage secret to %s, a URL taken from an event: Authorization %q", collector.URL, a)
		}
	}
}
