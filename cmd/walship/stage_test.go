package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/walship/walship/internal/testenv"
	"github.com/walship/walship/pipeline/stagehttp"
)

type oneFile struct{ data []byte }

func (h oneFile) OpenHeld(name, sum string) (io.ReadCloser, int64, error) {
	if name != "000000010000000000000001" {
		return nil, 0, fmt.Errorf("%s: %w", name, os.ErrNotExist)
	}
	return io.NopCloser(bytes.NewReader(h.data)), int64(len(h.data)), nil
}

// The stage flags wire a TLS server and a client trusting --stage-ca: a
// fetch over HTTPS returns the bytes; a client without the CA cannot
// connect (transient, never "not found").
func TestStageFlagsTLS(t *testing.T) {
	ca := testenv.NewCA(t, "stage-ca")
	cert, key := ca.Issue("localhost", []string{"127.0.0.1", "localhost"}, false)
	secret := filepath.Join(t.TempDir(), "secret")
	os.WriteFile(secret, []byte("tls-stage-secret-0123456789\n"), 0o600)
	c := &config{}
	c.Stage = stageFlags{Mode: "http", Listen: "127.0.0.1:0", SecretFile: secret, TLSCert: cert, TLSKey: key, CA: ca.CAPath,
		Timeout: 5e9, GiveUp: 60e9}
	if err := c.Stage.validate(gReceive | gArchive); err != nil {
		t.Fatal(err)
	}
	plan, run, err := startStage(c, true, slog.New(slog.DiscardHandler), prometheus.NewRegistry())
	if err != nil {
		t.Fatal(err)
	}
	if plan.objects || !strings.HasPrefix(plan.url, "https://127.0.0.1:") {
		t.Fatalf("plan %+v", plan)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error)
	go func() { done <- run(ctx) }()
	defer func() { cancel(); <-done }()
	data := bytes.Repeat([]byte{7}, 100000)
	defer plan.srv.Hold("pg1", oneFile{data})()

	u := stagehttp.URL(plan.url, "pg1", "000000010000000000000001")
	f, err := stageFetcher(c, 2)
	if err != nil || f == nil {
		t.Fatalf("fetcher: %v", err)
	}
	got, err := f.Fetch(ctx, u, "", int64(len(data)), nil)
	if err != nil || !bytes.Equal(got, data) {
		t.Fatalf("fetch over TLS: %d bytes, %v", len(got), err)
	}
	c.Stage.CA = ""
	untrusting, _ := stageFetcher(c, 2)
	if _, err := untrusting.Fetch(ctx, u, "", int64(len(data)), nil); !errors.Is(err, stagehttp.ErrUnreachable) || errors.Is(err, os.ErrNotExist) {
		t.Fatalf("fetch without the CA: %v, want a transient failure", err)
	}
}

// Without a secret anywhere, archivers have no fetcher; receivers with
// --stage nats have no stage server.
func TestStageOff(t *testing.T) {
	t.Setenv(stageSecretEnv, "")
	c := &config{}
	c.Stage.Mode = "nats"
	if f, err := stageFetcher(c, 1); f != nil || err != nil {
		t.Fatalf("fetcher %v, %v", f, err)
	}
	plan, run, err := startStage(c, true, slog.New(slog.DiscardHandler), prometheus.NewRegistry())
	if err != nil || run != nil || !plan.objects || plan.srv != nil || plan.hold() != nil {
		t.Fatalf("plan %+v, run %v, err %v", plan, run != nil, err)
	}
}
