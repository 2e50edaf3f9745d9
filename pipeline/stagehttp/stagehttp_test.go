package stagehttp

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

const secret = "s3cr3t-0123456789-abcdef"

// dirHolder holds files of a directory by name, as the receiver's Core
// does for its announced files: only names in held are served.
type dirHolder struct {
	dir  string
	held map[string]string // name → sha256 ("" any)
}

func (h *dirHolder) OpenHeld(name, sum string) (io.ReadCloser, int64, error) {
	want, ok := h.held[name]
	if !ok || sum != "" && want != "" && want != sum {
		return nil, 0, fmt.Errorf("%s: %w", name, os.ErrNotExist)
	}
	f, err := os.Open(filepath.Join(h.dir, name))
	if err != nil {
		return nil, 0, err
	}
	st, _ := f.Stat()
	return f, st.Size(), nil
}

func setup(t *testing.T) (*Server, *httptest.Server, []byte) {
	t.Helper()
	dir := t.TempDir()
	data := bytes.Repeat([]byte("0123456789abcdef"), 4096)
	os.WriteFile(filepath.Join(dir, "000000010000000000000005"), data, 0o600)
	os.WriteFile(filepath.Join(dir, "secret.txt"), []byte("not announced"), 0o600)
	os.WriteFile(filepath.Join(filepath.Dir(dir), "outside"), []byte("outside"), 0o600)
	srv := NewServer([]byte(secret), nil, nil)
	srv.Hold("pg1", &dirHolder{dir: dir, held: map[string]string{"000000010000000000000005": ""}})
	hs := httptest.NewServer(srv)
	t.Cleanup(hs.Close)
	return srv, hs, data
}

