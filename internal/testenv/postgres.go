// Package testenv starts the real servers walship's tests run against: a
// throwaway PostgreSQL cluster (initdb'd per test), an embedded NATS
// JetStream server, and Versity S3 Gateway on loopback. Every helper stops
// what it started through t.Cleanup.
package testenv

import (
	"context"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
)

// PGBinDir finds PostgreSQL's binaries: $WALSHIP_PG_BINDIR, pg_config
// --bindir, or the newest /usr/lib/postgresql/<v>/bin.
func PGBinDir(t testing.TB) string {
	if d := os.Getenv("WALSHIP_PG_BINDIR"); d != "" {
		return d
	}
	if out, err := exec.Command("pg_config", "--bindir").Output(); err == nil {
		d := strings.TrimSpace(string(out))
		if _, err := os.Stat(filepath.Join(d, "initdb")); err == nil {
			return d
		}
	}
	for _, v := range []string{"17", "16", "15", "14", "13", "12"} {
		d := "/usr/lib/postgresql/" + v + "/bin"
		if _, err := os.Stat(filepath.Join(d, "initdb")); err == nil {
			return d
		}
	}
	t.Fatal("PostgreSQL binaries not found: install postgresql (Debian: apt-get install postgresql-15) or set WALSHIP_PG_BINDIR")
	return ""
}

// Postgres is a running throwaway cluster.
type Postgres struct {
	t       testing.TB
	Bin     string
	Dir     string // parent of DataDir, owned by the cluster's OS user
	DataDir string
	Port    int
	cred    *syscall.Credential
}

// PGOptions tune a cluster.
type PGOptions struct {
	SegSizeMB int      // --wal-segsize; default 1
	Conf      []string // extra postgresql.conf lines
}

// FreePort returns a TCP port free on loopback right now.
func FreePort(t testing.TB) int {
	// Below the kernel's ephemeral range (32768-60999 on Linux): a port
	// the kernel hands out for ":0" is also what it picks as the local
	// port of outgoing connections, which may take it before the server
	// that was meant to bind it does. Never the same port twice in one
	// test binary.
	portMu.Lock()
	defer portMu.Unlock()
	for range 200 {
		p := 20000 + rand.IntN(12000)
		if portsGiven[p] {
			continue
		}
		ln, err := net.Listen("tcp", "127.0.0.1:"+strconv.Itoa(p))
		if err != nil {
			continue
		}
		ln.Close()
		portsGiven[p] = true
		return p
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port
}

var (
	portMu     sync.Mutex
	portsGiven = map[int]bool{}
)

// StartPostgres initdb's and starts a cluster with replication allowed on
// loopback. As root, it runs PostgreSQL as the postgres user.
func StartPostgres(t testing.TB, o PGOptions) *Postgres {
	t.Helper()
	if o.SegSizeMB == 0 {
		o.SegSizeMB = 1
	}
	p := &Postgres{t: t, Bin: PGBinDir(t), Port: FreePort(t)}
	dir, err := os.MkdirTemp("", "walship-pg-")
	if err != nil {
		t.Fatal(err)
	}
	p.Dir = dir
	p.DataDir = filepath.Join(dir, "data")
	t.Cleanup(func() { os.RemoveAll(dir) })
	if os.Geteuid() == 0 {
		u, err := user.Lookup("postgres")
		if err != nil {
			t.Fatal("running as root needs a 'postgres' OS user to run PostgreSQL")
		}
		uid, _ := strconv.Atoi(u.Uid)
		gid, _ := strconv.Atoi(u.Gid)
		p.cred = &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid)}
		if err := os.Chown(dir, uid, gid); err != nil {
			t.Fatal(err)
		}
	}
	p.run("initdb", "-D", p.DataDir, "-U", "postgres", "--auth=trust", "--no-sync",
		"--wal-segsize="+strconv.Itoa(o.SegSizeMB), "-E", "UTF8", "--locale=C")
	conf := []string{
		"listen_addresses = '127.0.0.1'",
		"port = " + strconv.Itoa(p.Port),
		"unix_socket_directories = '" + dir + "'",
		"wal_level = replica",
		"max_wal_senders = 10",
		"max_replication_slots = 10",
		"wal_keep_size = '2GB'",
		"fsync = off",
		"synchronous_commit = off",
		"full_page_writes = on",
		"shared_buffers = '64MB'",
		"checkpoint_timeout = '30s'",
		"log_min_messages = warning",
		"logging_collector = off",
	}
	conf = append(conf, o.Conf...)
	p.appendFile("postgresql.conf", strings.Join(conf, "\n")+"\n")
	p.writeFile("pg_hba.conf", strings.Join([]string{
		"local all all trust",
		"host all pwuser 127.0.0.1/32 scram-sha-256",
		"host replication pwuser 127.0.0.1/32 scram-sha-256",
		"host all replonly 127.0.0.1/32 reject", // a role allowed replication connections only
		"host all all 127.0.0.1/32 trust",
		"host replication all 127.0.0.1/32 trust",
	}, "\n")+"\n")
	p.Start()
	t.Cleanup(func() { p.Stop("immediate") })
	return p
}

