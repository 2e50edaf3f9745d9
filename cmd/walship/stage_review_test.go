package main

import (
	"bytes"
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/walship/walship/pipeline/stagehttp"
)

// Review (rev-stage): a stage secret that cannot travel in an HTTP header
// — here a secret file of two lines, which is what `openssl rand -base64
// 64 > stage.secret` writes (base64 wrapped at 64 columns) — was accepted
// at start, and every fetch then failed inside the HTTP client ("invalid
// header field value"), classified as "receiver unreachable", forever.
//
// Adapted to fix 2 (fix-stage): the secret no longer travels at all
// (requests carry an HMAC signature), and a file of several lines is a
// rotation list: archivers sign with the first line, the stage server
// accepts any. So the two-line file must now work end to end, with either
// line; a line with a space or control character inside is refused at
// start with a usage error that does not show the secret.
func TestReviewStageSecretThatCannotBeAHeader(t *testing.T) {
	dir := t.TempDir()
	secretFile := filepath.Join(dir, "stage.secret")
	// Two lines, as base64 of 64 random bytes is printed by openssl.
	line1 := "q1X0fM3bK9yZcT2vWnR8pL5sH7dJ4gA6eU0iO3kB1mN9xC2zV8tY5rE7wQ4uP6aS"
	line2 := "Df3Gh5Jk7Lz9Xc1Vb3Nm5Qw7Er9Ty1Ui3Op5As7Df9Gh1Jk3Lz5Xc7Vb9Nm1Qw=="
	os.WriteFile(secretFile, []byte(line1+"\n"+line2+"\n"), 0o600)
	t.Setenv(stageSecretEnv, "")

	for _, bad := range []string{"q1X0fM3b K9yZcT2vWnR8pL5sH7dJ4gA6\n", "q1X0fM3b\x01K9yZcT2vWnR8pL5sH7dJ4gA6\n", line1 + "\nDf3Gh5Jk\tLz9Xc1Vb3Nm5Qw7Er9Ty1\n"} {
		badFile := filepath.Join(dir, "bad.secret")
		os.WriteFile(badFile, []byte(bad), 0o600)
		b := stageFlags{Mode: "http", Listen: "127.0.0.1:0", SecretFile: badFile, Timeout: 5 * time.Second, GiveUp: time.Minute}
		verr := b.validate(gReceive | gArchive)
		if verr == nil || !errors.Is(verr, errUsage) {
			t.Errorf("a secret line with a space or control character inside: %v, want a usage error", verr)
		} else if strings.Contains(verr.Error(), "q1X0fM3b") || strings.Contains(verr.Error(), "Df3Gh5Jk") || strings.Contains(verr.Error(), "\n") {
			t.Errorf("the usage error shows the secret or is not one line: %v", verr)
		}
	}

	c := &config{}
	c.Stage = stageFlags{Mode: "http", Listen: "127.0.0.1:0", SecretFile: secretFile, Timeout: 5 * time.Second, GiveUp: time.Minute}
	if err := c.Stage.validate(gReceive | gArchive); err != nil {
		t.Fatalf("a rotation file of two secrets: %v", err)
	}
	plan, run, err := startStage(c, true, slog.New(slog.DiscardHandler), prometheus.NewRegistry())
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- run(ctx) }()
	defer func() { cancel(); <-done }()
	data := bytes.Repeat([]byte{5}, 4096)
	defer plan.srv.Hold("pg1", oneFile{data})()
	u := stagehttp.URL(plan.url, "pg1", "000000010000000000000001")
	// Archivers with the whole file (sign with line 1), and archivers
	// still on line 2 only (the previous secret, during a rotation).
	for _, content := range []string{line1 + "\n" + line2 + "\n", line2 + "\n"} {
		af := filepath.Join(dir, "archiver.secret")
		os.WriteFile(af, []byte(content), 0o600)
		ac := &config{}
		ac.Stage = stageFlags{SecretFile: af, Timeout: 5 * time.Second, GiveUp: time.Minute}
		f, err := stageFetcher(ac, 1)
		if err != nil || f == nil {
			t.Fatalf("fetcher: %v", err)
		}
		got, ferr := f.Fetch(ctx, u, "", int64(len(data)), nil)
		if ferr != nil || !bytes.Equal(got, data) {
			if ferr != nil && (strings.Contains(ferr.Error(), "q1X0fM3b") || strings.Contains(ferr.Error(), "Df3Gh5Jk")) {
				t.Fatalf("the fetch error shows the secret: %v", ferr)
			}
			t.Errorf("archiver secret file of %d line(s): fetch %d bytes, %v; want the served bytes", strings.Count(content, "\n"), len(got), ferr)
		}
	}
}

