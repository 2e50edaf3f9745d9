package receiver

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"strconv"
	"strings"
	"syscall"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/walship/walship/pipeline"
)

// ErrFatal marks an error that a reconnect cannot fix: bad credentials, a
// missing privilege, a missing or lost slot. The receiver stops on it.
var ErrFatal = errors.New("fatal")

// ErrSlotLost is returned when PostgreSQL invalidated the slot: WAL the
// archive needs is gone, so the archive has a gap.
var ErrSlotLost = errors.New("replication slot lost")

// ErrSlotActive is returned when another connection streams the slot.
var ErrSlotActive = errors.New("replication slot active")

// pgUnavailable reports whether err says PostgreSQL could not be reached
// or is restarting (refused, reset, timed out, shutting down, starting
// up, too many connections): an outage to wait out, not a mistake to
// report. Errors marked ErrFatal never are.
func pgUnavailable(err error) bool {
	if err == nil || errors.Is(err, ErrFatal) {
		return false
	}
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) {
		return strings.HasPrefix(pgErr.Code, "08") || strings.HasPrefix(pgErr.Code, "57P") || pgErr.Code == "53300"
	}
	var netErr net.Error
	return errors.As(err, &netErr) || pgconn.Timeout(err) ||
		errors.Is(err, syscall.ECONNREFUSED) || errors.Is(err, syscall.ECONNRESET) ||
		errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF)
}

// fatalError is an error that is ErrFatal without saying so in its text.
type fatalError struct {
	msg string
	err error // its cause, or a more specific sentinel; may be nil
}

func (e *fatalError) Error() string        { return e.msg }
func (e *fatalError) Is(target error) bool { return target == ErrFatal }
func (e *fatalError) Unwrap() error        { return e.err }

func fatalf(format string, args ...any) error {
	return &fatalError{msg: fmt.Sprintf(format, args...)}
}

// wrapFatal is fatalf that keeps cause for errors.Is and errors.As.
func wrapFatal(cause error, format string, args ...any) error {
	return &fatalError{msg: fmt.Sprintf(format, args...), err: cause}
}

// ConnConfig parses a libpq connection string (URL or key=value; PG*
// variables and .pgpass apply) and sets application_name unless the string
// sets it. replication is "" for a normal connection, "true" for a physical
// replication connection.
func ConnConfig(connString, appName, replication string) (*pgconn.Config, error) {
	cfg, err := pgconn.ParseConfig(connString)
	if err != nil && strings.Contains(err.Error(), "TLS") {
		return nil, fatalf("--pg: TLS settings: %s: check the files named by sslrootcert, sslcert and sslkey (or PGSSLROOTCERT, PGSSLCERT, PGSSLKEY) exist and are readable PEM", tlsSettingReason(scrub(err)))
	}
	if err != nil {
		return nil, fatalf("--pg: %v: give a libpq URL (postgres://user@host/db) or key=value string", scrub(err))
	}
	if replication != "" {
		cfg.RuntimeParams["replication"] = replication
	}
	if _, ok := cfg.RuntimeParams["application_name"]; !ok && appName != "" {
		cfg.RuntimeParams["application_name"] = appName
	}
	return cfg, nil
}

// Connect opens a connection and turns the failures an operator can fix
// into one line that says how.
func Connect(ctx context.Context, cfg *pgconn.Config) (*pgconn.PgConn, error) {
	conn, err := pgconn.ConnectConfig(ctx, cfg)
	if err != nil {
		return nil, explainConnectError(cfg, err)
	}
	return conn, nil
}

