package e2e

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/walship/walship/internal/testenv"
)

// Passwords of the sample accounts' users in this test.
const (
	natsReceiverPW = "rcv-pw-7c1e"
	natsArchiverPW = "arc-pw-93ab"
	natsStatusPW   = "sts-pw-41d0"
)

// startSecureNATS runs nats-server with TLS from ca and the sample account
// configuration deploy/nats/accounts.conf, as shipped.
func startSecureNATS(t *testing.T, ca *testenv.CA) *testenv.NATSCluster {
	t.Helper()
	accounts, err := os.ReadFile(filepath.Join("..", "deploy", "nats", "accounts.conf"))
	if err != nil {
		t.Fatal(err)
	}
	cert, key := ca.Issue("nats-server", []string{"localhost", "127.0.0.1"}, false)
	t.Setenv("WALSHIP_RECEIVER_PASSWORD", natsReceiverPW)
	t.Setenv("WALSHIP_ARCHIVER_PASSWORD", natsArchiverPW)
	t.Setenv("WALSHIP_STATUS_PASSWORD", natsStatusPW)
	extra := "tls {\n  cert_file: " + strconv.Quote(cert) + "\n  key_file: " + strconv.Quote(key) + "\n  timeout: 5\n}\ninclude accounts.conf\n"
	return testenv.StartNATSProcWith(t, extra, map[string]string{"accounts.conf": string(accounts)})
}

