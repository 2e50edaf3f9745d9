package archiver

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/http/httptest"
	"os"
	"testing"
	"time"

	"github.com/walship/walship/pipeline/stagehttp"
)

// heldBytes holds one file for the stage server, as a receiver's Core
// holds an announced spool file.
type heldBytes struct {
	name string
	data []byte
}

func (h *heldBytes) OpenHeld(name, sum string) (io.ReadCloser, int64, error) {
	if h == nil || name != h.name {
		return nil, 0, fmt.Errorf("%s: %w", name, os.ErrNotExist)
	}
	return io.NopCloser(bytes.NewReader(h.data)), int64(len(h.data)), nil
}

type stepClock struct{ t time.Time }

func (c *stepClock) now() time.Time { return c.t }

// Events staged over HTTP (--stage http): fetched with the secret and
// archived; a file the receiver no longer holds is terminated (the
// receiver publishes again) unless the bucket has it; an unreachable
// receiver is retried with a back-off until it has been unreachable for
// the give-up bound, then its events end like missing files.
func TestHandleStagedOverHTTP(t *testing.T) {
	const secret = "archiver-test-secret-0123456789"
	f := newFixture(t)
	srv := stagehttp.NewServer([]byte(secret), nil, nil)
	hs := httptest.NewServer(srv)
	defer hs.Close()
	srv.Hold("db1", &heldBytes{name: f.ev.File, data: f.raw})
	clk := &stepClock{t: time.Unix(1e9, 0)}
	f.a.cfg.Fetch = stagehttp.NewClient(stagehttp.ClientConfig{Secret: []byte(secret), GiveUp: time.Minute, Now: clk.now})

	ev := f.ev
	ev.Object, ev.URL = "", stagehttp.URL(hs.URL, "db1", f.ev.File)

	// Not held (another name): terminated, nothing stored.
	missing := ev
	missing.URL = stagehttp.URL(hs.URL, "db1", "000000010000000000000009")
	if d, out := f.handle(t, missing, 1); out != Termed || d.answer != "term" {
		t.Fatalf("not held: %s", out)
	}
	if _, err := f.sink.Head(context.Background(), f.key); err == nil {
		t.Fatal("a file that was not fetched is in the sink")
	}

	// An archiver without the secret hands it back: a configuration
	// mistake must never drop WAL.
	fetch := f.a.cfg.Fetch
	f.a.cfg.Fetch = nil
	if _, out := f.handle(t, ev, 1); out != Naked {
		t.Fatalf("no fetcher: %s, want nak", out)
	}
	f.a.cfg.Fetch = fetch

	// Held: archived with the receiver's bytes.
	if _, out := f.handle(t, ev, 1); out != Acked {
		t.Fatalf("held: %s", out)
	}
	meta, err := f.sink.Head(context.Background(), f.key)
	if err != nil || meta.SHA256 != f.ev.SHA256 {
		t.Fatalf("sink holds %+v (%v)", meta, err)
	}
	if len(f.bus.archived) != 1 || f.bus.archived[0].Existed {
		t.Fatalf("confirmations %+v", f.bus.archived)
	}

	// The receiver is gone (its port closed): a redelivery finds the file
	// in the bucket and acknowledges it without fetching.
	ln, _ := net.Listen("tcp", "127.0.0.1:0")
	deadBase := "http://" + ln.Addr().String()
	ln.Close()
	dead := ev
	dead.URL = stagehttp.URL(deadBase, "db1", f.ev.File)
	if _, out := f.handle(t, dead, 2); out != Acked || !f.bus.archived[1].Existed {
		t.Fatalf("dead receiver, file in the bucket: %s", out)
	}

	// A file the bucket does not hold, from the dead receiver: retried
	// with a back-off, then, past the give-up bound, terminated.
	other := newFixture(t)
	other.a.cfg.Fetch = f.a.cfg.Fetch
	lost := other.ev
	lost.Object, lost.URL = "", dead.URL
	if d, out := other.handle(t, lost, 1); out != Naked || d.delay <= 0 {
		t.Fatalf("unreachable: %s after %s, want nak with a delay", out, d.delay)
	}
	clk.t = clk.t.Add(30 * time.Second)
	if _, out := other.handle(t, lost, 2); out != Naked {
		t.Fatalf("unreachable within the bound: %s, want nak", out)
	}
	clk.t = clk.t.Add(30 * time.Second)
	if _, out := other.handle(t, lost, 3); out != Termed {
		t.Fatalf("unreachable past the bound: %s, want term", out)
	}
	if len(other.bus.archived) != 0 {
		t.Fatalf("a file nobody fetched was confirmed: %+v", other.bus.archived)
	}
}
