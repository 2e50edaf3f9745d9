package stagehttp

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"sync"
	"time"
)

// ErrUnreachable marks a fetch that failed for a reason that may pass: the
// receiver's host did not answer, timed out, or answered 5xx.
var ErrUnreachable = errors.New("receiver unreachable")

// ErrAuth marks a fetch the receiver refused: the archiver's secret is not
// the receiver's.
var ErrAuth = errors.New("receiver refused the stage secret (401/403): give archivers and receivers the same --stage-secret-file")

// ErrGone marks a URL base that has been failing continuously (no
// success, no quiet gap) for longer than Client.GiveUp. It wraps os.ErrNotExist.
var ErrGone = fmt.Errorf("receiver gone: %w", os.ErrNotExist)

// ClientConfig configures a Client.
type ClientConfig struct {
	// Secret signs every request (see AuthScheme); it is never sent.
	Secret []byte
	// TLS is used for https URLs (nil: the system's roots).
	TLS *tls.Config
	// Timeout bounds one fetch, its body included (0: one minute).
	Timeout time.Duration
	// GiveUp: a URL base (scheme and host) failing continuously for this
	// long (no success, no gap longer than Quiet) is taken for a receiver
	// that is gone (0: ten minutes).
	GiveUp time.Duration
	// Quiet: a failure streak with no failure for this long is over; the
	// next failure starts a new one, so give-up needs failures spanning
	// GiveUp with no such gap (0: one minute plus Timeout, longer than
	// the archivers' longest retry delay plus one fetch).
	Quiet time.Duration
	// Conns is how many idle connections to keep per receiver (0: 2).
	Conns int
	Now   func() time.Time
	// Transport, when set, carries the requests instead of a network
	// transport built from TLS and Conns (the deterministic simulation
	// serves them in memory).
	Transport http.RoundTripper
}

// Client fetches held files from receivers. It is safe for concurrent use.
type Client struct {
	hc     *http.Client
	secret []byte
	giveUp time.Duration
	quiet  time.Duration
	now    func() time.Time

	mu   sync.Mutex
	down map[string]failures // URL base → its failures since it last answered this process
}

// failures are a URL base's failures since it last answered this process:
// the first, the latest, how many, and where the current streak (no gap
// longer than Quiet) began. The count matters because with many archiver
// processes taking turns at an event, each one sees its host fail only now
// and then, with gaps longer than Quiet, and the streak alone would never
// end the event of a host that is gone.
type failures struct {
	first, last, streak time.Time
	n                   int
}

// goneAfter is how many failures, with no answer between and spanning
// GiveUp, take a host for gone whatever their spacing.
const goneAfter = 3

// forgetAfter is how long failures are kept after the last one.
const forgetAfter = 24 * time.Hour