// TestNATSSecurity: the pipeline runs over TLS against nats-server with the
// sample accounts, each process with its role's credentials (the receiver's
// password from WALSHIP_NATS_PASSWORD, the archiver's in the URL); wrong
// credentials and an untrusted CA are one clear line; the archiver's
// credentials cannot publish a segment event and status's cannot write.
func TestNATSSecurity(t *testing.T) {
	ca := testenv.NewCA(t, "walship test CA")
	nc := startSecureNATS(t, ca)
	port := strconv.Itoa(nc.Nodes[0].Port)
	natsURL := "tls://127.0.0.1:" + port
	st := &stack{t: t, pg: testenv.StartPostgres(t, testenv.PGOptions{}), s3: testenv.StartS3(t),
		dataDir: t.TempDir(), metrics: testenv.FreePort(t), prefix: "backups", server: "sec"}
	recvDest := []string{"--dest", "s3://" + st.s3.Bucket + "/" + st.prefix, "--s3-endpoint", st.s3.Endpoint()}
	dest := append(recvDest[:4:4], "--s3-path-style")

	recv := startWalship(t, append(st.env(), "WALSHIP_NATS_PASSWORD="+natsReceiverPW),
		append([]string{"receive", "--pg", st.pg.URL("postgres"), "--create-slot", "--server", st.server,
			"--nats", natsURL, "--nats-tls-ca", ca.CAPath, "--nats-user", "walship-receiver",
			"--data-dir", st.dataDir, "--metrics-addr", "127.0.0.1:" + strconv.Itoa(st.metrics), "--status-interval", "1s"}, recvDest...)...)
	arch := startWalship(t, st.env(),
		append([]string{"archive", "--nats", "tls://walship-archiver:" + natsArchiverPW + "@127.0.0.1:" + port, "--nats-tls-ca", ca.CAPath,
			"--workers", "1", "--data-dir", t.TempDir(), "--metrics-addr", ""}, dest...)...)

	waitFor(t, 30*time.Second, "the receiver streaming", func() bool {
		if recv.exited() || arch.exited() {
			t.Fatal("a walship process exited")
		}
		return st.pg.QueryString(`SELECT count(*) FROM pg_stat_replication WHERE application_name = 'walship'`) == "1"
	})
	st.pg.Exec(`CREATE TABLE nats_sec AS SELECT g FROM generate_series(1, 1000) g`)
	end := st.switchWAL()
	waitFor(t, 40*time.Second, "the segment archived and the slot moved past it", func() bool {
		return st.slotRestart() >= end
	})
	if n := len(st.archivedSegments()); n == 0 {
		t.Fatal("no segment in the bucket")
	}
	for _, p := range []*proc{recv, arch} {
		if p.exited() {
			t.Fatalf("a walship process exited: %v", p.err)
		}
	}

	// Each role had every permission it used: the server refused nothing.
	if log, _ := os.ReadFile(nc.Nodes[0].LogPath); strings.Contains(string(log), "Violation") {
		t.Fatalf("nats-server refused an operation of the pipeline:\n%s", log)
	}

	t.Run("status reads with the status role", func(t *testing.T) {
		var out string
		var err error
		waitFor(t, 20*time.Second, "status to show the server", func() bool {
			out, err = runWalship(t, []string{"WALSHIP_NATS_PASSWORD=" + natsStatusPW}, "status", "--nats", natsURL,
				"--nats-tls-ca", ca.CAPath, "--nats-user", "walship-status", "--json")
			if err != nil {
				t.Fatalf("walship status as walship-status: %v\n%s", err, out)
			}
			return strings.Contains(out, `"server": "`+st.server+`"`) && strings.Contains(out, `"last_archived"`)
		})
	})

	t.Run("wrong password", func(t *testing.T) {
		logLast(t, failsWith(t, append(st.env(), "WALSHIP_NATS_PASSWORD=not-the-password"),
			append([]string{"archive", "--nats", natsURL, "--nats-tls-ca", ca.CAPath, "--nats-user", "walship-archiver",
				"--data-dir", t.TempDir(), "--metrics-addr", ""}, dest...), "refused walship's credentials"))
		logLast(t, failsWith(t, nil, []string{"status", "--nats", "tls://walship-status:wrong@127.0.0.1:" + port,
			"--nats-tls-ca", ca.CAPath}, "refused walship's credentials"))
	})

	t.Run("untrusted CA", func(t *testing.T) {
		other := testenv.NewCA(t, "another CA")
		logLast(t, failsWith(t, append(st.env(), "WALSHIP_NATS_PASSWORD="+natsReceiverPW),
			append([]string{"receive", "--pg", st.pg.URL("postgres"), "--server", st.server, "--slot", "other",
				"--nats", natsURL, "--nats-tls-ca", other.CAPath, "--nats-user", "walship-receiver",
				"--data-dir", t.TempDir(), "--metrics-addr", ""}, recvDest...), "--nats-tls-ca", "authority"))
		logLast(t, failsWith(t, append(st.env(), "WALSHIP_NATS_PASSWORD="+natsArchiverPW),
			append([]string{"archive", "--nats", natsURL, "--nats-user", "walship-archiver",
				"--data-dir", t.TempDir(), "--metrics-addr", ""}, dest...), "--nats-tls-ca"))
	})

	t.Run("forbidden publishes", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		segs := func() uint64 {
			c := natsClient(t, natsURL, ca, "walship-status", natsStatusPW, nil)
			s, err := jetstream.New(c)
			if err != nil {
				t.Fatal(err)
			}
			str, err := s.Stream(ctx, "WALSHIP_SEGMENTS")
			if err != nil {
				t.Fatalf("stream info as status: %v", err)
			}
			return str.CachedInfo().State.LastSeq
		}
		before := segs()
		for _, tc := range []struct{ user, pw, subject string }{
			{"walship-archiver", natsArchiverPW, "walship." + st.server + ".segment"},
			{"walship-status", natsStatusPW, "walship." + st.server + ".segment"},
			{"walship-status", natsStatusPW, "$KV.WALSHIP_STATE." + st.server},
			{"walship-receiver", natsReceiverPW, "walship." + st.server + ".archived"},
		} {
			var mu sync.Mutex
			var async []error
			c := natsClient(t, natsURL, ca, tc.user, tc.pw, func(err error) { mu.Lock(); async = append(async, err); mu.Unlock() })
			js, err := jetstream.New(c)
			if err != nil {
				t.Fatal(err)
			}
			pctx, pcancel := context.WithTimeout(ctx, time.Second)
			_, err = js.Publish(pctx, tc.subject, []byte(`{"v":1}`))
			pcancel()
			if err == nil {
				t.Errorf("%s published to %s", tc.user, tc.subject)
			}
			waitFor(t, 5*time.Second, "the permissions violation reported to "+tc.user, func() bool {
				mu.Lock()
				defer mu.Unlock()
				for _, e := range async {
					if errors.Is(e, nats.ErrPermissionViolation) {
						return true
					}
				}
				return false
			})
			t.Logf("%s may not publish to %s: %v", tc.user, tc.subject, err)
		}
		if after := segs(); after != before {
			t.Errorf("WALSHIP_SEGMENTS went from sequence %d to %d: a forbidden event was stored", before, after)
		}
	})
	if err := arch.stop(t); err != nil {
		t.Errorf("walship archive: %v", err)
	}
	if err := recv.stop(t); err != nil {
		t.Errorf("walship receive: %v", err)
	}
}

// natsClient connects to the secured server as user; asyncErr gets the
// server's asynchronous errors (permission violations).
func natsClient(t *testing.T, url string, ca *testenv.CA, user, pw string, asyncErr func(error)) *nats.Conn {
	t.Helper()
	c, err := nats.Connect(url, nats.RootCAs(ca.CAPath), nats.UserInfo(user, pw), nats.Timeout(5*time.Second),
		nats.ErrorHandler(func(_ *nats.Conn, _ *nats.Subscription, err error) {
			if asyncErr != nil {
				asyncErr(err)
			}
		}))
	if err != nil {
		t.Fatalf("connect as %s: %v", user, err)
	}
	t.Cleanup(c.Close)
	return c
}
