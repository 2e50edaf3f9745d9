package s3

import (
	"context"
	"encoding/pem"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/walship/walship/sinks"
)

// recordingTLSServer is an HTTPS endpoint that answers every request with
// 200 and records the headers of each PUT; it writes its certificate to a
// PEM file for the CA bundle.
func recordingTLSServer(t *testing.T) (url, caFile string, puts func() []http.Header) {
	t.Helper()
	var mu sync.Mutex
	var got []http.Header
	srv := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.Copy(io.Discard, r.Body)
		if r.Method == http.MethodPut {
			mu.Lock()
			got = append(got, r.Header.Clone())
			mu.Unlock()
		}
		w.Header().Set("ETag", `"x"`)
		w.WriteHeader(http.StatusOK)
	}))
	t.Cleanup(srv.Close)
	caFile = filepath.Join(t.TempDir(), "ca.pem")
	if err := os.WriteFile(caFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: srv.Certificate().Raw}), 0o644); err != nil {
		t.Fatal(err)
	}
	return srv.URL, caFile, func() []http.Header {
		mu.Lock()
		defer mu.Unlock()
		return append([]http.Header(nil), got...)
	}
}

func staticAWSEnv(t *testing.T) {
	t.Setenv("AWS_ACCESS_KEY_ID", "AKIDTEST")
	t.Setenv("AWS_SECRET_ACCESS_KEY", "secret-test")
	t.Setenv("AWS_REGION", "us-east-1")
	t.Setenv("AWS_EC2_METADATA_DISABLED", "true")
	t.Setenv("AWS_CONFIG_FILE", filepath.Join(t.TempDir(), "none"))
	t.Setenv("AWS_SHARED_CREDENTIALS_FILE", filepath.Join(t.TempDir(), "none"))
	t.Setenv("AWS_CA_BUNDLE", "")
}

// TestPutHeaders: server-side encryption and the storage class reach the
// server on every PUT, over HTTPS trusted through the CA bundle.
func TestPutHeaders(t *testing.T) {
	staticAWSEnv(t)
	for _, tc := range []struct {
		o    Options
		want map[string]string
	}{
		{Options{SSE: "AES256", StorageClass: "STANDARD_IA"},
			map[string]string{"X-Amz-Server-Side-Encryption": "AES256", "X-Amz-Storage-Class": "STANDARD_IA", "X-Amz-Server-Side-Encryption-Aws-Kms-Key-Id": ""}},
		{Options{SSE: "aws:kms", SSEKMSKeyID: "arn:aws:kms:us-east-1:1:key/k1"},
			map[string]string{"X-Amz-Server-Side-Encryption": "aws:kms", "X-Amz-Server-Side-Encryption-Aws-Kms-Key-Id": "arn:aws:kms:us-east-1:1:key/k1", "X-Amz-Storage-Class": ""}},
		{Options{}, map[string]string{"X-Amz-Server-Side-Encryption": "", "X-Amz-Storage-Class": ""}},
	} {
		url, ca, puts := recordingTLSServer(t)
		o := tc.o
		o.Bucket, o.Endpoint, o.PathStyle, o.CABundle = "b", url, true, ca
		s, err := New(context.Background(), o)
		if err != nil {
			t.Fatal(err)
		}
		for _, key := range []string{"k1", "k2"} {
			if err := s.Put(context.Background(), key, []byte("body"), sinks.Metadata{SHA256: "aa"}); err != nil {
				t.Fatalf("%+v: put: %v", tc.o, err)
			}
		}
		got := puts()
		if len(got) != 2 {
			t.Fatalf("%+v: %d PUTs recorded, want 2", tc.o, len(got))
		}
		for _, h := range got {
			for k, v := range tc.want {
				if h.Get(k) != v {
					t.Errorf("%+v: PUT header %s = %q, want %q", tc.o, k, h.Get(k), v)
				}
			}
		}
	}
}

// TestCABundle: an HTTPS endpoint signed by a private CA is refused
// without the bundle (ErrTLS, not retryable) and trusted with
// --s3-ca-bundle or AWS_CA_BUNDLE.
func TestCABundle(t *testing.T) {
	staticAWSEnv(t)
	url, ca, _ := recordingTLSServer(t)
	put := func(o Options) error {
		o.Bucket, o.Endpoint, o.PathStyle = "b", url, true
		s, err := New(context.Background(), o)
		if err != nil {
			return err
		}
		return s.Put(context.Background(), "k", []byte("x"), sinks.Metadata{})
	}
	err := put(Options{})
	if !errors.Is(err, ErrTLS) || Unavailable(err) || !strings.Contains(err.Error(), "AWS_CA_BUNDLE") {
		t.Fatalf("without a bundle: %v (ErrTLS %v, unavailable %v)", err, errors.Is(err, ErrTLS), Unavailable(err))
	}
	if err := put(Options{CABundle: ca}); err != nil {
		t.Fatalf("with --s3-ca-bundle: %v", err)
	}
	t.Setenv("AWS_CA_BUNDLE", ca)
	if err := put(Options{}); err != nil {
		t.Fatalf("with AWS_CA_BUNDLE: %v", err)
	}
	if _, err := New(context.Background(), Options{Bucket: "b", CABundle: filepath.Join(t.TempDir(), "missing.pem")}); err == nil {
		t.Fatal("a missing CA bundle file was accepted")
	}
}

func TestPutOptionsValidate(t *testing.T) {
	for _, o := range []Options{
		{SSE: "aes256"},
		{SSEKMSKeyID: "k"},
		{SSE: "AES256", SSEKMSKeyID: "k"},
		{StorageClass: "COLD"},
	} {
		if _, err := o.putOptions(); err == nil {
			t.Errorf("%+v accepted", o)
		}
	}
	for _, o := range []Options{{}, {SSE: "AES256"}, {SSE: "aws:kms"}, {SSE: "aws:kms", SSEKMSKeyID: "k"}, {StorageClass: "GLACIER_IR"}} {
		if _, err := o.putOptions(); err != nil {
			t.Errorf("%+v: %v", o, err)
		}
	}
}
