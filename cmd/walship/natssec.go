package main

import (
	"bytes"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"net/url"
	"os"
	"strings"
	"time"

	"github.com/nats-io/jwt/v2"
	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
)

// natsSecurity is how walship authenticates to NATS and secures the link:
// TLS with a private CA and an optional client certificate, and one of a
// creds file (JWT + nkey seed), an nkey seed file, or a user and password.
// The flag names follow the nats CLI's (--tlsca, --tlscert, --tlskey,
// --creds, --nkey, --user, --password) with a nats- prefix. The
// embedded-* fields secure the server 'walship run' embeds.
type natsSecurity struct {
	TLSCA, TLSCert, TLSKey string
	Creds, NKey            string
	User, Password         string

	EmbeddedTLSCert, EmbeddedTLSKey string
	EmbeddedUser, EmbeddedPassword  string

	// embedded is how this process reaches its own embedded server, set
	// (embeddedSet) when it starts one.
	embedded    []nats.Option
	embeddedSet bool
}

func addNATSSecurityFlags(fs *flag.FlagSet, s *natsSecurity) {
	fs.StringVar(&s.TLSCA, "nats-tls-ca", "", "PEM file of the CA(s) that signed the NATS server's certificate (implies TLS)")
	fs.StringVar(&s.TLSCert, "nats-tls-cert", "", "PEM client certificate for NATS servers that verify clients (with --nats-tls-key)")
	fs.StringVar(&s.TLSKey, "nats-tls-key", "", "PEM key of --nats-tls-cert")
	fs.StringVar(&s.Creds, "nats-creds", "", "NATS credentials file (user JWT and nkey seed, as 'nsc generate creds' writes)")
	fs.StringVar(&s.NKey, "nats-nkey", "", "file holding a NATS user nkey seed (SU...)")
	fs.StringVar(&s.User, "nats-user", "", "NATS user (or user:password@ in the --nats URL)")
	fs.StringVar(&s.Password, "nats-password", "", "NATS password; prefer WALSHIP_NATS_PASSWORD: a flag shows in ps")
}

func addEmbeddedNATSSecurityFlags(fs *flag.FlagSet, s *natsSecurity) {
	fs.StringVar(&s.EmbeddedTLSCert, "embedded-nats-tls-cert", "", "PEM certificate: the embedded NATS server requires TLS (with --embedded-nats-tls-key)")
	fs.StringVar(&s.EmbeddedTLSKey, "embedded-nats-tls-key", "", "PEM key of --embedded-nats-tls-cert")
	fs.StringVar(&s.EmbeddedUser, "embedded-nats-user", "", "the embedded NATS server accepts only this user (with --embedded-nats-password)")
	fs.StringVar(&s.EmbeddedPassword, "embedded-nats-password", "", "password of --embedded-nats-user; prefer WALSHIP_EMBEDDED_NATS_PASSWORD")
}

// clientOptions are the nats.go options for connecting to natsURL with the
// configured security. Every mistake an operator can make in them is a
// usage error that names the flag; no secret is part of its text.
func (s *natsSecurity) clientOptions(natsURL string) ([]nats.Option, error) {
	if s.embeddedSet {
		return s.embedded, nil
	}
	var opts []nats.Option
	if s.TLSCA != "" || s.TLSCert != "" || s.TLSKey != "" {
		cfg := &tls.Config{MinVersion: tls.VersionTLS12}
		if s.TLSCA != "" {
			pool, err := loadCAPool("--nats-tls-ca", s.TLSCA)
			if err != nil {
				return nil, err
			}
			cfg.RootCAs = pool
		}
		if (s.TLSCert == "") != (s.TLSKey == "") {
			return nil, fmt.Errorf("%w: --nats-tls-cert and --nats-tls-key go together", errUsage)
		}
		if s.TLSCert != "" {
			pair, err := tls.LoadX509KeyPair(s.TLSCert, s.TLSKey)
			if err != nil {
				return nil, fmt.Errorf("%w: --nats-tls-cert %s / --nats-tls-key: %v", errUsage, s.TLSCert, fileReason(err))
			}
			cfg.Certificates = []tls.Certificate{pair}
		}
		opts = append(opts, nats.Secure(cfg))
	}
	urlUser := urlHasUser(natsURL)
	methods := 0
	for _, set := range []bool{s.Creds != "", s.NKey != "", s.User != "" || urlUser} {
		if set {
			methods++
		}
	}
	if methods > 1 {
		return nil, fmt.Errorf("%w: give one NATS authentication: --nats-creds, --nats-nkey, or a user and password (--nats-user or in --nats)", errUsage)
	}
	if s.Password != "" && s.User == "" {
		return nil, fmt.Errorf("%w: --nats-password needs --nats-user", errUsage)
	}
	if s.User != "" && urlUser {
		return nil, fmt.Errorf("%w: give the NATS user either in the --nats URL or with --nats-user, not both", errUsage)
	}
	switch {
	case s.Creds != "":
		if err := checkCreds(s.Creds, time.Now()); err != nil {
			return nil, err
		}
		opts = append(opts, nats.UserCredentials(s.Creds))
	case s.NKey != "":
		if err := readable("--nats-nkey", s.NKey); err != nil {
			return nil, err
		}
		o, err := nats.NkeyOptionFromSeed(s.NKey)
		if err != nil {
			// nats.go's errors here never quote the seed.
			return nil, fmt.Errorf("%w: --nats-nkey %s: not an nkey seed file (%v)", errUsage, s.NKey, err)
		}
		opts = append(opts, o)
	case s.User != "":
		opts = append(opts, nats.UserInfo(s.User, s.Password))
	}
	return opts, nil
}

