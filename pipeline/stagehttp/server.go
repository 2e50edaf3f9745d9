// Package stagehttp is the claim check between a receiver and archivers on
// other hosts (--stage http): the receiver process serves the WAL files it
// has announced and still holds, read-only, over HTTP, to requests signed
// with a shared secret (see AuthScheme); the segment event carries the URL, and archivers fetch the bytes
// from there instead of from the JetStream object store.
//
// The server never builds a file system path from a request: a request
// names a server and a spool file by name, and the server asks that
// server's Holder (the receiver's state machine) for the file, which
// answers only for a file it has announced, still holds and whose SHA-256
// matches the one the archiver expects. Anything else is 404.
//
// Failure semantics, as the archiver sees them (Client.Fetch):
//   - 404 or 410: the receiver no longer holds the file (it was confirmed
//     and removed, or it is another run's) — the error wraps
//     os.ErrNotExist, exactly like a staged object missing from the object
//     store: the archiver looks in the bucket, and if the file is not
//     there it terminates the event; the receiver that holds it publishes
//     it again.
//   - connection refused, timeout, 5xx, 503 while a receiver restarts:
//     transient (ErrUnreachable); the archiver hands the event back with a
//     back-off.
//   - the same URL base failing continuously (no success, and no gap
//     longer than Client's Quiet) for longer than Client.GiveUp: the receiver host is taken for gone, and the
//     error wraps os.ErrNotExist too (see Client.Fetch for why this never
//     loses WAL and never freezes flush).
//   - 401/403: the secrets differ (ErrAuth); handed back with a back-off
//     and counted, never terminated: a configuration mistake must not drop
//     WAL.
package stagehttp

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/url"
	"os"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// Holder opens a file its receiver announced and still holds, by its
// spool name, if its SHA-256 is sha256 (empty: any). A file it does not
// hold, or holds with other bytes, wraps os.ErrNotExist. size is the
// number of bytes the event announced, which the file holds from offset 0.
type Holder interface {
	OpenHeld(name, sha256 string) (f io.ReadCloser, size int64, err error)
}

// SHA256Header carries the SHA-256 the archiver expects (the event's); the
// server answers 404 when the file it holds under that name has other
// bytes.
const SHA256Header = "X-Walship-Sha256"

// pathPrefix is where files are served: /wal/<server>/<name>.
const pathPrefix = "/wal/"

var (
	serverRE = regexp.MustCompile(`^[A-Za-z0-9_-]{1,64}$`)
	// nameRE: every spool WAL file name (segment, ended timeline's last
	// segment, history, range) is made of these; no '/' and no "..".
	nameRE = regexp.MustCompile(`^[0-9A-Za-z][0-9A-Za-z._-]{0,127}$`)
)

// Metrics are the stage server's series.
type Metrics struct {
	// Requests by answer: ok, unauthorized, not_found, unavailable, error.
	Requests *prometheus.CounterVec
	Bytes    prometheus.Counter
}

// NewMetrics registers the stage server's series on reg.
func NewMetrics(reg prometheus.Registerer) *Metrics {
	m := &Metrics{
		Requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "walship_stage_requests_total",
			Help: "Requests to the --stage http server by answer: ok, unauthorized (wrong or missing secret), not_found, unavailable (receiver restarting), error.",
		}, []string{"answer"}),
		Bytes: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "walship_stage_sent_bytes_total",
			Help: "Spool bytes the --stage http server was asked to send (whole files and ranges), in bytes.",
		}),
	}
	for _, a := range []string{"ok", "unauthorized", "not_found", "unavailable", "error"} {
		m.Requests.WithLabelValues(a)
	}
	reg.MustRegister(m.Requests, m.Bytes)
	return m
}

// Server serves the held files of every receiver of a process.
type Server struct {
	secrets [][]byte // any of them signs a valid request (rotation)
	host    string   // the Host archivers dial; "": any (tests)
	now     func() time.Time
	wbase   time.Duration
	wrate   int64
	log     *slog.Logger
	m       *Metrics

	mu      sync.Mutex
	holders map[string]*holding // by server; nil while its receiver restarts
}

// holding is one registration: release compares it by identity, so a
// holder need not be comparable.
type holding struct{ h Holder }

var _ http.Handler = (*Server)(nil)

