package s3

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/walship/walship/internal/testenv"
	"github.com/walship/walship/sinks"
)

// Unavailable tells an outage (wait and retry) from a misconfiguration
// (exit at start-up), on the errors the SDK really returns.
func TestUnavailable(t *testing.T) {
	t.Setenv("AWS_ACCESS_KEY_ID", "k")
	t.Setenv("AWS_SECRET_ACCESS_KEY", "s")
	t.Setenv("AWS_REGION", "us-east-1")
	t.Setenv("AWS_EC2_METADATA_DISABLED", "true")
	// A stub S3 answering HeadBucket and PutObject with the status and
	// error code the test names in the bucket: /<status>-<code>.
	stub := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		var status int
		var code string
		fmt.Sscanf(r.URL.Path, "/%d-%s", &status, &code)
		code, _, _ = strings.Cut(code, "/")
		w.Header().Set("Content-Type", "application/xml")
		w.WriteHeader(status)
		if r.Method != http.MethodHead {
			fmt.Fprintf(w, "<Error><Code>%s</Code><Message>stub</Message></Error>", code)
		}
	}))
	defer stub.Close()
	refused := "http://127.0.0.1:" + strconv.Itoa(testenv.FreePort(t))

	cases := []struct {
		name        string
		endpoint    string
		bucket      string
		put         bool // PutObject instead of HeadBucket
		unavailable bool
	}{
		{"connection refused", refused, "wal", false, true},
		{"connection refused on put", refused, "wal", true, true},
		{"never answers", testenv.BlackHole(t), "wal", false, true},
		{"name does not resolve", "http://walship-no-such-host.invalid:9000", "wal", false, true},
		{"500", stub.URL, "500-InternalError", false, true},
		{"502 from a proxy", stub.URL, "502-BadGateway", false, true},
		{"503 slow down on put", stub.URL, "503-SlowDown", true, true},
		{"429 (retried by the SDK until the deadline)", stub.URL, "429-TooManyRequests", true, true},
		{"no such bucket", stub.URL, "404-NoSuchBucket", false, false},
		{"no such bucket on put", stub.URL, "404-NoSuchBucket", true, false},
		{"access denied", stub.URL, "403-AccessDenied", false, false},
		{"access denied on put", stub.URL, "403-AccessDenied", true, false},
		{"wrong region", stub.URL, "301-PermanentRedirect", false, false},
		{"bad request", stub.URL, "400-InvalidRequest", true, false},
		{"not implemented", stub.URL, "501-NotImplemented", true, false},
		{"endpoint without a scheme", "127.0.0.1:9000", "wal", false, false},
		{"endpoint with a bad port", "http://127.0.0.1:99999", "wal", false, false},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			s, err := New(context.Background(), Options{Bucket: c.bucket, Endpoint: c.endpoint, PathStyle: true, Timeout: time.Second})
			if err != nil {
				t.Fatal(err)
			}
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			if c.put {
				err = s.Put(ctx, "k", []byte("x"), sinks.Metadata{})
			} else {
				err = s.CheckBucket(ctx)
			}
			if err == nil {
				t.Fatal("no error")
			}
			t.Log(err)
			if got := Unavailable(err); got != c.unavailable {
				t.Errorf("Unavailable(%v) = %v, want %v", err, got, c.unavailable)
			}
		})
	}
	if Unavailable(nil) {
		t.Error("Unavailable(nil)")
	}
	if Unavailable(fmt.Errorf("x: %w", ErrNoBucket)) {
		t.Error("a missing bucket taken for an outage")
	}
	if !Unavailable(fmt.Errorf("x: %w", context.DeadlineExceeded)) {
		t.Error("a deadline not taken for an outage")
	}
	if Unavailable(errors.New("failed to retrieve credentials")) {
		t.Error("an unknown error taken for an outage")
	}
}