func get(t *testing.T, u, auth string, hdr ...string) (*http.Response, []byte) {
	t.Helper()
	req, _ := http.NewRequest(http.MethodGet, u, nil)
	if auth == signed {
		auth = signature(secret, time.Now().Unix(), req.URL.Host, req.URL.RequestURI())
	}
	if auth != "" {
		req.Header.Set("Authorization", auth)
	}
	for i := 0; i+1 < len(hdr); i += 2 {
		req.Header.Set(hdr[i], hdr[i+1])
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp, b
}

// signed stands for a valid signature of the request, made by get.
const signed = "<signed>"

func signature(sec string, ts int64, host, uri string) string {
	return fmt.Sprintf("%s ts=%d,sig=%s", AuthScheme, ts, Sign([]byte(sec), ts, host, uri))
}

func TestAuth(t *testing.T) {
	_, hs, data := setup(t)
	u := URL(hs.URL, "pg1", "000000010000000000000005")
	pu, _ := url.Parse(u)
	now := time.Now().Unix()
	for _, auth := range []string{"", "Bearer wrong", "Bearer " + secret, "Basic " + secret, "bearer " + secret,
		signature(secret+"x", now, pu.Host, pu.RequestURI()),                           // another secret
		signature(secret, now, "elsewhere.example:9753", pu.RequestURI()),              // signed for another host
		signature(secret, now, pu.Host, "/wal/pg1/000000010000000000000006"),           // for another path
		signature(secret, now-int64(MaxSkew/time.Second)-60, pu.Host, pu.RequestURI()), // stale
		signature(secret, now+int64(MaxSkew/time.Second)+60, pu.Host, pu.RequestURI()), // from the future
		AuthScheme + " ts=" + strconv.FormatInt(now, 10) + ",sig=00",
	} {
		resp, body := get(t, u, auth)
		if resp.StatusCode != http.StatusUnauthorized || bytes.Contains(body, []byte(secret)) {
			t.Errorf("auth %q: %s %q, want 401 without the secret", auth, resp.Status, body)
		}
	}
	resp, body := get(t, u, signed)
	if resp.StatusCode != http.StatusOK || !bytes.Equal(body, data) {
		t.Fatalf("right secret: %s, %d bytes", resp.Status, len(body))
	}
	// The client with the wrong secret: ErrAuth, and the secret in no error.
	cl := NewClient(ClientConfig{Secret: []byte("wrong-but-long-enough-secret")})
	_, err := cl.Fetch(context.Background(), u, "", int64(len(data)), nil)
	if !errors.Is(err, ErrAuth) || strings.Contains(err.Error(), "wrong-but-long-enough-secret") || errors.Is(err, os.ErrNotExist) {
		t.Errorf("wrong secret: %v, want ErrAuth without the secret", err)
	}
}

func TestOnlyHeldNamesAreServed(t *testing.T) {
	_, hs, _ := setup(t)
	auth := signed
	for _, p := range []string{
		"/wal/pg1/secret.txt",                   // in the directory, not announced
		"/wal/pg1/../outside",                   // traversal
		"/wal/pg1/..%2Foutside",                 // escaped traversal
		"/wal/pg1/%2e%2e%2foutside",             // escaped dots
		"/wal/pg1/000000010000000000000005/x",   // extra element
		"/wal/pg1/",                             // no name
		"/wal/pg2/000000010000000000000005",     // unknown server
		"/wal/../pg1/000000010000000000000005",  // traversal in the server
		"/wal/pg1/.%2F000000010000000000000005", // escaped slash
		"/000000010000000000000005",             // no prefix
		"/wal/pg1/%00000000010000000000000005",  // NUL
		"/wal/pg1/000000010000000000000005%2Fx", // escaped slash after
		"/wal/pg1//etc/passwd",                  // absolute
		"/wal/pg1/000000010000000000000006",     // not held
	} {
		resp, body := get(t, hs.URL+p, auth)
		if resp.StatusCode != http.StatusNotFound {
			t.Errorf("%s: %s %q, want 404", p, resp.Status, body)
		}
	}
	// Other methods are refused.
	req, _ := http.NewRequest(http.MethodDelete, URL(hs.URL, "pg1", "000000010000000000000005"), nil)
	req.Header.Set("Authorization", signature(secret, time.Now().Unix(), req.URL.Host, req.URL.RequestURI()))
	resp, err := http.DefaultClient.Do(req)
	if err != nil || resp.StatusCode != http.StatusMethodNotAllowed {
		t.Errorf("DELETE: %v %v", resp.Status, err)
	}
}

func TestRanges(t *testing.T) {
	_, hs, data := setup(t)
	u := URL(hs.URL, "pg1", "000000010000000000000005")
	resp, body := get(t, u, signed, "Range", "bytes=100-8291")
	if resp.StatusCode != http.StatusPartialContent || !bytes.Equal(body, data[100:8292]) {
		t.Fatalf("range: %s, %d bytes", resp.Status, len(body))
	}
	resp, body = get(t, u, signed, "Range", fmt.Sprintf("bytes=%d-", len(data)-10))
	if resp.StatusCode != http.StatusPartialContent || !bytes.Equal(body, data[len(data)-10:]) {
		t.Fatalf("suffix range: %s, %d bytes", resp.Status, len(body))
	}
}

// The holder's size bounds what is served, though the file is longer
// (a range event's file holds only its bytes; the server never sends more
// than the event announced).
type shortHolder struct{ dirHolder }

func (h *shortHolder) OpenHeld(name, sum string) (io.ReadCloser, int64, error) {
	f, _, err := h.dirHolder.OpenHeld(name, sum)
	return f, 1000, err
}

func TestServesAnnouncedSize(t *testing.T) {
	srv, hs, data := setup(t)
	dir := t.TempDir()
	os.WriteFile(filepath.Join(dir, "f"), data, 0o600)
	srv.Hold("pg2", &shortHolder{dirHolder{dir: dir, held: map[string]string{"f": ""}}})
	cl := NewClient(ClientConfig{Secret: []byte(secret)})
	got, err := cl.Fetch(context.Background(), URL(hs.URL, "pg2", "f"), "", 1000, nil)
	if err != nil || !bytes.Equal(got, data[:1000]) {
		t.Fatalf("%d bytes, %v", len(got), err)
	}
	// An event that announced more bytes than are served: not archived.
	if _, err := cl.Fetch(context.Background(), URL(hs.URL, "pg2", "f"), "", 2000, nil); err == nil || errors.Is(err, os.ErrNotExist) {
		t.Fatalf("short body: %v, want a transient error", err)
	}
}

// The archiver's decision depends on how a fetch fails.
func TestClientClassifiesFailures(t *testing.T) {
	srv, hs, data := setup(t)
	ctx := context.Background()
	clk := &clock{t: time.Unix(1e9, 0)}
	cl := NewClient(ClientConfig{Secret: []byte(secret), GiveUp: time.Minute, Timeout: 2 * time.Second, Now: clk.now})
	u := URL(hs.URL, "pg1", "000000010000000000000005")

	// Reused buffer.
	buf := make([]byte, 0, len(data))
	got, err := cl.Fetch(ctx, u, "", int64(len(data)), buf)
	if err != nil || !bytes.Equal(got, data) || &got[0] != &buf[:1][0] {
		t.Fatalf("fetch: %v (buffer reused: %v)", err, err == nil && &got[0] == &buf[:1][0])
	}
	// Not held: not found.
	if _, err := cl.Fetch(ctx, URL(hs.URL, "pg1", "000000010000000000000006"), "", 1, nil); !errors.Is(err, os.ErrNotExist) || errors.Is(err, ErrUnreachable) {
		t.Errorf("404: %v", err)
	}
	// A receiver restarting: transient.
	release := srv.Hold("pg3", &dirHolder{})
	release()
	if _, err := cl.Fetch(ctx, URL(hs.URL, "pg3", "x"), "", 1, nil); !errors.Is(err, ErrUnreachable) || errors.Is(err, os.ErrNotExist) {
		t.Errorf("503: %v", err)
	}
	// 5xx: transient.
	h500 := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { http.Error(w, "boom", 500) }))
	defer h500.Close()
	if _, err := cl.Fetch(ctx, h500.URL+"/wal/a/b", "", 1, nil); !errors.Is(err, ErrUnreachable) || errors.Is(err, os.ErrNotExist) {
		t.Errorf("500: %v", err)
	}
	// Connection refused: transient until GiveUp has passed without a
	// success, then gone (not found).
	ln, _ := net.Listen("tcp", "127.0.0.1:0")
	dead := "http://" + ln.Addr().String() + "/wal/pg1/000000010000000000000005"
	ln.Close()
	if _, err := cl.Fetch(ctx, dead, "", 1, nil); !errors.Is(err, ErrUnreachable) || errors.Is(err, os.ErrNotExist) {
		t.Errorf("refused: %v", err)
	}
	clk.add(59 * time.Second)
	if _, err := cl.Fetch(ctx, dead, "", 1, nil); !errors.Is(err, ErrUnreachable) || errors.Is(err, os.ErrNotExist) {
		t.Errorf("refused within give-up: %v", err)
	}
	clk.add(time.Second)
	if _, err := cl.Fetch(ctx, dead, "", 1, nil); !errors.Is(err, ErrGone) || !errors.Is(err, os.ErrNotExist) {
		t.Errorf("refused past give-up: %v, want gone", err)
	}
	// A host that answers again starts its clock over.
	if _, err := cl.Fetch(ctx, u, "", int64(len(data)), nil); err != nil {
		t.Fatal(err)
	}
	clk.add(time.Hour)
	if _, err := cl.Fetch(ctx, u, "", int64(len(data)), nil); err != nil {
		t.Fatal(err)
	}
	hs.Close()
	if _, err := cl.Fetch(ctx, u, "", int64(len(data)), nil); !errors.Is(err, ErrUnreachable) || errors.Is(err, os.ErrNotExist) {
		t.Errorf("first failure of a host that answered before: %v, want transient", err)
	}
	// A URL that is not http(s): never fetchable.
	if _, err := cl.Fetch(ctx, "file:///etc/passwd", "", 1, nil); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("file url: %v", err)
	}
}

