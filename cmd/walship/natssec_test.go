package main

import (
	"errors"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/jwt/v2"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nkeys"

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

// TestCheckCreds: a creds file is refused before any connection when it
// is not one (an nkey seed alone would go to the server as the JWT), when
// its seed is another user's, or when its JWT has expired; the reason
// never quotes the file.
func TestCheckCreds(t *testing.T) {
	dir := t.TempDir()
	acct, _ := nkeys.CreateAccount()
	now := time.Now()
	user := func(expires int64) (seed []byte, token string) {
		kp, _ := nkeys.CreateUser()
		seed, _ = kp.Seed()
		pub, _ := kp.PublicKey()
		uc := jwt.NewUserClaims(pub)
		uc.Expires = expires
		token, err := uc.Encode(acct)
		if err != nil {
			t.Fatal(err)
		}
		return seed, token
	}
	file := func(name string, b []byte) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, b, 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	creds := func(token string, seed []byte) []byte {
		b, err := jwt.FormatUserConfig(token, seed)
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	seed, token := user(0)
	otherSeed, _ := user(0)
	expSeed, expToken := user(now.Add(-time.Minute).Unix())
	swapped := strings.Replace(string(creds(token, seed)), string(seed), string(otherSeed), 1)
	if err := checkCreds(file("good.creds", creds(token, seed)), now); err != nil {
		t.Fatalf("a valid creds file: %v", err)
	}
	for _, tc := range []struct {
		name, content, want string
	}{
		{"seed only", string(seed) + "\n", "no user JWT"},
		{"jwt only", strings.SplitN(string(creds(token, seed)), "************************* IMPORTANT", 2)[0], "no user nkey seed"},
		{"another user's seed", swapped, "not the JWT's user's"},
		{"expired", string(creds(expToken, expSeed)), "expired at"},
	} {
		err := checkCreds(file(tc.name, []byte(tc.content)), now)
		if !errors.Is(err, errUsage) || !strings.Contains(err.Error(), tc.want) || !strings.Contains(err.Error(), "--nats-creds") {
			t.Errorf("%s: %v, want a usage error saying %q", tc.name, err, tc.want)
			continue
		}
		for _, s := range []string{string(seed), string(otherSeed), string(expSeed), token, expToken} {
			if strings.Contains(err.Error(), s) || strings.Contains(err.Error(), s[len(s)/2:len(s)/2+12]) {
				t.Errorf("%s: the error quotes the file: %v", tc.name, err)
			}
		}
	}
}
