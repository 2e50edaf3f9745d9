package main

import (
	"context"
	"crypto/tls"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"os"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/walship/walship/pipeline/archiver"
	"github.com/walship/walship/pipeline/receiver"
	"github.com/walship/walship/pipeline/stagehttp"
)

// stageFlags choose how segment bytes travel from receivers to archivers
// on other hosts: through the JetStream object store (nats), or fetched by
// the archivers straight from the receiver's spool over HTTP (http, a
// claim check).
type stageFlags struct {
	Mode       string
	Listen     string
	URL        string
	SecretFile string
	TLSCert    string
	TLSKey     string
	CA         string
	Timeout    time.Duration
	GiveUp     time.Duration
}

// stageMaxConns caps the stage server's open connections.
const stageMaxConns = 256

// stageSecretEnv holds the shared secret itself (not a file name).
const stageSecretEnv = "WALSHIP_STAGE_SECRET"

func registerStageFlags(fs *flag.FlagSet, c *config, groups flagGroup) {
	s := &c.Stage
	// The archivers' flags go to archive and run only (gArchive also
	// serves fetch's flag set, which never talks to a receiver).
	archivers := groups&gArchive != 0 && groups&gNATS != 0
	if groups&gReceive != 0 || archivers {
		fs.StringVar(&s.SecretFile, "stage-secret-file", "", "file holding the secret shared by receivers and archivers for --stage http, one per line for a rotation: archivers sign requests with the first line, receivers accept any (or one secret itself in "+stageSecretEnv+"); it never goes over the network")
	}
	if groups&gReceive != 0 {
		fs.StringVar(&s.Mode, "stage", "auto", "how archivers on other hosts get segment bytes: http (fetched from this receiver's spool, a claim check), nats (the JetStream object store), or auto: http when a stage secret is set, else nats")
		fs.StringVar(&s.Listen, "stage-listen", ":9753", "--stage http: address serving the spool's announced files to archivers")
		fs.StringVar(&s.URL, "stage-url", "", "--stage http: base URL archivers reach the stage server at (default http(s)://<host name>:<listen port>)")
		fs.StringVar(&s.TLSCert, "stage-tls-cert", "", "--stage http: PEM certificate to serve HTTPS with (with --stage-tls-key)")
		fs.StringVar(&s.TLSKey, "stage-tls-key", "", "--stage http: PEM private key of --stage-tls-cert")
	}
	if archivers {
		fs.StringVar(&s.CA, "stage-ca", "", "PEM file of the CA(s) that signed receivers' --stage-tls-cert (default: the system's)")
		fs.DurationVar(&s.Timeout, "stage-timeout", time.Minute, "deadline of one fetch from a receiver's stage, its body included")
		fs.DurationVar(&s.GiveUp, "stage-give-up", 10*time.Minute, "a receiver's stage failing continuously this long (no success, no pause over 1m + --stage-timeout between failures), or failing three fetches in a row spanning this long, is taken for gone: its events are terminated unless the bucket holds their WAL (a new receiver publishes again)")
	}
}

// validate checks the stage flags before anything connects.
func (s *stageFlags) validate(groups flagGroup) error {
	if groups&gReceive != 0 {
		switch s.Mode {
		case "nats", "http":
		case "auto", "":
			// The faster shape where it can be authenticated: http needs
			// the secret the archivers share.
			s.Mode = "nats"
			if s.SecretFile != "" || os.Getenv(stageSecretEnv) != "" {
				s.Mode = "http"
			}
		default:
			return fmt.Errorf("%w: --stage %q: use auto, nats or http", errUsage, s.Mode)
		}
		if s.Mode == "http" {
			if _, err := s.secrets(); err != nil {
				return err
			}
			if (s.TLSCert == "") != (s.TLSKey == "") {
				return fmt.Errorf("%w: --stage-tls-cert and --stage-tls-key go together", errUsage)
			}
			if s.URL != "" && !strings.HasPrefix(s.URL, "http://") && !strings.HasPrefix(s.URL, "https://") {
				return fmt.Errorf("%w: --stage-url %q: use http://host:port or https://host:port", errUsage, s.URL)
			}
			if s.TLSCert != "" && strings.HasPrefix(s.URL, "http://") {
				return fmt.Errorf("%w: --stage-url %q is http:// but --stage-tls-cert makes the stage serve HTTPS: use https://", errUsage, s.URL)
			}
			if s.TLSCert == "" && strings.HasPrefix(s.URL, "https://") {
				return fmt.Errorf("%w: --stage-url %q is https:// but the stage serves plain HTTP: give --stage-tls-cert and --stage-tls-key, or use http://", errUsage, s.URL)
			}
			if s.URL != "" && strings.Contains(s.URL, "@") {
				return fmt.Errorf("%w: --stage-url must not carry credentials: archivers authenticate with the stage secret", errUsage)
			}
		}
	}
	if groups&gArchive != 0 && groups&gNATS != 0 {
		if s.Timeout <= 0 || s.GiveUp <= 0 {
			return fmt.Errorf("%w: --stage-timeout and --stage-give-up must be positive", errUsage)
		}
		if s.CA != "" {
			if _, err := loadCAPool("--stage-ca", s.CA); err != nil {
				return err
			}
		}
	}
	return nil
}