type clock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *clock) now() time.Time      { c.mu.Lock(); defer c.mu.Unlock(); return c.t }
func (c *clock) add(d time.Duration) { c.mu.Lock(); c.t = c.t.Add(d); c.mu.Unlock() }

// Answers are counted by kind; the secret is in no series.
func TestMetrics(t *testing.T) {
	reg := prometheus.NewRegistry()
	dir := t.TempDir()
	os.WriteFile(filepath.Join(dir, "f"), []byte("0123456789"), 0o600)
	srv := NewServer([]byte(secret), nil, NewMetrics(reg))
	srv.Hold("pg1", &dirHolder{dir: dir, held: map[string]string{"f": ""}})
	hs := httptest.NewServer(srv)
	defer hs.Close()
	get(t, URL(hs.URL, "pg1", "f"), signed)
	get(t, URL(hs.URL, "pg1", "f"), "Bearer nope")
	get(t, URL(hs.URL, "pg1", "g"), signed)
	for answer, want := range map[string]float64{"ok": 1, "unauthorized": 1, "not_found": 1, "unavailable": 0} {
		if got := testutil.ToFloat64(srv.m.Requests.WithLabelValues(answer)); got != want {
			t.Errorf("%s: %v, want %v", answer, got, want)
		}
	}
	if got := testutil.ToFloat64(srv.m.Bytes); got != 10 {
		t.Errorf("bytes %v, want 10", got)
	}
	mfs, _ := reg.Gather()
	if s := fmt.Sprint(mfs); strings.Contains(s, secret) {
		t.Error("the secret is in the metrics")
	}
}

