package main

import (
	"errors"
	"strings"
	"testing"
	"time"
)

// --stage-url's scheme must be the listener's: http:// with a TLS
// certificate, or https:// without one, is a usage error.
func TestStageURLSchemeMatchesListener(t *testing.T) {
	t.Setenv(stageSecretEnv, "a-long-enough-stage-secret-0123456789")
	for _, tc := range []struct {
		url, cert string
		ok        bool
	}{
		{"http://r:9753", "", true},
		{"https://r:9753", "/c.pem", true},
		{"http://r:9753", "/c.pem", false},
		{"https://r:9753", "", false},
		{"", "/c.pem", true},
	} {
		s := stageFlags{Mode: "http", Listen: "127.0.0.1:0", URL: tc.url, TLSCert: tc.cert}
		if tc.cert != "" {
			s.TLSKey = "/k.pem"
		}
		err := s.validate(gReceive)
		if (err == nil) != tc.ok || (err != nil && !errors.Is(err, errUsage)) {
			t.Errorf("--stage-url %q with cert %q: %v, want ok=%v", tc.url, tc.cert, err, tc.ok)
		}
	}
}

// WALSHIP_STAGE_SECRET holds one secret: a space, tab or line break inside
// is a usage error that does not show it.
func TestStageEnvSecretPrintable(t *testing.T) {
	for _, v := range []string{"abcdefgh ijklmnopqrstuv", "abcdefghijkl\nmnopqrstuvwx", "abcdefgh\tijklmnopqrstuv"} {
		t.Setenv(stageSecretEnv, v)
		s := stageFlags{Mode: "http", Listen: "127.0.0.1:0", Timeout: time.Minute, GiveUp: time.Minute}
		err := s.validate(gReceive | gArchive | gNATS)
		if err == nil || !errors.Is(err, errUsage) || strings.Contains(err.Error(), "abcdefgh") {
			t.Errorf("%q: %v, want a usage error without the secret", v, err)
		}
	}
}