// secrets reads the shared secrets: --stage-secret-file, one per line
// (rotation: archivers sign with the first, the stage server accepts any),
// else the one in WALSHIP_STAGE_SECRET. Errors never show a secret.
func (s *stageFlags) secrets() ([][]byte, error) {
	var secs [][]byte
	switch {
	case s.SecretFile != "":
		b, err := os.ReadFile(s.SecretFile)
		if err != nil {
			return nil, fmt.Errorf("%w: --stage-secret-file %s: %v", errUsage, s.SecretFile, fileReason(err))
		}
		for i, line := range strings.Split(string(b), "\n") {
			if line = strings.TrimSpace(line); line == "" {
				continue
			}
			if !printable(line) {
				return nil, fmt.Errorf("%w: --stage-secret-file %s: line %d holds a space, tab or control character: put one secret per line, printable ASCII only (e.g. openssl rand -hex 32)", errUsage, s.SecretFile, i+1)
			}
			secs = append(secs, []byte(line))
		}
		if len(secs) == 0 {
			return nil, fmt.Errorf("%w: --stage-secret-file %s is empty: put a long random secret in it (e.g. openssl rand -hex 32)", errUsage, s.SecretFile)
		}
	case os.Getenv(stageSecretEnv) != "":
		sec := strings.TrimSpace(os.Getenv(stageSecretEnv))
		if !printable(sec) {
			return nil, fmt.Errorf("%w: %s holds a space, tab, line break or control character: it holds one secret, printable ASCII only (several, for a rotation, go in --stage-secret-file, one per line)", errUsage, stageSecretEnv)
		}
		secs = [][]byte{[]byte(sec)}
	default:
		return nil, fmt.Errorf("%w: --stage http needs a shared secret: --stage-secret-file PATH or %s (the same on the archivers)", errUsage, stageSecretEnv)
	}
	for _, sec := range secs {
		if len(sec) < 16 {
			return nil, fmt.Errorf("%w: %s: a stage secret is shorter than 16 bytes: use a long random one (e.g. openssl rand -hex 32)", errUsage, s.secretSource())
		}
	}
	return secs, nil
}

// printable reports whether s is made of printable ASCII without spaces.
func printable(s string) bool {
	for i := 0; i < len(s); i++ {
		if s[i] < 0x21 || s[i] > 0x7e {
			return false
		}
	}
	return true
}

// secretSource names where the secrets come from, for errors.
func (s *stageFlags) secretSource() string {
	if s.SecretFile != "" {
		return "--stage-secret-file " + s.SecretFile
	}
	return stageSecretEnv
}

// stagePlan is how a process's receivers stage segment bytes.
type stagePlan struct {
	objects bool              // in the object store
	url     string            // base URL of the stage server ("": none)
	srv     *stagehttp.Server // nil: none
}