// A server that knows the host it is served as refuses signatures made
// for any other (a Host header rewritten to match a signature collected
// elsewhere); several secrets are accepted (rotation); the client signs
// with its one secret and sends it to no one; redirects are not followed.
func TestSignatureHostRotationRedirect(t *testing.T) {
	dir := t.TempDir()
	data := []byte("0123456789abcdef0123456789abcdef")
	os.WriteFile(filepath.Join(dir, "f"), data, 0o600)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	host := ln.Addr().String()
	srv := NewServerConfig(ServerConfig{Secrets: [][]byte{[]byte("new-secret-0123456789"), []byte(secret)}, Host: host})
	srv.Hold("pg1", &dirHolder{dir: dir, held: map[string]string{"f": ""}})
	hs := httptest.NewUnstartedServer(srv)
	hs.Listener.Close()
	hs.Listener = ln
	hs.Start()
	defer hs.Close()
	u := URL(hs.URL, "pg1", "f")
	for _, sec := range []string{"new-secret-0123456789", secret} {
		got, err := NewClient(ClientConfig{Secret: []byte(sec)}).Fetch(context.Background(), u, "", int64(len(data)), nil)
		if err != nil || !bytes.Equal(got, data) {
			t.Errorf("secret %q of the server's list: %v", sec[:4], err)
		}
	}
	// A signature made for the host "evil:1", replayed with that Host.
	req, _ := http.NewRequest(http.MethodGet, u, nil)
	req.Host = "evil:1"
	req.Header.Set("Authorization", signature(secret, time.Now().Unix(), "evil:1", req.URL.RequestURI()))
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusUnauthorized {
		t.Errorf("signature for another host: %s, want 401", resp.Status)
	}

	// A URL from an event that points elsewhere and redirects to the
	// real receiver: the client neither sends the secret nor follows.
	var auths []string
	var mu sync.Mutex
	evil := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		auths = append(auths, r.Header.Get("Authorization"))
		mu.Unlock()
		http.Redirect(w, r, u, http.StatusFound)
	}))
	defer evil.Close()
	_, err = NewClient(ClientConfig{Secret: []byte(secret)}).Fetch(context.Background(), evil.URL+"/wal/pg1/f", "", int64(len(data)), nil)
	if err == nil {
		t.Errorf("a redirect was followed")
	}
	mu.Lock()
	defer mu.Unlock()
	if len(auths) != 1 || strings.Contains(auths[0], secret) || !strings.HasPrefix(auths[0], AuthScheme+" ts=") {
		t.Errorf("the other host saw %q", auths)
	}
}

// Give-up needs failures spanning GiveUp with no quiet gap: a streak with
// no failure for longer than Quiet is over, and a later failure starts a
// new one; failures every 30 s for longer than GiveUp give up.
func TestGiveUpNeedsContinuousFailure(t *testing.T) {
	ctx := context.Background()
	clk := &clock{t: time.Unix(1e9, 0)}
	cl := NewClient(ClientConfig{Secret: []byte(secret), GiveUp: 10 * time.Minute, Timeout: 2 * time.Second, Quiet: time.Minute, Now: clk.now})
	ln, _ := net.Listen("tcp", "127.0.0.1:0")
	dead := "http://" + ln.Addr().String() + "/wal/pg1/000000010000000000000005"
	ln.Close()
	fetch := func() error { _, err := cl.Fetch(ctx, dead, "", 1, nil); return err }
	// A failure, then one 3 h later (its events went elsewhere meanwhile):
	// neither an old failure nor two of them take the host for gone.
	for _, gap := range []time.Duration{0, 3 * time.Hour} {
		clk.add(gap)
		if err := fetch(); !errors.Is(err, ErrUnreachable) || errors.Is(err, ErrGone) {
			t.Fatalf("after a quiet gap of %s: %v, want transient", gap, err)
		}
	}
	// A third with no answer between, however far apart: gone (with many
	// archiver processes taking turns, each sees a dead host only now and
	// then).
	clk.add(2 * time.Minute)
	if err := fetch(); !errors.Is(err, ErrGone) {
		t.Fatalf("the third failure with no answer between, spanning more than GiveUp: %v, want gone", err)
	}
	// Another client, failing every 30 s: gone once the streak spans
	// GiveUp.
	cl = NewClient(ClientConfig{Secret: []byte(secret), GiveUp: 10 * time.Minute, Timeout: 2 * time.Second, Quiet: time.Minute, Now: clk.now})
	var err error
	for i := 0; i < 21; i++ {
		clk.add(30 * time.Second)
		err = fetch()
		if i < 20 && errors.Is(err, ErrGone) {
			t.Fatalf("gone after %d failures 30 s apart (%s), before GiveUp", i+1, time.Duration(i)*30*time.Second)
		}
	}
	if !errors.Is(err, ErrGone) {
		t.Errorf("10 min of failures every 30 s: %v, want gone", err)
	}
}