// checkCreds reads a creds file as nats.go will and refuses, naming the
// flag, what the server would refuse with a bare "authorization
// violation" or worse: a file that is not a creds file (nats.go would
// send a whole nkey seed file to the server as the JWT), a seed that is
// not the JWT's user's, a JWT expired at now. The reasons are walship's
// own words: the parsers' errors could quote the file.
func checkCreds(path string, now time.Time) error {
	b, err := os.ReadFile(path)
	if err != nil {
		return fmt.Errorf("%w: --nats-creds %s: %v", errUsage, path, fileReason(err))
	}
	defer clear(b)
	bad := func(why string) error {
		return fmt.Errorf("%w: --nats-creds %s: %s (want a creds file as 'nsc generate creds' writes)", errUsage, path, why)
	}
	if !bytes.Contains(b, []byte("-----BEGIN NATS USER JWT-----")) {
		return bad("no user JWT in the file")
	}
	token, err := jwt.ParseDecoratedJWT(b)
	if err != nil {
		return bad("no user JWT in the file")
	}
	claims, err := jwt.DecodeUserClaims(token)
	if err != nil {
		return bad("the JWT is not a valid user JWT")
	}
	kp, err := jwt.ParseDecoratedUserNKey(b)
	if err != nil {
		return bad("no user nkey seed in the file")
	}
	pub, err := kp.PublicKey()
	kp.Wipe()
	if err != nil || pub != claims.Subject {
		return bad("the nkey seed is not the JWT's user's")
	}
	if claims.Expires > 0 && now.Unix() >= claims.Expires {
		return fmt.Errorf("%w: --nats-creds %s: the user JWT expired at %s: renew the credentials", errUsage, path,
			time.Unix(claims.Expires, 0).UTC().Format(time.RFC3339))
	}
	return nil
}

// urlHasUser reports whether any of the comma-separated URLs carries
// user information.
func urlHasUser(urls string) bool {
	for _, u := range strings.Split(urls, ",") {
		if p, err := url.Parse(strings.TrimSpace(u)); err == nil && p.User != nil {
			return true
		}
	}
	return false
}

func loadCAPool(flagName, path string) (*x509.CertPool, error) {
	pem, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("%w: %s %s: %v", errUsage, flagName, path, fileReason(err))
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		return nil, fmt.Errorf("%w: %s %s: no PEM certificate in the file", errUsage, flagName, path)
	}
	return pool, nil
}

func readable(flagName, path string) error {
	f, err := os.Open(path)
	if err != nil {
		return fmt.Errorf("%w: %s %s: %v", errUsage, flagName, path, fileReason(err))
	}
	f.Close()
	return nil
}

// fileReason drops the path os errors repeat.
func fileReason(err error) string {
	var pe *os.PathError
	if errors.As(err, &pe) {
		return pe.Err.Error()
	}
	return err.Error()
}

// embeddedServerOptions adds TLS and a user to the embedded server's
// options, and prepares how this process connects to it.
func (s *natsSecurity) embeddedServerOptions(o *server.Options, log *slog.Logger) error {
	if (s.EmbeddedTLSCert == "") != (s.EmbeddedTLSKey == "") {
		return fmt.Errorf("%w: --embedded-nats-tls-cert and --embedded-nats-tls-key go together", errUsage)
	}
	if (s.EmbeddedUser == "") != (s.EmbeddedPassword == "") {
		return fmt.Errorf("%w: --embedded-nats-user and --embedded-nats-password go together", errUsage)
	}
	var client []nats.Option
	if s.EmbeddedTLSCert != "" {
		pair, err := tls.LoadX509KeyPair(s.EmbeddedTLSCert, s.EmbeddedTLSKey)
		if err != nil {
			return fmt.Errorf("%w: --embedded-nats-tls-cert %s / --embedded-nats-tls-key: %v", errUsage, s.EmbeddedTLSCert, fileReason(err))
		}
		o.TLS = true
		o.TLSConfig = &tls.Config{Certificates: []tls.Certificate{pair}, MinVersion: tls.VersionTLS12}
		o.TLSTimeout = 5
		// This process trusts exactly its own server's certificate,
		// whatever address it listens on.
		leaf := pair.Certificate[0]
		client = append(client, nats.Secure(&tls.Config{
			MinVersion:         tls.VersionTLS12,
			InsecureSkipVerify: true, // replaced by the pin below
			VerifyPeerCertificate: func(raw [][]byte, _ [][]*x509.Certificate) error {
				if len(raw) == 0 || !bytes.Equal(raw[0], leaf) {
					return errors.New("the embedded NATS server presented another certificate")
				}
				return nil
			},
		}))
	}
	if s.EmbeddedUser != "" {
		o.Username, o.Password = s.EmbeddedUser, s.EmbeddedPassword
		client = append(client, nats.UserInfo(s.EmbeddedUser, s.EmbeddedPassword))
	}
	if ip := net.ParseIP(o.Host); (ip == nil || !ip.IsLoopback()) && o.Host != "localhost" && (!o.TLS || o.Username == "") {
		log.Warn("the embedded NATS server listens beyond loopback without TLS and a user: anyone who reaches it can read and change walship's queue; set --embedded-nats-tls-cert/-key and --embedded-nats-user/-password",
			"listen", net.JoinHostPort(o.Host, fmt.Sprint(o.Port)))
	}
	s.embedded, s.embeddedSet = client, true
	return nil
}
