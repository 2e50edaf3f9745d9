package e2e

import (
	"fmt"
	"io/fs"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/walship/walship/internal/testenv"
)

// TestPostgresTLS: walship connects to PostgreSQL with ssl = on the way
// libpq does: verify-full against a private CA streams WAL into the archive
// over TLS; a client certificate (pg_hba "cert", given through PGSSL*
// variables) authenticates; a wrong CA and a wrong host name are one clear
// line and a non-zero exit.
func TestPostgresTLS(t *testing.T) {
	pg := testenv.StartPostgres(t, testenv.PGOptions{})
	ca := testenv.NewCA(t, "walship test CA")
	pg.EnableTLS(ca, []string{"localhost"},
		"hostssl all certuser 127.0.0.1/32 cert",
		"hostssl replication certuser 127.0.0.1/32 cert",
		"host all certuser 127.0.0.1/32 reject",
		"host replication certuser 127.0.0.1/32 reject")
	pg.Exec(`CREATE ROLE certuser LOGIN REPLICATION`)
	conn := func(user, extra string) string {
		return fmt.Sprintf("host=localhost port=%d user=%s dbname=postgres %s", pg.Port, user, extra)
	}

	t.Run("verify-full streams", func(t *testing.T) {
		dir := t.TempDir()
		p := startWalship(t, nil, "run", "--pg", conn("postgres", "sslmode=verify-full sslrootcert="+ca.CAPath),
			"--create-slot", "--server", "tls", "--data-dir", dir, "--metrics-addr", "",
			"--embedded-nats-listen", "127.0.0.1:"+strconv.Itoa(testenv.FreePort(t)), "--status-interval", "1s")
		waitFor(t, 30*time.Second, "the receiver's replication connection", func() bool {
			return pg.QueryString(`SELECT count(*) FROM pg_stat_replication WHERE application_name = 'walship'`) == "1"
		})
		if ssl := pg.QueryString(`SELECT s.ssl::text FROM pg_stat_replication r JOIN pg_stat_ssl s USING (pid) WHERE r.application_name = 'walship'`); ssl != "true" {
			t.Fatalf("the replication connection is not TLS: pg_stat_ssl.ssl = %q", ssl)
		}
		pg.Exec(`CREATE TABLE tls_marker AS SELECT g, md5(g::text) FROM generate_series(1, 1000) g`)
		seg := strings.ToUpper(pg.QueryString(`SELECT pg_walfile_name(pg_current_wal_lsn())`))
		pg.Exec(`SELECT pg_switch_wal()`)
		var found string
		waitFor(t, 30*time.Second, "segment "+seg+" in the archive", func() bool {
			found = findFile(filepath.Join(dir, "archive"), seg)
			return found != ""
		})
		if _, err := decompressFile(found); err != nil {
			t.Fatalf("archived %s: %v", found, err)
		}
		if err := p.stop(t); err != nil {
			t.Fatalf("walship run: %v", err)
		}
	})

	t.Run("client certificate from PGSSL variables", func(t *testing.T) {
		cert, key := ca.Issue("certuser", nil, true)
		env := []string{"PGSSLMODE=verify-full", "PGSSLROOTCERT=" + ca.CAPath, "PGSSLCERT=" + cert, "PGSSLKEY=" + key}
		out, err := runWalship(t, env, "check", "--pg", conn("certuser", ""), "--data-dir", t.TempDir(), "--create-slot")
		if err != nil {
			t.Fatalf("walship check with a client certificate: %v\n%s", err, out)
		}
		if !strings.Contains(out, "connected as certuser with REPLICATION") {
			t.Fatalf("check output:\n%s", out)
		}
		// Without the certificate the same user is refused, with a line
		// that says what to give.
		logLast(t, failsWith(t, []string{"PGSSLMODE=verify-full", "PGSSLROOTCERT=" + ca.CAPath},
			[]string{"slot", "create", "--pg", conn("certuser", ""), "--slot", "nocert"}, "sslcert"))
	})

	t.Run("wrong CA", func(t *testing.T) {
		other := testenv.NewCA(t, "some other CA")
		logLast(t, failsWith(t, nil, []string{"run", "--pg", conn("postgres", "sslmode=verify-full sslrootcert="+other.CAPath),
			"--create-slot", "--data-dir", t.TempDir(), "--metrics-addr", "",
			"--embedded-nats-listen", "127.0.0.1:" + strconv.Itoa(testenv.FreePort(t))}, "sslrootcert", "authority"))
		logLast(t, failsWith(t, nil, []string{"slot", "create", "--pg", conn("postgres", "sslmode=verify-ca sslrootcert="+other.CAPath), "--slot", "wrongca"},
			"sslrootcert", "authority"))
	})

	t.Run("wrong host name", func(t *testing.T) {
		logLast(t, failsWith(t, nil, []string{"slot", "create", "--pg",
			fmt.Sprintf("host=127.0.0.1 port=%d user=postgres dbname=postgres sslmode=verify-full sslrootcert=%s", pg.Port, ca.CAPath),
			"--slot", "wronghost"}, "not valid for host", "127.0.0.1"))
	})

	t.Run("missing CA file", func(t *testing.T) {
		logLast(t, failsWith(t, nil, []string{"slot", "create", "--pg", conn("postgres", "sslmode=verify-full sslrootcert=/nonexistent/ca.pem"),
			"--slot", "missingca"}, "sslrootcert"))
	})
	if n := pg.QueryString(`SELECT count(*) FROM pg_replication_slots WHERE slot_name <> 'walship'`); n != "0" {
		t.Errorf("a failed connection created %s slots", n)
	}
}

// findFile is the path of the first file under root whose name starts with
// prefix, or "".
func findFile(root, prefix string) string {
	var found string
	filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err == nil && !d.IsDir() && strings.HasPrefix(d.Name(), prefix) && found == "" {
			found = p
		}
		return nil
	})
	return found
}

// logLast logs the error line walship gave, for the reader of -v output.
func logLast(t *testing.T, out string) {
	t.Helper()
	lines := strings.Split(strings.TrimRight(out, "\n"), "\n")
	t.Logf("error line: %s", lines[len(lines)-1])
}
