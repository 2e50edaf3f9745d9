package main

import (
	"errors"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/walship/walship/internal/testenv"
)

// TestEmbeddedNATSSecurity: with --embedded-nats-tls-* and
// --embedded-nats-user/-password the embedded server requires both; run's
// own connection has them; a client without is refused.
func TestEmbeddedNATSSecurity(t *testing.T) {
	ca := testenv.NewCA(t, "test CA")
	cert, key := ca.Issue("embedded", []string{"127.0.0.1"}, false)
	c := &config{NATSListen: "127.0.0.1:" + strconv.Itoa(testenv.FreePort(t)), DataDir: t.TempDir(),
		NATSSec: natsSecurity{EmbeddedTLSCert: cert, EmbeddedTLSKey: key, EmbeddedUser: "walship", EmbeddedPassword: "emb-pw-1"}}
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	ns, url, err := startEmbeddedNATS(c, log)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { ns.Shutdown(); ns.WaitForShutdown() }()
	opts, err := c.NATSSec.clientOptions(url)
	if err != nil {
		t.Fatal(err)
	}
	nc, err := nats.Connect(url, append(opts, nats.Timeout(5*time.Second))...)
	if err != nil {
		t.Fatalf("run's own connection: %v", err)
	}
	if !nc.TLSRequired() {
		t.Error("the connection to the embedded server is not TLS")
	}
	nc.Close()
	if nc, err := nats.Connect(url, nats.Timeout(2*time.Second)); err == nil {
		nc.Close()
		t.Fatal("a client without TLS and user was accepted")
	}
	if nc, err := nats.Connect(url, nats.RootCAs(ca.CAPath), nats.UserInfo("walship", "wrong"), nats.Timeout(2*time.Second)); !errors.Is(err, nats.ErrAuthorization) {
		if nc != nil {
			nc.Close()
		}
		t.Fatalf("a wrong password: %v, want an authorization violation", err)
	}
	if nc, err := nats.Connect(url, nats.RootCAs(ca.CAPath), nats.UserInfo("walship", "emb-pw-1"), nats.Timeout(2*time.Second)); err != nil {
		t.Fatalf("a client with the CA and user: %v", err)
	} else {
		nc.Close()
	}
}

func TestNATSClientOptionsValidate(t *testing.T) {
	dir := t.TempDir()
	ca := testenv.NewCA(t, "test CA")
	notPEM := filepath.Join(dir, "not.pem")
	os.WriteFile(notPEM, []byte("hello"), 0o600)
	for _, tc := range []struct {
		s   natsSecurity
		url string
	}{
		{natsSecurity{TLSCA: filepath.Join(dir, "missing.pem")}, "nats://h:4222"},
		{natsSecurity{TLSCA: notPEM}, "nats://h:4222"},
		{natsSecurity{TLSCert: ca.CAPath}, "nats://h:4222"},
		{natsSecurity{Password: "x"}, "nats://h:4222"},
		{natsSecurity{User: "u"}, "nats://v:p@h:4222"},
		{natsSecurity{Creds: filepath.Join(dir, "missing.creds")}, "nats://h:4222"},
		{natsSecurity{Creds: notPEM, User: "u"}, "nats://h:4222"},
		{natsSecurity{NKey: notPEM}, "nats://h:4222"},
	} {
		if _, err := tc.s.clientOptions(tc.url); !errors.Is(err, errUsage) {
			t.Errorf("%+v %s: %v, want a usage error", tc.s, tc.url, err)
		}
	}
	for _, tc := range []struct {
		s   natsSecurity
		url string
	}{
		{natsSecurity{}, "nats://h:4222"},
		{natsSecurity{TLSCA: ca.CAPath, User: "u", Password: "p"}, "tls://h:4222"},
		{natsSecurity{}, "nats://u:p@h:4222"},
	} {
		if _, err := tc.s.clientOptions(tc.url); err != nil {
			t.Errorf("%+v %s: %v", tc.s, tc.url, err)
		}
	}
}
