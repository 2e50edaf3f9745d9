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

// ErrGone marks a URL base that has been unreachable, without one success,
// for longer than Client.GiveUp. It wraps os.ErrNotExist.
var ErrGone = fmt.Errorf("receiver gone: %w", os.ErrNotExist)

// QuietRestart: a failure that comes after a silence longer than this and
// than GiveUp (no request to that URL base) starts the give-up count over.
// It is well above the archivers' longest retry delay (30 s), so a host
// that stays unreachable while events wait for it is still given up on.
const QuietRestart = 2 * time.Minute

// ClientConfig configures a Client.
type ClientConfig struct {
	Secret []byte
	// TLS is used for https URLs (nil: the system's roots).
	TLS *tls.Config
	// Timeout bounds one fetch, its body included (0: one minute).
	Timeout time.Duration
	// GiveUp: a URL base (scheme and host) unreachable for this long
	// without one success is taken for a receiver that is gone (0: ten
	// minutes). A failure after a long silence (see QuietRestart)
	// starts the count over.
	GiveUp time.Duration
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
	auth   string
	giveUp time.Duration
	now    func() time.Time

	mu   sync.Mutex
	down map[string]downSince // URL base → failures since its last answer
}

// downSince is a URL base's failures since it last answered: the first
// and the latest.
type downSince struct{ first, last time.Time }

// NewClient builds a client.
func NewClient(cfg ClientConfig) *Client {
	if cfg.Timeout <= 0 {
		cfg.Timeout = time.Minute
	}
	if cfg.GiveUp <= 0 {
		cfg.GiveUp = 10 * time.Minute
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
	return &Client{hc: &http.Client{Transport: tr, Timeout: cfg.Timeout}, auth: "Bearer " + string(cfg.Secret),
		giveUp: cfg.GiveUp, now: cfg.Now, down: map[string]downSince{}}
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
	d, ok := c.down[base]
	if !ok || now.Sub(d.last) > max(c.giveUp, QuietRestart) {
		// The host is taken for gone only on failures that span GiveUp
		// without a long silence: after one (nothing was asked of the
		// host: NATS or S3 down, no events), an old failure says nothing
		// of the time since.
		d.first = now
	}
	d.last = now
	c.down[base] = d
	first := d.first
	c.mu.Unlock()
	if now.Sub(first) >= c.giveUp {
		return nil, fmt.Errorf("%w: %s unreachable since %s (more than %s): %v", ErrGone, base, first.UTC().Format(time.RFC3339), c.giveUp, err)
	}
	return nil, err
}

func (c *Client) get(ctx context.Context, rawURL, sum string, size int64, buf []byte) ([]byte, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, rawURL, nil)
	if err != nil {
		return nil, fmt.Errorf("stage url: %w", os.ErrNotExist)
	}
	req.Header.Set("Authorization", c.auth)
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
