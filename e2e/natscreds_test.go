package e2e

import (
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/jwt/v2"
	"github.com/nats-io/nkeys"

	"github.com/walship/walship/internal/testenv"
)

// TestNATSNKeyAndCreds (issue 14): walship authenticates to a real
// nats-server with an nkey seed file (--nats-nkey) and, in operator (JWT)
// mode, with a creds file (--nats-creds). A wrong seed, an expired user
// JWT and a revoked user are each one clear line and a non-zero exit, and
// no seed or JWT appears in any output, in text or JSON logs at debug
// level.
func TestNATSNKeyAndCreds(t *testing.T) {
	st := &stack{t: t, pg: testenv.StartPostgres(t, testenv.PGOptions{}), s3: testenv.StartS3(t),
		dataDir: t.TempDir(), metrics: testenv.FreePort(t), prefix: "backups"}
	var secrets, seen []string
	collect := func(what, text string) { seen = append(seen, what+":\n"+text) }
	dir := t.TempDir()
	write := func(name string, content []byte) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, content, 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	// secret adds a seed or JWT, and distinctive pieces of it, to what
	// must never be shown.
	secret := func(s string) {
		secrets = append(secrets, s, s[len(s)/2:len(s)/2+16])
		if i := strings.LastIndexByte(s, '.'); i > 0 { // a JWT's signature
			secrets = append(secrets, s[i+1:])
		}
	}
	// archive runs the pipeline against url with the auth flags until a
	// new segment is archived and the slot has moved past it.
	archive := func(name, url, format string, auth ...string) {
		t.Helper()
		// A pipeline of its own: server name, data directory and slot.
		st.server, st.dataDir = name, t.TempDir()
		args := append(st.args("run", "--create-slot", "--nats", url, "--log-format", format), auth...)
		w := startWalship(t, st.env(), args...)
		waitFor(t, 20*time.Second, name+": streaming", func() bool {
			if w.exited() {
				b, _ := os.ReadFile(w.logPath)
				t.Fatalf("%s: walship exited: %v\n%s", name, w.err, tail(string(b), 3000))
			}
			return st.walsenderPID() != ""
		})
		before := len(st.archivedSegments())
		st.pg.Exec(`CREATE TABLE IF NOT EXISTS nk AS SELECT g FROM generate_series(1, 1000) g`)
		end := st.switchWAL()
		waitFor(t, 20*time.Second, name+": a segment archived and the slot moved past it", func() bool {
			return st.slotRestart() >= end && len(st.archivedSegments()) > before
		})
		if err := w.stop(t); err != nil {
			t.Errorf("%s: walship run: %v", name, err)
		}
		b, _ := os.ReadFile(w.logPath)
		collect(name+" log", string(b))
		st.pg.Exec(`SELECT pg_drop_replication_slot('walship')`)
	}
	refused := func(name, url string, want []string, auth ...string) {
		t.Helper()
		out := failsWith(t, st.env(), append([]string{"archive", "--nats", url, "--dest", "s3://" + st.s3.Bucket + "/" + st.prefix,
			"--s3-endpoint", st.s3.Endpoint(), "--s3-path-style", "--data-dir", t.TempDir(), "--metrics-addr", "", "--log-level", "debug"}, auth...), want...)
		logLast(t, out)
		collect(name, out)
	}

	// nkey: the server knows the user's public key only.
	user, wrong := mustNKey(t, nkeys.CreateUser), mustNKey(t, nkeys.CreateUser)
	seed, pub := seedAndPublic(t, user)
	wrongSeed, _ := seedAndPublic(t, wrong)
	secret(seed)
	secret(wrongSeed)
	nk := testenv.StartNATSProcWith(t, "authorization {\n  users = [ { nkey: "+strconv.Quote(pub)+" } ]\n}\n", nil)
	seedFile, wrongFile := write("user.nk", []byte(seed+"\n")), write("wrong.nk", []byte(wrongSeed+"\n"))
	archive("nkey", nk.URLs(), "text", "--nats-nkey", seedFile)
	refused("nkey, wrong seed", nk.URLs(), []string{"refused walship's credentials", "--nats-nkey"}, "--nats-nkey", wrongFile)
	refused("nkey, not a seed", nk.URLs(), []string{"--nats-nkey", "not an nkey seed"}, "--nats-nkey", write("junk.nk", []byte("not a seed\n")))

	// creds: an operator, a system account, an account with JetStream,
	// and users it signs.
	op, sys, acct := mustNKey(t, nkeys.CreateOperator), mustNKey(t, nkeys.CreateAccount), mustNKey(t, nkeys.CreateAccount)
	_, opPub := seedAndPublic(t, op)
	_, sysPub := seedAndPublic(t, sys)
	_, acctPub := seedAndPublic(t, acct)
	oc := jwt.NewOperatorClaims(opPub)
	oc.Name = "walship-test"
	oc.SystemAccount = sysPub
	opJWT := encode(t, oc, op)
	sc := jwt.NewAccountClaims(sysPub)
	sc.Name = "SYS"
	ac := jwt.NewAccountClaims(acctPub)
	ac.Name = "walship"
	ac.Limits.JetStreamLimits = jwt.JetStreamLimits{DiskStorage: -1, MemoryStorage: -1, Streams: -1, Consumer: -1}
	creds := func(name string, edit func(*jwt.UserClaims)) (path, userPub string) {
		u := mustNKey(t, nkeys.CreateUser)
		useed, upub := seedAndPublic(t, u)
		uc := jwt.NewUserClaims(upub)
		uc.Name = name
		if edit != nil {
			edit(uc)
		}
		uj := encode(t, uc, acct)
		b, err := jwt.FormatUserConfig(uj, []byte(useed))
		if err != nil {
			t.Fatal(err)
		}
		secret(useed)
		secret(uj)
		return write(name+".creds", b), upub
	}
	good, _ := creds("walship", nil)
	expired, _ := creds("expired", func(uc *jwt.UserClaims) { uc.Expires = time.Now().Add(-time.Hour).Unix() })
	revoked, revokedPub := creds("revoked", nil)
	ac.Revoke(revokedPub)
	conf := "operator: " + strconv.Quote(opJWT) + "\nsystem_account: " + strconv.Quote(sysPub) + "\nresolver: MEMORY\nresolver_preload: {\n  " +
		sysPub + ": " + strconv.Quote(encode(t, sc, op)) + "\n  " + acctPub + ": " + strconv.Quote(encode(t, ac, op)) + "\n}\n"
	jw := testenv.StartNATSProcWith(t, conf, nil)
	archive("creds", jw.URLs(), "json", "--nats-creds", good)
	refused("creds, expired user", jw.URLs(), []string{"--nats-creds", "expired"}, "--nats-creds", expired)
	refused("creds, revoked user", jw.URLs(), []string{"refused walship's credentials", "--nats-creds"}, "--nats-creds", revoked)
	refused("creds, an nkey seed given as creds", jw.URLs(), []string{"--nats-creds"}, "--nats-creds", seedFile)

	for _, s := range secrets {
		for _, text := range seen {
			if i := strings.Index(text, s); i >= 0 {
				what, _, _ := strings.Cut(text, ":\n")
				t.Errorf("a seed or JWT (%.4s...) appears in %s", s, what)
			}
		}
	}
	if len(seen) != 7 {
		t.Errorf("%d outputs collected, want 7", len(seen))
	}
}

func mustNKey(t *testing.T, create func() (nkeys.KeyPair, error)) nkeys.KeyPair {
	t.Helper()
	kp, err := create()
	if err != nil {
		t.Fatal(err)
	}
	return kp
}

func seedAndPublic(t *testing.T, kp nkeys.KeyPair) (seed, pub string) {
	t.Helper()
	s, err := kp.Seed()
	if err != nil {
		t.Fatal(err)
	}
	p, err := kp.PublicKey()
	if err != nil {
		t.Fatal(err)
	}
	return string(s), p
}

func encode(t *testing.T, c jwt.Claims, kp nkeys.KeyPair) string {
	t.Helper()
	s, err := c.Encode(kp)
	if err != nil {
		t.Fatal(err)
	}
	return s
}