func explainConnectError(cfg *pgconn.Config, err error) error {
	where := net.JoinHostPort(cfg.Host, strconv.Itoa(int(cfg.Port)))
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) {
		switch {
		case pgErr.Code == "28P01":
			return wrapFatal(pgErr, "password authentication failed for user %q at %s: fix the password in --pg, PGPASSWORD or ~/.pgpass", cfg.User, where)
		case pgErr.Code == "28000" && strings.Contains(pgErr.Message, "pg_hba.conf"):
			return wrapFatal(pgErr, "PostgreSQL at %s refused user %q: %s: add a 'host replication %s <address> scram-sha-256' line to pg_hba.conf and reload", where, cfg.User, pgErr.Message, cfg.User)
		case pgErr.Code == "42501":
			return wrapFatal(pgErr, "role %q may not open a replication connection (%s): run ALTER ROLE %s REPLICATION, or use a role that has it", cfg.User, pgErr.Message, cfg.User)
		case pgErr.Code == "53300" && strings.Contains(pgErr.Message, "max_wal_senders"):
			return wrapFatal(pgErr, "PostgreSQL at %s accepts no replication connection (%s): set wal_level = replica and max_wal_senders > 0, then restart PostgreSQL", where, pgErr.Message)
		case pgErr.Code == "3D000":
			return wrapFatal(pgErr, "%s: fix the database in --pg", pgErr.Message)
		}
		if e := explainCertAuthError(cfg, where, pgErr); e != nil {
			return e
		}
		return &explained{fmt.Sprintf("connect to PostgreSQL at %s: %s (SQLSTATE %s)", where, pgErr.Message, pgErr.Code), pgErr}
	}
	if e := explainTLSError(cfg, where, err); e != nil {
		return e
	}
	return &explained{fmt.Sprintf("cannot reach PostgreSQL at %s: %s: check --pg and that the server is running", where, reason(err)), err}
}

// explained is a connection error said in walship's words (without the
// connection string, which can hold a password) that still unwraps to its
// cause, so that pgUnavailable can tell an outage from a mistake.
type explained struct {
	msg string
	err error
}

func (e *explained) Error() string { return e.msg }
func (e *explained) Unwrap() error { return e.err }

// reason is the innermost cause of a connection failure, on one line:
// "connect: connection refused", "i/o timeout", "no such host".
func reason(err error) string {
	var op *net.OpError
	if errors.As(err, &op) && op.Err != nil {
		return op.Op + ": " + op.Err.Error()
	}
	var dns *net.DNSError
	if errors.As(err, &dns) {
		return dns.Error()
	}
	return strings.Join(strings.Fields(scrub(err).Error()), " ")
}

// scrub drops the connection-string echo some errors carry, which can hold
// a password.
func scrub(err error) error {
	s := err.Error()
	if i := strings.Index(s, "password="); i >= 0 {
		s = s[:i] + "password=***"
	}
	if i := strings.Index(s, "://"); i >= 0 {
		if at := strings.Index(s[i:], "@"); at > 0 {
			s = s[:i+3] + "***" + s[i+at:]
		}
	}
	return errors.New(s)
}

// ShowSetting runs SHOW over a replication or normal connection.
func ShowSetting(ctx context.Context, conn *pgconn.PgConn, name string) (string, error) {
	res, err := conn.Exec(ctx, "SHOW "+name).ReadAll()
	if err != nil {
		return "", fmt.Errorf("show %s: %w", name, err)
	}
	if len(res) != 1 || len(res[0].Rows) != 1 || len(res[0].Rows[0]) != 1 {
		return "", fmt.Errorf("show %s: unexpected result", name)
	}
	return string(res[0].Rows[0][0]), nil
}

// SegmentSizeOf reads the server's WAL segment size.
func SegmentSizeOf(ctx context.Context, conn *pgconn.PgConn) (pipeline.SegmentSize, error) {
	s, err := ShowSetting(ctx, conn, "wal_segment_size")
	if err != nil {
		return 0, err
	}
	size, err := parseSize(s)
	if err != nil {
		return 0, fmt.Errorf("wal_segment_size %q: %w", s, err)
	}
	seg := pipeline.SegmentSize(size)
	return seg, seg.Validate()
}

func parseSize(s string) (uint64, error) {
	units := []struct {
		suffix string
		mult   uint64
	}{{"GB", 1 << 30}, {"MB", 1 << 20}, {"kB", 1 << 10}, {"B", 1}}
	for _, u := range units {
		if num, ok := strings.CutSuffix(s, u.suffix); ok {
			n, err := strconv.ParseUint(strings.TrimSpace(num), 10, 64)
			return n * u.mult, err
		}
	}
	return strconv.ParseUint(s, 10, 64)
}

// SlotState is what the server says of a replication slot.
type SlotState struct {
	Exists     bool
	Physical   bool
	RestartLSN pipeline.LSN // 0 when NULL
	Timeline   uint32
	WALStatus  string // from pg_replication_slots when known
	ActivePID  int
}