// NewClient builds a client.
func NewClient(cfg ClientConfig) *Client {
	if cfg.Timeout <= 0 {
		cfg.Timeout = time.Minute
	}
	if cfg.GiveUp <= 0 {
		cfg.GiveUp = 10 * time.Minute
	}
	if cfg.Quiet <= 0 {
		cfg.Quiet = time.Minute + cfg.Timeout
	}
	if cfg.Conns <= 0 {
		cfg.Conns = 2
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	var tr http.RoundTripper = &http.Transport{
		DialContext:         (&net.Dialer{Timeout: 5 * time.Second, KeepAlive: 30 * time.Second}).DialContext,
		TLSClientConfig:     cfg.TLS,
		TLSHandshakeTimeout: 5 * time.Second,
		MaxIdleConnsPerHost: cfg.Conns,
		IdleConnTimeout:     90 * time.Second,
		// WAL is compressed by the archiver; compressing it on the wire
		// would only cost CPU on both ends.
		DisableCompression: true,
	}
	if cfg.Transport != nil {
		tr = cfg.Transport
	}
	hc := &http.Client{Transport: tr, Timeout: cfg.Timeout,
		// A redirect would carry the request to a host it was not signed
		// for; the 3xx is answered as a failure instead.
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
	return &Client{hc: hc, secret: cfg.Secret,
		giveUp: cfg.GiveUp, quiet: cfg.Quiet, now: cfg.Now, down: map[string]failures{}}
}

// Fetch reads the size bytes at rawURL, which the event announced with
// SHA-256 sum, into buf (reused when large enough) and returns them. The
// caller verifies the SHA-256.
//
// A missing file (404, 410) and a receiver gone for longer than GiveUp
// wrap os.ErrNotExist: the archiver then looks in the bucket and, when the
// file is not there, terminates the event. That never loses WAL and never
// freezes flush:
//   - terminating confirms nothing: the slot's flush moves only on
//     confirmations that match a file the current receiver holds, so the
//     WAL stays in that receiver's spool or, with no receiver, in
//     PostgreSQL behind the slot;
//   - a receiver that is alive publishes the file again when its event is
//     no longer queued (--republish-after), with its current URL;
//   - a receiver started anew (on another host or port) publishes every
//     file it holds or streams again under its own run, whose message IDs
//     differ from the old run's, so JetStream never drops them as
//     duplicates of the old events waiting in the queue;
//   - the old events themselves end: a redelivery looks in the bucket
//     first and acknowledges a file the new run archived, and one whose
//     bytes exist nowhere else (a range the new run never cut) is
//     terminated once its URL has been unreachable for GiveUp.
func (c *Client) Fetch(ctx context.Context, rawURL, sum string, size int64, buf []byte) ([]byte, error) {
	u, err := url.Parse(rawURL)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" || u.User != nil {
		return nil, fmt.Errorf("stage url %q: want http(s)://host/...: %w", rawURL, os.ErrNotExist)
	}
	base := u.Scheme + "://" + u.Host
	data, err := c.get(ctx, rawURL, sum, size, buf)
	switch {
	case err == nil || errors.Is(err, os.ErrNotExist) || errors.Is(err, ErrAuth):
		c.mu.Lock()
		delete(c.down, base) // the host answered
		c.mu.Unlock()
		return data, err
	case ctx.Err() != nil:
		return nil, err
	}
	now := c.now()
	c.mu.Lock()
	for b, f := range c.down {
		if now.Sub(f.last) > forgetAfter {
			delete(c.down, b)
		}
	}
	f, ok := c.down[base]
	if !ok {
		f.first = now
	}
	if !ok || now.Sub(f.last) > c.quiet {
		// A streak is over after a quiet gap: its events ended otherwise
		// (fetched by another archiver process, found in the bucket); an
		// old failure must never count toward a new outage's streak.
		f.streak = now
	}
	f.last = now
	f.n++
	c.down[base] = f
	c.mu.Unlock()
	if now.Sub(f.streak) >= c.giveUp {
		return nil, fmt.Errorf("%w: %s unreachable since %s (more than %s): %v", ErrGone, base, f.streak.UTC().Format(time.RFC3339), c.giveUp, err)
	}
	if f.n >= goneAfter && now.Sub(f.first) >= c.giveUp {
		return nil, fmt.Errorf("%w: %s failed all %d fetches of this archiver since %s (more than %s), with no answer between: %v",
			ErrGone, base, f.n, f.first.UTC().Format(time.RFC3339), c.giveUp, err)
	}
	return nil, err
}

func (c *Client) get(ctx context.Context, rawURL, sum string, size int64, buf []byte) ([]byte, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, rawURL, nil)
	if err != nil {
		return nil, fmt.Errorf("stage url: %w", os.ErrNotExist)
	}
	ts := time.Now().Unix() // the wall clock: Now may be a test's give-up clock
	req.Header.Set("Authorization", fmt.Sprintf("%s ts=%d,sig=%s", AuthScheme, ts, Sign(c.secret, ts, req.URL.Host, req.URL.RequestURI())))
	req.Header.Set(SHA256Header, sum)
	resp, err := c.hc.Do(req)
	if err != nil {
		// The error names the URL, never the Authorization header.
		return nil, fmt.Errorf("%w: %v", ErrUnreachable, err)
	}
	defer resp.Body.Close()
	switch {
	case resp.StatusCode == http.StatusOK:
	case resp.StatusCode == http.StatusNotFound || resp.StatusCode == http.StatusGone:
		return nil, fmt.Errorf("fetch %s: %s: %w", rawURL, resp.Status, os.ErrNotExist)
	case resp.StatusCode == http.StatusUnauthorized || resp.StatusCode == http.StatusForbidden:
		return nil, fmt.Errorf("fetch %s: %w", rawURL, ErrAuth)
	default:
		return nil, fmt.Errorf("%w: fetch %s: %s", ErrUnreachable, rawURL, resp.Status)
	}
	if resp.ContentLength >= 0 && resp.ContentLength != size {
		return nil, fmt.Errorf("%w: fetch %s: %d bytes, the event says %d", ErrUnreachable, rawURL, resp.ContentLength, size)
	}
	if int64(cap(buf)) < size {
		buf = make([]byte, size)
	}
	buf = buf[:size]
	if _, err := io.ReadFull(resp.Body, buf); err != nil {
		return nil, fmt.Errorf("%w: fetch %s: %v", ErrUnreachable, rawURL, err)
	}
	return buf, nil
}
