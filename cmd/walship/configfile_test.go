package main

import (
	"errors"
	"flag"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

// writeConfig writes a configuration file and returns its path.
func writeConfig(t *testing.T, text string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "walship.yml")
	if err := os.WriteFile(p, []byte(text), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

func parseFile(t *testing.T, cmd string, text string, extra ...string) (*config, []serverConfig, string, error) {
	t.Helper()
	p := writeConfig(t, text)
	groups := receiveGroups
	if cmd == "run" {
		groups = runGroups
	}
	c, servers, err := parseServers(cmd, append([]string{"--config", p}, extra...), groups, io.Discard)
	return c, servers, p, err
}

// The sample in deploy/ parses, for both commands, with the values it says.
func TestConfigSample(t *testing.T) {
	t.Setenv("WALSHIP_S3_ENDPOINT", "http://127.0.0.1:7070")
	t.Setenv("ORDERS_PG_PASSWORD", "s3cret")
	for _, cmd := range []string{"receive", "run"} {
		t.Run(cmd, func(t *testing.T) {
			groups := receiveGroups
			if cmd == "run" {
				groups = runGroups
			}
			c, servers, err := parseServers(cmd, []string{"--config", "../../deploy/walship.yml"}, groups, io.Discard)
			if err != nil {
				t.Fatal(err)
			}
			if c.NATS != "nats://127.0.0.1:4222" || c.Dest != "s3://walship-backups/wal" || c.S3Endpoint != "http://127.0.0.1:7070" || c.MetricsAddr != "127.0.0.1:9752" {
				t.Errorf("process settings: nats %q dest %q s3-endpoint %q metrics %q", c.NATS, c.Dest, c.S3Endpoint, c.MetricsAddr)
			}
			if len(servers) != 3 {
				t.Fatalf("%d servers, want 3", len(servers))
			}
			want := []struct {
				name, slot string
				interval   time.Duration
				sync       bool
				line       int
			}{
				{"orders", "walship", 10 * time.Second, false, 27},
				{"billing", "walship", 10 * time.Second, true, 29},
				{"reports", "walship_reports", 30 * time.Second, false, 32},
			}
			for i, w := range want {
				s := servers[i]
				if s.Server != w.name || s.Slot != w.slot || s.StatusInterval != w.interval || s.Synchronous != w.sync || !s.CreateSlot || s.line != w.line {
					t.Errorf("server %d: %q slot %q interval %s sync %v create-slot %v line %d, want %+v", i, s.Server, s.Slot, s.StatusInterval, s.Synchronous, s.CreateSlot, s.line, w)
				}
				if s.NATS != c.NATS || s.DataDir != "/var/lib/walship" || s.RepublishAfter != 5*time.Minute {
					t.Errorf("server %s does not inherit the top level: nats %q data-dir %q republish-after %s", s.Server, s.NATS, s.DataDir, s.RepublishAfter)
				}
			}
			if !strings.Contains(servers[0].PG, ":s3cret@orders-db.internal") {
				t.Errorf("${ORDERS_PG_PASSWORD} not expanded in pg")
			}
			if servers[1].PG != "host=billing-db.internal user=walship sslmode=verify-full" {
				t.Errorf("billing pg %q", servers[1].PG)
			}
		})
	}
}

const threeServers = `
nats: nats://a:4222
status-interval: 5s
servers:
  - server: a
    pg: host=a
  - server: b
    pg: host=b
    status-interval: 7s
  - server: c
    pg: host=c
`

// Precedence: command line, then the server's entry, then the top level,
// then WALSHIP_<FLAG>, then the default.
func TestConfigPrecedence(t *testing.T) {
	t.Setenv("WALSHIP_STATUS_INTERVAL", "9s")     // the file says: not used
	t.Setenv("WALSHIP_REPUBLISH_AFTER", "3m")     // the file says nothing: used
	t.Setenv("WALSHIP_DATA_DIR", "/from/the/env") // likewise
	t.Setenv("WALSHIP_NATS", "nats://env:4222")   // the file says: not used
	c, servers, _, err := parseFile(t, "receive", threeServers)
	if err != nil {
		t.Fatal(err)
	}
	if c.NATS != "nats://a:4222" || c.DataDir != "/from/the/env" {
		t.Errorf("process: nats %q data-dir %q", c.NATS, c.DataDir)
	}
	got := []time.Duration{servers[0].StatusInterval, servers[1].StatusInterval, servers[2].StatusInterval}
	if got[0] != 5*time.Second || got[1] != 7*time.Second || got[2] != 5*time.Second {
		t.Errorf("status-interval %v, want [5s 7s 5s]", got)
	}
	for _, s := range servers {
		if s.RepublishAfter != 3*time.Minute || s.DataDir != "/from/the/env" {
			t.Errorf("server %s: republish-after %s data-dir %q: the environment fills what the file leaves", s.Server, s.RepublishAfter, s.DataDir)
		}
	}
	// A flag overrides the file everywhere, the server entries included.
	c, servers, _, err = parseFile(t, "receive", threeServers, "--status-interval", "2s", "--nats", "nats://cli:4222")
	if err != nil {
		t.Fatal(err)
	}
	if c.NATS != "nats://cli:4222" {
		t.Errorf("--nats did not override the file: %q", c.NATS)
	}
	for _, s := range servers {
		if s.StatusInterval != 2*time.Second || s.NATS != "nats://cli:4222" {
			t.Errorf("server %s: status-interval %s nats %q: the command line must win", s.Server, s.StatusInterval, s.NATS)
		}
	}
}

func TestConfigExpansion(t *testing.T) {
	t.Setenv("PGPW", "p@ss")
	_, servers, _, err := parseFile(t, "receive", "servers:\n  - server: a\n    pg: postgres://u:${PGPW}@h/db?x=$$1&y=$2\n")
	if err != nil {
		t.Fatal(err)
	}
	if want := "postgres://u:p@ss@h/db?x=$1&y=$2"; servers[0].PG != want {
		t.Errorf("pg %q, want %q", servers[0].PG, want)
	}
	for _, tc := range []struct{ in, want string }{
		{"${A}${B}", "ab"}, {"x$", "x$"}, {"$$", "$"}, {"$${A}", "${A}"}, {"pre-${A}-post", "pre-a-post"},
	} {
		got, err := expandEnv(tc.in, func(k string) (string, bool) { return strings.ToLower(k), true })
		if err != nil || got != tc.want {
			t.Errorf("expandEnv(%q) = %q, %v; want %q", tc.in, got, err, tc.want)
		}
	}
}

// Every mistake is one line naming the file and the line, and a usage
// error (exit status 2).
func TestConfigErrors(t *testing.T) {
	os.Unsetenv("WALSHIP_UNSET_FOR_TEST")
	for _, tc := range []struct {
		name, cmd, text string
		args            []string
		line            int
		want            string
	}{
		{"unknown top-level key", "receive", "nats: x\nslott: a\nservers:\n  - {server: a, pg: h}\n", nil, 2, `unknown key "slott"`},
		{"unknown key in a server", "receive", "servers:\n  - server: a\n    pg: h\n    spool: /x\n", nil, 4, `unknown key "spool"`},
		{"archiver key in receive", "receive", "compression: zstd\nservers:\n  - {server: a, pg: h}\n", nil, 1, `unknown key "compression"`},
		{"top-level key in a server", "receive", "servers:\n  - server: a\n    pg: h\n    nats: nats://x\n", nil, 4, "nats is a setting of the whole process"},
		{"metrics-addr in a server", "run", "servers:\n  - server: a\n    pg: h\n    metrics-addr: :1\n", nil, 4, "metrics-addr is a setting of the whole process"},
		{"server key at top level", "receive", "pg: host=x\nservers:\n  - {server: a, pg: h}\n", nil, 1, "pg names one server"},
		{"server name at top level", "receive", "servers:\n  - {server: a, pg: h}\nserver: b\n", nil, 3, "server names one server"},
		{"duplicate server", "receive", "servers:\n  - server: a\n    pg: h1\n  - server: b\n    pg: h2\n  - server: a\n    pg: h3\n", nil, 6, `server "a" is listed twice (first on line 2)`},
		{"nested spools", "receive", "servers:\n  - server: a\n    pg: h1\n    spool-dir: /s\n  - server: b\n    pg: h2\n    spool-dir: /s/a\n", nil, 7, `server "b" spools in /s/a/b, which overlaps server "a"'s /s/a (line 2)`},
		{"same pg and slot", "receive", "servers:\n  - server: a\n    pg: h1\n  - server: b\n    pg: h1\n", nil, 5, `same pg and slot as server "a"`},
		{"missing pg", "receive", "servers:\n  - server: a\n  - server: b\n    pg: h\n", nil, 2, "this server has no pg"},
		{"missing server", "receive", "servers:\n  - server: a\n    pg: h\n  - pg: h2\n", nil, 4, "this server has no server"},
		{"bad server name", "receive", "servers:\n  - server: a.b\n    pg: h\n", nil, 2, `server name "a.b"`},
		{"key given twice", "receive", "servers:\n  - server: a\n    pg: h\n    slot: x\n    slot: y\n", nil, 5, "slot is given twice (first on line 4)"},
		{"bad duration", "receive", "status-interval: soon\nservers:\n  - {server: a, pg: h}\n", nil, 1, "status-interval:"},
		{"bad bool in a server", "receive", "servers:\n  - server: a\n    pg: h\n    create-slot: yes please\n", nil, 4, "create-slot:"},
		{"validation names the key's line", "receive", "servers:\n  - server: a\n    pg: h\n    slot: Bad-Slot\n", nil, 4, `--slot "Bad-Slot"`},
		{"validation at top level", "receive", "log-format: xml\nservers:\n  - {server: a, pg: h}\n", nil, 1, `--log-format "xml"`},
		{"unset variable", "receive", "servers:\n  - server: a\n    pg: postgres://u:${WALSHIP_UNSET_FOR_TEST}@h/\n", nil, 3, "WALSHIP_UNSET_FOR_TEST is not set"},
		{"unclosed ${", "receive", "servers:\n  - server: a\n    pg: x${Y\n", nil, 3, "without its closing }"},
		{"null value", "receive", "nats:\nservers:\n  - {server: a, pg: h}\n", nil, 1, "nats has no value"},
		{"list for a single flag", "receive", "slot: [a, b]\nservers:\n  - {server: a, pg: h}\n", nil, 1, "slot takes one value, not a list"},
		{"mapping value", "receive", "servers:\n  - server: a\n    pg: {host: h}\n", nil, 3, "a value is expected"},
		{"no servers", "receive", "nats: x\n", nil, 1, "no servers"},
		{"servers not a list", "receive", "servers: a\n", nil, 1, "servers: must be a list"},
		{"entry not a mapping", "receive", "servers:\n  - a\n", nil, 2, "must be a mapping"},
		{"config in the file", "receive", "config: other.yml\nservers:\n  - {server: a, pg: h}\n", nil, 1, "cannot name another"},
		{"yaml syntax", "receive", "nats: x\nservers:\n  - server: a: b\n    pg: h\n", nil, 3, "mapping values are not allowed"},
		{"not a mapping", "receive", "- a\n- b\n", nil, 1, "must be a mapping of settings"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, _, path, err := parseFile(t, tc.cmd, tc.text, tc.args...)
			if err == nil {
				t.Fatal("no error")
			}
			if !errors.Is(err, errUsage) {
				t.Errorf("not a usage error: %v", err)
			}
			msg := trimUsage(err)
			prefix := path + ":" + strconv.Itoa(tc.line) + ": "
			if !strings.HasPrefix(msg, prefix) || !strings.Contains(msg, tc.want) || strings.Contains(msg, "\n") {
				t.Errorf("error %q\nwant one line starting %q containing %q", msg, prefix, tc.want)
			}
		})
	}
}

// What belongs to one server is never a flag beside --config, nor in the
// environment in its place.
func TestConfigServerFlagsRefused(t *testing.T) {
	for _, flag := range []string{"--pg", "--server"} {
		_, _, _, err := parseFile(t, "receive", threeServers, flag, "x")
		if err == nil || !errors.Is(err, errUsage) || !strings.Contains(err.Error(), flag+" cannot be given with --config") {
			t.Errorf("%s with --config: %v", flag, err)
		}
	}
	t.Setenv("WALSHIP_PG", "host=everywhere")
	_, servers, _, err := parseFile(t, "receive", threeServers)
	if err != nil {
		t.Fatal(err)
	}
	if servers[0].PG != "host=a" {
		t.Errorf("WALSHIP_PG replaced a server's pg: %q", servers[0].PG)
	}
}

// Every per-server key is a flag of both commands that take --config.
func TestConfigServerKeysAreFlags(t *testing.T) {
	for _, g := range []flagGroup{receiveGroups, runGroups} {
		fs := newFlagSet("x", &config{}, g)
		for k := range serverKeys {
			if fs.Lookup(k) == nil {
				t.Errorf("server key %q is not a flag (groups %b)", k, g)
			}
		}
	}
}

// Without --config nothing changes; -h lists --config; WALSHIP_CONFIG works.
func TestConfigFlag(t *testing.T) {
	c, servers, err := parseServers("receive", []string{"--pg", "host=x", "--server", "one"}, receiveGroups, io.Discard)
	if err != nil || servers != nil || c.PG != "host=x" || c.Server != "one" {
		t.Errorf("without --config: %v %v %+v", err, servers, c)
	}
	var out strings.Builder
	if _, _, err := parseServers("run", []string{"-h"}, runGroups, &out); !errors.Is(err, flag.ErrHelp) || !strings.Contains(out.String(), "-config") {
		t.Errorf("-h: %v\n%s", err, out.String())
	}
	t.Setenv("WALSHIP_CONFIG", writeConfig(t, threeServers))
	_, servers, err = parseServers("receive", nil, receiveGroups, io.Discard)
	if err != nil || len(servers) != 3 {
		t.Errorf("WALSHIP_CONFIG: %v, %d servers", err, len(servers))
	}
}

func TestConfigMissingFile(t *testing.T) {
	_, _, err := parseServers("receive", []string{"--config", "/nonexistent/walship.yml"}, receiveGroups, io.Discard)
	if err == nil || !errors.Is(err, errUsage) || !strings.Contains(err.Error(), "--config") {
		t.Errorf("missing file: %v", err)
	}
}

// The README's sample parses too.
func TestConfigREADMESample(t *testing.T) {
	b, err := os.ReadFile("../../README.md")
	if err != nil {
		t.Fatal(err)
	}
	s := string(b)
	i := strings.Index(s, "### Many servers in one process")
	if i < 0 {
		t.Fatal("README has no 'Many servers in one process' section")
	}
	s = s[i:]
	start := strings.Index(s, "```yaml\n")
	end := strings.Index(s[start+8:], "```")
	if start < 0 || end < 0 {
		t.Fatal("no yaml block in the section")
	}
	t.Setenv("WALSHIP_S3_ENDPOINT", "http://s3")
	t.Setenv("ORDERS_PG_PASSWORD", "pw")
	_, servers, _, err := parseFile(t, "receive", s[start+8:start+8+end])
	if err != nil || len(servers) != 3 {
		t.Fatalf("README sample: %v, %d servers", err, len(servers))
	}
}