// ReadSlot reads a slot's state over the replication connection with
// READ_REPLICATION_SLOT (PostgreSQL 15 and later). For older servers it
// returns ok=false and the caller asks pg_replication_slots instead.
func ReadSlot(ctx context.Context, conn *pgconn.PgConn, slot string) (s SlotState, ok bool, err error) {
	if serverMajor(conn) < 15 {
		return s, false, nil
	}
	res, err := conn.Exec(ctx, "READ_REPLICATION_SLOT "+quoteIdent(slot)).ReadAll()
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) && pgErr.Code == "0A000" && strings.Contains(pgErr.Message, "logical") {
		return SlotState{Exists: true, Physical: false}, true, nil
	}
	if err != nil {
		return s, false, fmt.Errorf("read replication slot %s: %w", slot, err)
	}
	if len(res) != 1 || len(res[0].Rows) != 1 || len(res[0].Rows[0]) != 3 {
		return s, false, fmt.Errorf("read replication slot %s: unexpected result", slot)
	}
	row := res[0].Rows[0]
	if row[0] == nil {
		return s, true, nil
	}
	s.Exists = true
	s.Physical = string(row[0]) == "physical"
	if row[1] != nil {
		l, err := pipeline.ParseLSN(string(row[1]))
		if err != nil {
			return s, false, err
		}
		s.RestartLSN = l
	}
	if row[2] != nil {
		t, _ := strconv.ParseUint(string(row[2]), 10, 32)
		s.Timeline = uint32(t)
	}
	return s, true, nil
}

// QuerySlot reads a slot's state from pg_replication_slots over a normal
// connection; it works on every supported version and adds wal_status.
func QuerySlot(ctx context.Context, conn *pgconn.PgConn, slot string) (SlotState, error) {
	var s SlotState
	rr := conn.ExecParams(ctx,
		`SELECT slot_type, restart_lsn::text, coalesce(wal_status, ''), coalesce(active_pid, 0)::text
		   FROM pg_replication_slots WHERE slot_name = $1`,
		[][]byte{[]byte(slot)}, nil, nil, nil)
	for rr.NextRow() {
		row := rr.Values()
		s.Exists = true
		s.Physical = string(row[0]) == "physical"
		if row[1] != nil {
			l, err := pipeline.ParseLSN(string(row[1]))
			if err != nil {
				rr.Close()
				return s, err
			}
			s.RestartLSN = l
		}
		s.WALStatus = string(row[2])
		s.ActivePID, _ = strconv.Atoi(string(row[3]))
	}
	if _, err := rr.Close(); err != nil {
		return s, fmt.Errorf("query pg_replication_slots: %w", err)
	}
	return s, nil
}

// CreateSlot creates a physical slot that reserves WAL from this moment
// (pglogrepl has no RESERVE_WAL option, so the command is sent as is).
// An existing slot is not an error when ifNotExists is set.
func CreateSlot(ctx context.Context, conn *pgconn.PgConn, slot string, ifNotExists bool) error {
	_, err := conn.Exec(ctx, "CREATE_REPLICATION_SLOT "+quoteIdent(slot)+" PHYSICAL RESERVE_WAL").ReadAll()
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) && pgErr.Code == "42710" && ifNotExists {
		return nil
	}
	if err != nil {
		return fmt.Errorf("create replication slot %s: %w", slot, err)
	}
	return nil
}

// DropSlot drops a slot; a missing one is not an error when ifExists is set.
func DropSlot(ctx context.Context, conn *pgconn.PgConn, slot string, ifExists bool) error {
	err := pglogrepl.DropReplicationSlot(ctx, conn, slot, pglogrepl.DropReplicationSlotOptions{})
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) && pgErr.Code == "42704" && ifExists {
		return nil
	}
	if err != nil {
		return fmt.Errorf("drop replication slot %s: %w", slot, err)
	}
	return nil
}

func serverMajor(conn *pgconn.PgConn) int {
	v := conn.ParameterStatus("server_version")
	major, _, _ := strings.Cut(v, ".")
	n, _ := strconv.Atoi(strings.Fields(major + " ")[0])
	return n
}

func quoteIdent(s string) string { return `"` + strings.ReplaceAll(s, `"`, `""`) + `"` }