// Review (rev-stage): `walship run` with its embedded NATS has only
// in-process archivers, which read the spool (README: "`walship run` with
// its embedded NATS needs neither"), and its embedded NATS listens on
// loopback. Yet a stage secret in the environment (--stage auto → http)
// makes it open the stage listener — by default on every interface,
// :9753 — serving WAL to the network, and a second `walship run` on the
// same host (README "Several processes on one host") then fails to start
// with "--stage-listen: address already in use".
func TestReviewStageRunWithEmbeddedNATSListens(t *testing.T) {
	t.Setenv(stageSecretEnv, "an-environment-secret-0123456789")
	c := &config{}
	c.Stage = stageFlags{Mode: "auto", Listen: "127.0.0.1:0", Timeout: time.Minute, GiveUp: 10 * time.Minute}
	if err := c.Stage.validate(gReceive | gArchive | gNATS); err != nil {
		t.Fatal(err)
	}
	// remote=false: what cmdRun passes when it starts the embedded NATS.
	plan, run, err := startStage(c, false, slog.New(slog.DiscardHandler), prometheus.NewRegistry())
	if err != nil {
		t.Fatal(err)
	}
	if run != nil {
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan error, 1)
		go func() { done <- run(ctx) }()
		defer func() { cancel(); <-done }()
	}
	if run != nil || plan.srv != nil || plan.url != "" {
		t.Errorf("walship run with the embedded NATS (no remote archivers possible) serves its spool over HTTP at %s: want no stage listener", plan.url)
	}
}

// Review (rev-stage): an unauthenticated client is answered 401 but its
// connection is kept open (keep-alive, up to the 2 min IdleTimeout), and
// the stage server has no limit on connections. Anyone who reaches the
// port (it listens on every interface by default) can hold as many of the
// receiver process's file descriptors as they like, 2 min per request,
// without knowing the secret; when the process runs out, the receiver
// cannot create its next spool segment. A 401 should close the connection
// (and the listener should cap connections).
func TestReviewStageUnauthenticatedConnectionsStayOpen(t *testing.T) {
	secretFile := filepath.Join(t.TempDir(), "stage.secret")
	os.WriteFile(secretFile, []byte("a-long-enough-stage-secret-0123456789\n"), 0o600)
	t.Setenv(stageSecretEnv, "")
	c := &config{}
	c.Stage = stageFlags{Mode: "http", Listen: "127.0.0.1:0", SecretFile: secretFile}
	if err := c.Stage.validate(gReceive); err != nil {
		t.Fatal(err)
	}
	plan, run, err := startStage(c, true, slog.New(slog.DiscardHandler), prometheus.NewRegistry())
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- run(ctx) }()
	defer func() { cancel(); <-done }()
	addr := strings.TrimPrefix(plan.url, "http://")

	const n = 20
	open := 0
	for i := 0; i < n; i++ {
		conn, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		io.WriteString(conn, "GET /wal/pg1/000000010000000000000001 HTTP/1.1\r\nHost: x\r\n\r\n")
		// Read the 401 response, then see whether the server closes.
		conn.SetReadDeadline(time.Now().Add(5 * time.Second))
		buf := make([]byte, 4096)
		got := 0
		for !bytes.Contains(buf[:got], []byte("unauthorized\n")) {
			k, err := conn.Read(buf[got:])
			got += k
			if err != nil {
				t.Fatalf("reading the 401: %v (%q)", err, buf[:got])
			}
		}
		if !bytes.HasPrefix(buf, []byte("HTTP/1.1 401")) {
			t.Fatalf("answer %q", buf[:got])
		}
		conn.SetReadDeadline(time.Now().Add(150 * time.Millisecond))
		if _, err := conn.Read(buf); err != nil && errors.Is(err, os.ErrDeadlineExceeded) {
			open++ // still open: the server keeps the unauthenticated connection
		}
	}
	if open > 0 {
		t.Errorf("%d of %d unauthenticated connections stay open after their 401 (each holds a file descriptor of the receiver's process for up to 2 min, no cap)", open, n)
	}
}

// Review (rev-stage): a receiver serving HTTPS (--stage-tls-cert/-key)
// with --stage-url http://... is accepted; every event then tells the
// archivers to send the bearer secret in clear text across the network
// that TLS was configured to protect (the receiver's TLS listener answers
// 400 only after the request, header included, went out), and no fetch
// ever succeeds (400 is "unreachable": handed back, then given up,
// terminated, published again, forever). The scheme of --stage-url must
// match the listener.
func TestReviewStageURLSchemeMismatchesTLS(t *testing.T) {
	t.Setenv(stageSecretEnv, "a-long-enough-stage-secret-0123456789")
	c := &config{}
	c.Stage = stageFlags{Mode: "http", Listen: "127.0.0.1:0", URL: "http://receiver.example:9753", TLSCert: "/etc/walship/stage.crt", TLSKey: "/etc/walship/stage.key"}
	if err := c.Stage.validate(gReceive); err == nil {
		t.Errorf("--stage-url http://... with --stage-tls-cert is accepted: archivers would send the secret in clear text; want a usage error")
	}
}