func (p *Postgres) run(name string, args ...string) string {
	p.t.Helper()
	bin := filepath.Join(p.Bin, name)
	if name == "cp" {
		bin = "cp"
	}
	cmd := exec.Command(bin, args...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: p.cred}
	cmd.Dir = p.Dir
	cmd.Env = append(os.Environ(), "LC_ALL=C")
	out, err := cmd.CombinedOutput()
	if err != nil {
		p.t.Fatalf("%s %v: %v\n%s", name, args, err, out)
	}
	return string(out)
}

func (p *Postgres) writeFile(name, content string) {
	path := filepath.Join(p.DataDir, name)
	if err := os.WriteFile(path, []byte(content), 0o600); err != nil {
		p.t.Fatal(err)
	}
	p.chown(path)
}

func (p *Postgres) appendFile(name, content string) {
	f, err := os.OpenFile(filepath.Join(p.DataDir, name), os.O_APPEND|os.O_WRONLY, 0)
	if err != nil {
		p.t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.WriteString(content); err != nil {
		p.t.Fatal(err)
	}
}

func (p *Postgres) chown(path string) {
	if p.cred != nil {
		os.Chown(path, int(p.cred.Uid), int(p.cred.Gid))
	}
}

// SetConf appends postgresql.conf lines; restart to apply those that need it.
func (p *Postgres) SetConf(lines ...string) {
	p.appendFile("postgresql.conf", strings.Join(lines, "\n")+"\n")
}

// Start starts the server and waits until it accepts connections.
func (p *Postgres) Start() {
	p.t.Helper()
	p.run("pg_ctl", "-D", p.DataDir, "-l", filepath.Join(p.Dir, "server.log"), "-w", "-t", "60", "start")
}

// Stop stops the server with the given shutdown mode (smart, fast, immediate).
func (p *Postgres) Stop(mode string) {
	cmd := exec.Command(filepath.Join(p.Bin, "pg_ctl"), "-D", p.DataDir, "-m", mode, "-w", "stop")
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: p.cred}
	cmd.Run()
}

// Log returns the server log, for failure messages.
func (p *Postgres) Log() string {
	b, _ := os.ReadFile(filepath.Join(p.Dir, "server.log"))
	return string(b)
}

// URL is a connection URL for user (trust auth except for pwuser).
func (p *Postgres) URL(user string) string {
	return fmt.Sprintf("postgres://%s@127.0.0.1:%d/postgres?sslmode=disable", user, p.Port)
}

// Conn opens a SQL connection as the superuser.
func (p *Postgres) Conn(ctx context.Context) *pgx.Conn {
	p.t.Helper()
	conn, err := pgx.Connect(ctx, p.URL("postgres"))
	if err != nil {
		p.t.Fatalf("connect: %v", err)
	}
	return conn
}

// Exec runs SQL statements as the superuser.
func (p *Postgres) Exec(sql string, args ...any) {
	p.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	conn := p.Conn(ctx)
	defer conn.Close(ctx)
	if _, err := conn.Exec(ctx, sql, args...); err != nil {
		p.t.Fatalf("exec %q: %v", sql, err)
	}
}

// QueryString returns the first column of the first row as text ("" for NULL).
func (p *Postgres) QueryString(sql string, args ...any) string {
	p.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	conn := p.Conn(ctx)
	defer conn.Close(ctx)
	var s *string
	if err := conn.QueryRow(ctx, sql, args...).Scan(&s); err != nil && err != pgx.ErrNoRows {
		p.t.Fatalf("query %q: %v", sql, err)
	}
	if s == nil {
		return ""
	}
	return *s
}

// WALDir is the cluster's pg_wal directory.
func (p *Postgres) WALDir() string { return filepath.Join(p.DataDir, "pg_wal") }