// LimitListener: at most n connections open at once; a closed one frees
// its place.
func TestLimitListener(t *testing.T) {
	inner, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ln := LimitListener(inner, 2)
	defer ln.Close()
	accepted := make(chan net.Conn, 10)
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			accepted <- c
		}
	}()
	for i := 0; i < 3; i++ {
		c, err := net.Dial("tcp", inner.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
	}
	first := <-accepted
	<-accepted
	select {
	case <-accepted:
		t.Fatal("a third connection accepted with a cap of 2")
	case <-time.After(200 * time.Millisecond):
	}
	first.Close()
	select {
	case c := <-accepted:
		c.Close()
	case <-time.After(5 * time.Second):
		t.Fatal("the third connection not accepted after one closed")
	}
}

// A response has a write deadline by size: an archiver that stops reading
// does not keep the connection (and the open file) beyond it; a 401
// closes the connection.
func TestWriteDeadlineAndCloseOn401(t *testing.T) {
	dir := t.TempDir()
	data := bytes.Repeat([]byte("w"), 48<<20)
	os.WriteFile(filepath.Join(dir, "f"), data, 0o600)
	srv := NewServerConfig(ServerConfig{Secrets: [][]byte{[]byte(secret)}, WriteBase: 300 * time.Millisecond, MinRate: 1 << 40})
	srv.Hold("pg1", &dirHolder{dir: dir, held: map[string]string{"f": ""}})
	hs := httptest.NewServer(srv)
	defer hs.Close()
	addr := strings.TrimPrefix(hs.URL, "http://")

	conn, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	uri := "/wal/pg1/f"
	fmt.Fprintf(conn, "GET %s HTTP/1.1\r\nHost: %s\r\nAuthorization: %s\r\n\r\n", uri, addr, signature(secret, time.Now().Unix(), addr, uri))
	time.Sleep(1500 * time.Millisecond) // not reading: the deadline passes
	conn.SetReadDeadline(time.Now().Add(5 * time.Second))
	n, cerr := io.Copy(io.Discard, conn)
	if n >= int64(len(data)) || cerr != nil {
		t.Errorf("read %d bytes (%v) after stalling past the write deadline, want the connection closed early", n, cerr)
	}

	c2, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c2.Close()
	fmt.Fprintf(c2, "GET %s HTTP/1.1\r\nHost: %s\r\n\r\n", uri, addr)
	c2.SetReadDeadline(time.Now().Add(5 * time.Second))
	b, err := io.ReadAll(c2) // ends at EOF only if the server closes
	if err != nil || !bytes.HasPrefix(b, []byte("HTTP/1.1 401")) {
		t.Errorf("unsigned request: %q, %v; want a 401 and the connection closed", b, err)
	}
}

// Give-up needs evidence across its whole bound: two failures GiveUp apart
// with no request between them say nothing of the time between (found by
// the simulation, seed 186: an S3 outage kept the archiver from fetching
// for minutes after one 502; the next 502 took a live receiver for gone
// and its held file's event was terminated). A host that keeps failing,
// with no silence longer than the bound, is still given up on.
func TestGiveUpNeedsFreshFailures(t *testing.T) {
	h502 := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { http.Error(w, "bad gateway", 502) }))
	defer h502.Close()
	ctx := context.Background()
	clk := &clock{t: time.Unix(1e9, 0)}
	cl := NewClient(ClientConfig{Secret: []byte(secret), GiveUp: time.Minute, Timeout: 2 * time.Second, Now: clk.now})
	u := h502.URL + "/wal/pg1/000000010000000000000005"
	if _, err := cl.Fetch(ctx, u, "", 1, nil); !errors.Is(err, ErrUnreachable) || errors.Is(err, os.ErrNotExist) {
		t.Fatalf("first failure: %v, want transient", err)
	}
	clk.add(2*time.Minute + time.Second) // nothing asked meanwhile (more than Quiet)
	if _, err := cl.Fetch(ctx, u, "", 1, nil); !errors.Is(err, ErrUnreachable) || errors.Is(err, os.ErrNotExist) {
		t.Fatalf("a failure after a silence: %v, want transient (no evidence the host was down between)", err)
	}
	// A third failure with no answer between, spanning more than GiveUp:
	// gone.
	clk.add(20 * time.Second)
	if _, err := cl.Fetch(ctx, u, "", 1, nil); !errors.Is(err, ErrGone) {
		t.Fatalf("the third failure: %v, want gone", err)
	}
}
