package e2e

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"io"
	"net/http"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/walship/walship/internal/testenv"
)

// authNATS starts an embedded JetStream server that requires a user and
// password, and returns its port.
func authNATS(t *testing.T, user, password string) int {
	t.Helper()
	dir, err := os.MkdirTemp("", "walship-nats-auth-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	port := testenv.FreePort(t)
	srv, err := server.NewServer(&server.Options{Host: "127.0.0.1", Port: port, JetStream: true, StoreDir: dir,
		Username: user, Password: password, NoSigs: true, NoLog: true, MaxPayload: 8 << 20})
	if err != nil {
		t.Fatal(err)
	}
	go srv.Start()
	if !srv.ReadyForConnections(20 * time.Second) {
		t.Fatal("nats server did not start")
	}
	t.Cleanup(func() { srv.Shutdown(); srv.WaitForShutdown() })
	return port
}

// httpGet returns a URL's status and body ("" when it cannot be reached).
func httpGet(url string) (int, string) {
	resp, err := http.Get(url)
	if err != nil {
		return 0, ""
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

// kvRecords reads every record of walship's key-value buckets.
func kvRecords(t *testing.T, url string) string {
	t.Helper()
	nc, err := nats.Connect(url)
	if err != nil {
		t.Fatalf("nats: %v", err)
	}
	defer nc.Close()
	js, _ := jetstream.New(nc)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	var b strings.Builder
	n := 0
	for _, bucket := range []string{"WALSHIP_STATE", "WALSHIP_PROCESSES"} {
		kv, err := js.KeyValue(ctx, bucket)
		if err != nil {
			t.Fatalf("kv %s: %v", bucket, err)
		}
		keys, err := kv.ListKeys(ctx)
		if err != nil {
			t.Fatalf("kv %s keys: %v", bucket, err)
		}
		for k := range keys.Keys() {
			if e, err := kv.Get(ctx, k); err == nil {
				fmt.Fprintf(&b, "%s/%s: %s\n", bucket, k, e.Value())
				n++
			}
		}
	}
	if n < 2 {
		t.Fatalf("only %d key-value records: the test would prove nothing\n%s", n, b.String())
	}
	return b.String()
}

// Issue 14, test 5: distinctive secrets for PostgreSQL (a scram
// password), S3 (the secret key), NATS (a password in the URL) and the age
// identity appear in no output: the logs of the pipeline at debug level in
// text and JSON, check, status, fetch, verify, every bad-credential
// failure, /metrics, /debug/pprof/cmdline and the key-value records.
func TestSecretsNeverShown(t *testing.T) {
	nonce := make([]byte, 6)
	rand.Read(nonce)
	n := hex.EncodeToString(nonce)
	pgSecret, pgWrong := "pgSECRET"+n, "pgWRONG"+n
	natsSecret, natsWrong := "natsSECRET"+n, "natsWRONG"+n
	s3Wrong := "s3WRONG" + n
	ageKey := mustIdentity(t)
	secrets := []string{pgSecret, pgWrong, natsSecret, natsWrong, testenv.S3SecretKey, s3Wrong, ageKey.String(), strings.TrimPrefix(ageKey.String(), "AGE-SECRET-KEY-1")}

	st := newStack(t)
	st.nats = nil
	st.pg.Exec(`CREATE ROLE pwuser LOGIN REPLICATION PASSWORD '` + pgSecret + `'`)
	natsPort := authNATS(t, "walship", natsSecret)
	natsURL := func(pw string) string { return fmt.Sprintf("nats://walship:%s@127.0.0.1:%d", pw, natsPort) }
	pgURL := func(pw string) string {
		return fmt.Sprintf("postgres://pwuser:%s@127.0.0.1:%d/postgres?sslmode=disable", pw, st.pg.Port)
	}
	keys := keyFiles(t, map[string]string{"recipients": ageKey.Recipient().String() + "\n", "identity": ageKey.String() + "\n",
		"wrong": mustIdentity(t).String() + "\n"})
	s3Env := func(secret string) []string {
		env := st.env()
		for i, e := range env {
			if strings.HasPrefix(e, "AWS_SECRET_ACCESS_KEY=") {
				env[i] = "AWS_SECRET_ACCESS_KEY=" + secret
			}
		}
		return env
	}

	var seen []string // "what: text" of everything collected
	collect := func(what, text string) { seen = append(seen, what+":\n"+text) }
	metricsURL := "http://127.0.0.1:" + strconv.Itoa(st.metrics)

	// The pipeline, with every secret on its command line or in its
	// environment, in both log formats at debug level.
	for i, format := range []string{"text", "json"} {
		debugURL := "http://127.0.0.1:" + strconv.Itoa(testenv.FreePort(t))
		args := st.args("run", "--create-slot", "--pg", pgURL(pgSecret), "--nats", natsURL(natsSecret), "--log-format", format,
			"--encrypt-recipients-file", keys["recipients"], "--debug-addr", strings.TrimPrefix(debugURL, "http://"))
		w := startWalship(t, st.env(), args...)
		waitFor(t, 30*time.Second, "streaming", func() bool { return st.walsenderPID() != "" })
		end := st.writeSegments(2)
		waitFor(t, 60*time.Second, "archiving", func() bool { return st.replFlush() >= end })
		for _, path := range []string{"/metrics", "/debug/pprof/cmdline", "/debug/pprof/", "/readyz"} {
			code, body := httpGet(metricsURL + path)
			collect(format+" "+path+" "+strconv.Itoa(code), body)
		}
		// The profiler on --debug-addr: it answers, and shows no secret.
		for _, path := range []string{"/debug/pprof/", "/debug/pprof/cmdline", "/debug/pprof/goroutine?debug=2"} {
			code, body := httpGet(debugURL + path)
			collect(format+" debug "+path+" "+strconv.Itoa(code), body)
			if path == "/debug/pprof/" && code != 200 {
				t.Fatalf("--debug-addr %s: %d", path, code)
			}
		}
		if code, body := httpGet(metricsURL + "/metrics"); code != 200 || !strings.Contains(body, "walship_") {
			t.Fatalf("/metrics: %d", code)
		}
		time.Sleep(1500 * time.Millisecond) // a state record written after the last segment
		collect("kv records", kvRecords(t, natsURL(natsSecret)))
		if i == 0 {
			out, err := runWalship(t, st.env(), "status", "--nats", natsURL(natsSecret), "--pg", pgURL(pgSecret))
			if err != nil || !strings.Contains(out, st.server) {
				t.Errorf("status: %v\n%s", err, out)
			}
			collect("status", out)
			out, _ = runWalship(t, st.env(), "status", "--json", "--nats", natsURL(natsSecret))
			collect("status --json", out)
		}
		if err := w.stop(t); err != nil {
			t.Errorf("walship %s: %v", format, err)
		}
		b, _ := os.ReadFile(w.logPath)
		if format == "json" && !strings.Contains(string(b), `"level":"DEBUG"`) || format == "text" && !strings.Contains(string(b), "level=DEBUG") {
			t.Errorf("no debug lines in the %s log", format)
		}
		collect("run log "+format, string(b))
	}

	// check: passes, and warns about the passwords on its command line.
	checkArgs := func(pg, nats string) []string {
		return []string{"check", "--pg", pg, "--nats", nats, "--dest", "s3://" + st.s3.Bucket + "/" + st.prefix, "--s3-endpoint", st.s3.Endpoint(),
			"--s3-path-style", "--server", st.server, "--data-dir", st.dataDir}
	}
	out, err := runWalship(t, st.env(), checkArgs(pgURL(pgSecret), natsURL(natsSecret))...)
	if err != nil || !strings.Contains(out, "WARN secrets") || !strings.Contains(out, "--pg carries a password") || !strings.Contains(out, "PGPASSWORD") {
		t.Errorf("check with passwords on the command line: %v, want a pass with a warning\n%s", err, out)
	}
	collect("check", out)
	out, _ = runWalship(t, append(st.env(), "PGPASSWORD="+pgSecret, "WALSHIP_NATS="+natsURL(natsSecret)),
		"check", "--pg", st.pg.URL("pwuser"), "--dest", "s3://"+st.s3.Bucket+"/"+st.prefix, "--s3-endpoint", st.s3.Endpoint(), "--s3-path-style", "--data-dir", st.dataDir)
	if strings.Contains(out, "WARN") || strings.Contains(out, "FAIL") {
		t.Errorf("check with secrets from the environment warns or fails:\n%s", out)
	}
	collect("check (PGPASSWORD, WALSHIP_NATS)", out)
	out, _ = runWalship(t, st.env(), append(checkArgs(pgURL(pgSecret), natsURL(natsSecret)), "--json")...)
	collect("check --json", out)

	// Restore reads with the identity file.
	flags := []string{"--dest", "s3://" + st.s3.Bucket + "/" + st.prefix, "--s3-endpoint", st.s3.Endpoint(), "--s3-path-style", "--server", st.server}
	out, err = runWalship(t, st.env(), append([]string{"verify", "--deep", "--decrypt-identity", keys["identity"]}, flags...)...)
	if err != nil {
		t.Errorf("verify --deep: %v\n%s", err, out)
	}
	collect("verify", out)

	// Every bad credential: a non-zero exit with one line saying why.
	common := []string{"--dest", "s3://" + st.s3.Bucket + "/" + st.prefix, "--s3-endpoint", st.s3.Endpoint(),
		"--data-dir", st.dataDir, "--metrics-addr", "", "--log-level", "debug"}
	recv := func(extra ...string) []string {
		return append(append([]string{"receive", "--server", st.server}, common...), extra...)
	}
	arch := func(extra ...string) []string {
		return append(append([]string{"archive", "--s3-path-style"}, common...), extra...)
	}
	var seg string
	for no := range st.archivedSegments() {
		seg = fmt.Sprintf("%08X%08X%08X", 1, 0, no)
		break
	}
	bad := []struct {
		name string
		env  []string
		args []string
		want string
	}{
		{"wrong postgres password", st.env(), st.args("run", "--pg", pgURL(pgWrong), "--nats", natsURL(natsSecret)), "password authentication failed"},
		{"wrong PGPASSWORD", append(st.env(), "PGPASSWORD="+pgWrong), recv("--pg", st.pg.URL("pwuser"), "--nats", natsURL(natsSecret)), "password authentication failed"},
		{"wrong nats password", st.env(), arch("--nats", natsURL(natsWrong)), "uthorization"},
		{"wrong S3 secret key", s3Env(s3Wrong), arch("--nats", natsURL(natsSecret)), "ccess"},
		{"status, wrong nats password", st.env(), []string{"status", "--nats", natsURL(natsWrong)}, "uthorization"},
		{"check, every secret wrong", s3Env(s3Wrong), checkArgs(pgURL(pgWrong), natsURL(natsWrong)), "FAIL"},
		{"fetch, wrong identity", st.env(), append([]string{"fetch", seg, "/tmp/walship-never-written", "--prefetch", "0",
			"--decrypt-identity", keys["wrong"]}, flags...), "none of the identities can decrypt"},
		{"fetch, identity file of recipients", st.env(), append([]string{"fetch", seg, "/tmp/walship-never-written", "--prefetch", "0",
			"--decrypt-identity", keys["recipients"]}, flags...), "--decrypt-identity"},
		{"run, private key as recipient", st.env(), st.args("run", "--pg", pgURL(pgSecret), "--nats", natsURL(natsSecret), "--encrypt-recipient", ageKey.String()), "private key"},
	}
	for _, c := range bad {
		out, err := runWalship(t, c.env, c.args...)
		if err == nil || !strings.Contains(out, c.want) {
			t.Errorf("%s: %v, want a failure saying %q:\n%s", c.name, err, c.want, tail(out, 3000))
		}
		collect(c.name, out)
	}

	for _, s := range secrets {
		for _, text := range seen {
			if i := strings.Index(text, s); i >= 0 {
				what, _, _ := strings.Cut(text, ":\n")
				lo, hi := max(0, i-200), min(len(text), i+len(s)+100)
				t.Errorf("a secret (%.6s...) appears in %s: ...%s...", s, what, text[lo:hi])
			}
		}
	}
	if os.Getenv("SECRETS_DUMP") != "" { // show what was searched
		for _, s := range seen {
			t.Log(tail(s, 700))
		}
	}
	if len(seen) < 20 {
		t.Errorf("only %d outputs collected", len(seen))
	}
}