// ServerConfig configures a Server.
type ServerConfig struct {
	// Secrets: a request signed with any of them is admitted (the first
	// is the current one, the others are accepted while archivers move
	// over to it).
	Secrets [][]byte
	// Host is the host (and port, as written in the stage URL) archivers
	// dial: a request signed for another host is refused. "" admits any
	// Host the signature names, which only tests should do.
	Host string
	Log  *slog.Logger
	// Metrics may be nil.
	Metrics *Metrics
	Now     func() time.Time
	// A response must be written within WriteBase plus its size at
	// MinRate bytes per second, else the connection is closed: an
	// archiver that stops reading (SIGSTOP, a dead network) pins no file
	// and no descriptor for long (0: 30 s and 1 MiB/s).
	WriteBase time.Duration
	MinRate   int64
}

// NewServer builds a server that admits requests signed with secret, for
// any Host (see ServerConfig.Host). log and m may be nil.
func NewServer(secret []byte, log *slog.Logger, m *Metrics) *Server {
	return NewServerConfig(ServerConfig{Secrets: [][]byte{secret}, Log: log, Metrics: m})
}

// NewServerConfig builds a server.
func NewServerConfig(cfg ServerConfig) *Server {
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.DiscardHandler)
	}
	if cfg.Metrics == nil {
		cfg.Metrics = NewMetrics(prometheus.NewRegistry())
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.WriteBase <= 0 {
		cfg.WriteBase = 30 * time.Second
	}
	if cfg.MinRate <= 0 {
		cfg.MinRate = 1 << 20
	}
	return &Server{secrets: cfg.Secrets, host: cfg.Host, now: cfg.Now, wbase: cfg.WriteBase, wrate: cfg.MinRate,
		log: cfg.Log, m: cfg.Metrics, holders: map[string]*holding{}}
}

// Hold serves h's files under server until release is called. While a
// server is known but has no holder (its receiver restarts), requests for
// it get 503, a transient answer.
func (s *Server) Hold(server string, h Holder) (release func()) {
	reg := &holding{h: h}
	s.mu.Lock()
	s.holders[server] = reg
	s.mu.Unlock()
	return func() {
		s.mu.Lock()
		if s.holders[server] == reg {
			s.holders[server] = nil
		}
		s.mu.Unlock()
	}
}

// AuthScheme names the Authorization scheme of a signed request:
//
//	Authorization: walship-hmac ts=<unix seconds>,sig=<hex HMAC-SHA256(secret, ts "\n" host "\n" path-with-query)>
//
// host is the Host the archiver dials (the event URL's), path-with-query
// the request URI. The secret itself never leaves the archiver: a URL
// pointing elsewhere collects a signature good for that host and path
// only, for MaxSkew.
const AuthScheme = "walship-hmac"

// MaxSkew is how far a signature's time may be from the server's clock.
const MaxSkew = 5 * time.Minute

// Sign is the signature of a request for host and uri at ts under secret.
func Sign(secret []byte, ts int64, host, uri string) string {
	mac := hmac.New(sha256.New, secret)
	fmt.Fprintf(mac, "%d\n%s\n%s", ts, host, uri)
	return hex.EncodeToString(mac.Sum(nil))
}

// authorized reports whether r carries a fresh signature, for this
// server's host, under one of its secrets; signatures are compared in
// constant time.
func (s *Server) authorized(r *http.Request) bool {
	params, ok := strings.CutPrefix(r.Header.Get("Authorization"), AuthScheme+" ")
	if !ok {
		return false
	}
	var tsText, sigText string
	for _, kv := range strings.Split(params, ",") {
		k, v, _ := strings.Cut(strings.TrimSpace(kv), "=")
		switch k {
		case "ts":
			tsText = v
		case "sig":
			sigText = v
		}
	}
	ts, err := strconv.ParseInt(tsText, 10, 64)
	if err != nil {
		return false
	}
	if d := s.now().Sub(time.Unix(ts, 0)); d > MaxSkew || d < -MaxSkew {
		return false
	}
	if s.host != "" && !strings.EqualFold(r.Host, s.host) {
		return false
	}
	sig, err := hex.DecodeString(sigText)
	if err != nil || len(sig) != sha256.Size {
		return false
	}
	ok = false
	for _, sec := range s.secrets {
		want, _ := hex.DecodeString(Sign(sec, ts, r.Host, r.RequestURI))
		if hmac.Equal(sig, want) {
			ok = true
		}
	}
	return ok
}