// startStage prepares --stage http for a receiving process: it listens
// (a bad address is a usage error) and returns the plan and the server's
// runner. With --stage nats it returns objects and a nil runner. Without
// remote archivers (remote false: walship run with its embedded NATS) it
// returns neither: the in-process archivers read the spool, and no
// listener is opened.
func startStage(c *config, remote bool, log *slog.Logger, reg prometheus.Registerer) (stagePlan, watcher, error) {
	s := &c.Stage
	if !remote {
		// Only this process's archivers exist (walship run with its
		// embedded NATS): they read the spool; nothing is served.
		return stagePlan{}, nil, nil
	}
	if s.Mode != "http" {
		log.Info("archivers get segment bytes from the JetStream object store (--stage nats); a stage secret makes them fetch from the spool over HTTP, which is faster (--stage http)")
		return stagePlan{objects: true}, nil, nil
	}
	secs, err := s.secrets()
	if err != nil {
		return stagePlan{}, nil, err
	}
	var tlsConf *tls.Config
	scheme := "http"
	if s.TLSCert != "" {
		cert, err := tls.LoadX509KeyPair(s.TLSCert, s.TLSKey)
		if err != nil {
			return stagePlan{}, nil, fmt.Errorf("%w: --stage-tls-cert/--stage-tls-key: %v", errUsage, err)
		}
		tlsConf = &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}
		scheme = "https"
	}
	ln, err := net.Listen("tcp", s.Listen)
	if err != nil {
		return stagePlan{}, nil, fmt.Errorf("%w: --stage-listen %q: %v", errUsage, s.Listen, err)
	}
	// A cap on connections (unsigned ones included), below the TLS layer
	// so that handshakes count too.
	ln = stagehttp.LimitListener(ln, stageMaxConns)
	if tlsConf != nil {
		ln = tls.NewListener(ln, tlsConf)
	}
	base := s.URL
	if base == "" {
		base = defaultStageURL(scheme, ln.Addr())
	}
	bu, err := url.Parse(base)
	if err != nil || bu.Host == "" {
		ln.Close()
		return stagePlan{}, nil, fmt.Errorf("%w: --stage-url %q: use http://host:port or https://host:port", errUsage, base)
	}
	// Requests are signed for the host archivers dial, the stage URL's.
	srv := stagehttp.NewServerConfig(stagehttp.ServerConfig{Secrets: secs, Host: bu.Host, Log: log, Metrics: stagehttp.NewMetrics(reg)})
	log.Info("serving the spool to archivers (--stage http)", "addr", ln.Addr().String(), "url", base)
	run := func(ctx context.Context) error {
		// Responses have a write deadline by size (stagehttp.Server);
		// headers come within 10 s, idle connections go after a minute.
		hs := &http.Server{Handler: srv, ReadHeaderTimeout: 10 * time.Second, IdleTimeout: time.Minute}
		go func() {
			<-ctx.Done()
			sctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
			defer cancel()
			hs.Shutdown(sctx)
		}()
		if err := hs.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			return fmt.Errorf("stage server: %w", err)
		}
		return nil
	}
	return stagePlan{url: strings.TrimRight(base, "/"), srv: srv}, run, nil
}

// defaultStageURL is the URL archivers reach a listener at: its own host
// when it listens on one address, else this host's name; its bound port.
func defaultStageURL(scheme string, a net.Addr) string {
	host, port, _ := net.SplitHostPort(a.String())
	if ip := net.ParseIP(host); host == "" || ip != nil && ip.IsUnspecified() {
		if h, err := os.Hostname(); err == nil && h != "" {
			host = h
		}
	}
	return scheme + "://" + net.JoinHostPort(host, port)
}

// stageFetcher is the archivers' client for --stage http: nil without a
// secret (events with a URL then wait, handed back, for an archiver that
// has one).
func stageFetcher(c *config, workers int) (archiver.Fetcher, error) {
	s := &c.Stage
	if s.SecretFile == "" && os.Getenv(stageSecretEnv) == "" {
		return nil, nil
	}
	secs, err := s.secrets()
	if err != nil {
		return nil, err
	}
	var tlsConf *tls.Config
	if s.CA != "" {
		pool, err := loadCAPool("--stage-ca", s.CA)
		if err != nil {
			return nil, err
		}
		tlsConf = &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12}
	}
	return stagehttp.NewClient(stagehttp.ClientConfig{Secret: secs[0], TLS: tlsConf, Timeout: s.Timeout, GiveUp: s.GiveUp, Conns: workers}), nil
}

// hold is what a receiver gets of the plan: the server to register with
// (a nil interface when none, so the receiver sees no stage).
func (p stagePlan) hold() receiver.Stage {
	if p.srv == nil {
		return nil
	}
	return p.srv
}