// Pgbench runs pgbench with args against the cluster.
func (p *Postgres) Pgbench(ctx context.Context, args ...string) error {
	base := []string{"-h", "127.0.0.1", "-p", strconv.Itoa(p.Port), "-U", "postgres"}
	cmd := exec.CommandContext(ctx, filepath.Join(p.Bin, "pgbench"), append(base, append(args, "postgres")...)...)
	out, err := cmd.CombinedOutput()
	if err != nil && ctx.Err() == nil {
		return fmt.Errorf("pgbench %v: %v\n%s", args, err, out)
	}
	return nil
}

// BaseBackup takes a base backup of the cluster into a new directory with
// pg_basebackup -X none, so every WAL byte recovery needs must come from an
// archive. The directory belongs to the cluster's OS user.
func (p *Postgres) BaseBackup() string {
	p.t.Helper()
	dir, err := os.MkdirTemp("", "walship-backup-")
	if err != nil {
		p.t.Fatal(err)
	}
	p.t.Cleanup(func() { os.RemoveAll(dir) })
	p.chown(dir)
	data := filepath.Join(dir, "data")
	p.run("pg_basebackup", "-h", "127.0.0.1", "-p", strconv.Itoa(p.Port), "-U", "postgres", "-D", data, "-X", "none", "-c", "fast", "--no-sync")
	return data
}

// Restored prepares a cluster from a copy of a base backup, for recovery
// with the given postgresql.conf lines (restore_command, targets). It is
// not started: call TryStart.
func (p *Postgres) Restored(backup string, conf ...string) *Postgres {
	p.t.Helper()
	dir, err := os.MkdirTemp("", "walship-restored-")
	if err != nil {
		p.t.Fatal(err)
	}
	p.t.Cleanup(func() { os.RemoveAll(dir) })
	p.chown(dir)
	r := &Postgres{t: p.t, Bin: p.Bin, Dir: dir, DataDir: filepath.Join(dir, "data"), Port: FreePort(p.t), cred: p.cred}
	r.run("cp", "-a", backup, r.DataDir)
	// A backup of a standby is itself a standby: make it recover and open.
	os.Remove(filepath.Join(r.DataDir, "standby.signal"))
	r.SetConf(append([]string{"port = " + strconv.Itoa(r.Port), "unix_socket_directories = '" + dir + "'", "primary_conninfo = ''"}, conf...)...)
	r.writeFile("recovery.signal", "")
	p.t.Cleanup(func() { r.Stop("immediate") })
	return r
}

// TryStart starts the server and reports pg_ctl's failure instead of
// failing the test (recovery that aborts is an expected outcome).
func (p *Postgres) TryStart(timeout time.Duration) error {
	cmd := exec.Command(filepath.Join(p.Bin, "pg_ctl"), "-D", p.DataDir, "-l", filepath.Join(p.Dir, "server.log"), "-w",
		"-t", strconv.Itoa(int(timeout.Seconds())), "start")
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: p.cred}
	out, err := cmd.CombinedOutput()
	if err != nil {
		return fmt.Errorf("pg_ctl start: %v: %s", err, out)
	}
	return nil
}

// Running reports whether the postmaster is alive.
func (p *Postgres) Running() bool {
	cmd := exec.Command(filepath.Join(p.Bin, "pg_ctl"), "-D", p.DataDir, "status")
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: p.cred}
	return cmd.Run() == nil
}

// StartStandby makes a streaming standby of p with pg_basebackup -R and
// starts it.
func (p *Postgres) StartStandby(conf ...string) *Postgres {
	p.t.Helper()
	dir, err := os.MkdirTemp("", "walship-standby-")
	if err != nil {
		p.t.Fatal(err)
	}
	p.t.Cleanup(func() { os.RemoveAll(dir) })
	p.chown(dir)
	s := &Postgres{t: p.t, Bin: p.Bin, Dir: dir, DataDir: filepath.Join(dir, "data"), Port: FreePort(p.t), cred: p.cred}
	p.run("pg_basebackup", "-h", "127.0.0.1", "-p", strconv.Itoa(p.Port), "-U", "postgres", "-D", s.DataDir, "-X", "stream", "-R", "-c", "fast", "--no-sync")
	s.SetConf(append([]string{"port = " + strconv.Itoa(s.Port), "unix_socket_directories = '" + dir + "'", "hot_standby = on"}, conf...)...)
	s.Start()
	p.t.Cleanup(func() { s.Stop("immediate") })
	return s
}

// Promote promotes a standby and waits until it accepts writes.
func (p *Postgres) Promote() {
	p.t.Helper()
	p.run("pg_ctl", "-D", p.DataDir, "-w", "promote")
}