// ServeHTTP serves GET and HEAD of /wal/<server>/<name>, with Range
// support.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if !s.authorized(r) {
		s.m.Requests.WithLabelValues("unauthorized").Inc()
		w.Header().Set("WWW-Authenticate", AuthScheme+` realm="walship"`)
		// No keep-alive for who cannot sign: the connection goes now.
		w.Header().Set("Connection", "close")
		http.Error(w, "unauthorized", http.StatusUnauthorized)
		return
	}
	if r.Method != http.MethodGet && r.Method != http.MethodHead {
		w.Header().Set("Allow", "GET, HEAD")
		w.Header().Set("Connection", "close")
		http.Error(w, "method not allowed", http.StatusMethodNotAllowed)
		return
	}
	server, name, ok := parsePath(r.URL.EscapedPath())
	if !ok {
		s.m.Requests.WithLabelValues("not_found").Inc()
		http.NotFound(w, r)
		return
	}
	s.mu.Lock()
	reg, known := s.holders[server]
	s.mu.Unlock()
	switch {
	case !known:
		s.m.Requests.WithLabelValues("not_found").Inc()
		http.NotFound(w, r)
		return
	case reg == nil:
		s.m.Requests.WithLabelValues("unavailable").Inc()
		w.Header().Set("Retry-After", "1")
		http.Error(w, "receiver restarting", http.StatusServiceUnavailable)
		return
	}
	f, size, err := reg.h.OpenHeld(name, r.Header.Get(SHA256Header))
	if errors.Is(err, os.ErrNotExist) {
		s.m.Requests.WithLabelValues("not_found").Inc()
		http.NotFound(w, r)
		return
	}
	if err != nil {
		s.m.Requests.WithLabelValues("error").Inc()
		s.log.Warn("stage: cannot open a held spool file", "server", server, "file", name, "error", err)
		http.Error(w, "cannot read the file", http.StatusInternalServerError)
		return
	}
	defer f.Close()
	// Bounded by the size: the file stays open (and its disk space taken,
	// once confirmed and removed) only while the archiver reads.
	limit := s.wbase + time.Duration(size/s.wrate)*time.Second
	if err := http.NewResponseController(w).SetWriteDeadline(time.Now().Add(limit)); err != nil {
		s.log.Debug("stage: cannot bound the response's write time", "error", err)
	}
	s.m.Requests.WithLabelValues("ok").Inc()
	if r.Method == http.MethodGet {
		s.m.Bytes.Add(float64(size))
	}
	// A failed write (the deadline passed, the peer went) aborts: the
	// connection is closed rather than kept for another request.
	ew := &errWriter{ResponseWriter: w}
	defer func() {
		if ew.err != nil {
			panic(http.ErrAbortHandler)
		}
	}()
	w = ew
	w.Header().Set("Content-Type", "application/octet-stream")
	if of, ok := f.(*os.File); ok {
		if st, err := of.Stat(); err == nil && st.Size() == size {
			// The whole file is the announced bytes: served from the file
			// itself, so that the kernel sends it (sendfile) without a copy
			// through this process.
			http.ServeContent(w, r, "", time.Time{}, of)
			return
		}
	}
	if ra, ok := f.(io.ReaderAt); ok {
		// Ranges, HEAD and Content-Length from the standard library.
		http.ServeContent(w, r, "", time.Time{}, io.NewSectionReader(ra, 0, size))
		return
	}
	w.Header().Set("Content-Length", strconv.FormatInt(size, 10))
	if r.Method == http.MethodHead {
		return
	}
	io.CopyN(w, f, size)
}

// errWriter remembers a ResponseWriter's first write error; it keeps
// ReadFrom, so that files still go out by sendfile.
type errWriter struct {
	http.ResponseWriter
	err error
}

func (w *errWriter) Write(p []byte) (int, error) {
	n, err := w.ResponseWriter.Write(p)
	if err != nil && w.err == nil {
		w.err = err
	}
	return n, err
}

func (w *errWriter) ReadFrom(r io.Reader) (int64, error) {
	var n int64
	var err error
	if rf, ok := w.ResponseWriter.(io.ReaderFrom); ok {
		n, err = rf.ReadFrom(r)
	} else {
		n, err = io.Copy(struct{ io.Writer }{w.ResponseWriter}, r)
	}
	if err != nil && w.err == nil {
		w.err = err
	}
	return n, err
}

// Unwrap gives http.ResponseController the underlying writer.
func (w *errWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }

// parsePath splits /wal/<server>/<name>. Escaped or extra path elements
// are refused: names are plain.
func parsePath(p string) (server, name string, ok bool) {
	rest, ok := strings.CutPrefix(p, pathPrefix)
	if !ok {
		return "", "", false
	}
	server, name, ok = strings.Cut(rest, "/")
	if !ok || !serverRE.MatchString(server) || !nameRE.MatchString(name) || strings.Contains(name, "..") {
		return "", "", false
	}
	return server, name, true
}

// URL is where base serves server's spool file name.
func URL(base, server, name string) string {
	return strings.TrimRight(base, "/") + pathPrefix + url.PathEscape(server) + "/" + url.PathEscape(name)
}
