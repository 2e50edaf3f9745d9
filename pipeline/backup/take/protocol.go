package take

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"strconv"
	"strings"

	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgproto3"

	"github.com/walship/walship/pipeline"
)

// Options are BASE_BACKUP's options walship sets.
type Options struct {
	Label string
	// Checkpoint is "fast" or "spread".
	Checkpoint string
	// MaxRate throttles the server, in kB/s (32 to 1048576); 0: no limit.
	MaxRate int
	// ManifestChecksums is the manifest's per-file checksum algorithm:
	// NONE, CRC32C (PostgreSQL's default), SHA224, SHA256, SHA384, SHA512.
	ManifestChecksums string
}

// command is the BASE_BACKUP command (PostgreSQL 15's option syntax). WAL
// is not included (walship archives it), and the server does not wait for
// archive_command (WAIT false): walship waits for its own archive instead.
// TABLESPACE_MAP puts tablespace_map in the base archive.
func (o Options) command() string {
	quote := func(s string) string { return "'" + strings.ReplaceAll(s, "'", "''") + "'" }
	parts := []string{
		"LABEL " + quote(o.Label),
		"CHECKPOINT " + quote(o.Checkpoint),
		"WAIT false",
		"TABLESPACE_MAP true",
		"MANIFEST 'yes'",
	}
	if o.ManifestChecksums != "" {
		parts = append(parts, "MANIFEST_CHECKSUMS "+quote(o.ManifestChecksums))
	}
	if o.MaxRate > 0 {
		parts = append(parts, "MAX_RATE "+strconv.Itoa(o.MaxRate))
	}
	return "BASE_BACKUP (" + strings.Join(parts, ", ") + ")"
}

// Validate checks the options.
func (o Options) Validate() error {
	if o.Checkpoint != "fast" && o.Checkpoint != "spread" {
		return fmt.Errorf("checkpoint %q: use fast or spread", o.Checkpoint)
	}
	if o.MaxRate != 0 && (o.MaxRate < 32 || o.MaxRate > 1048576) {
		return fmt.Errorf("max rate %d kB/s: PostgreSQL takes 32 kB/s to 1 GB/s (0: no limit)", o.MaxRate)
	}
	switch strings.ToUpper(o.ManifestChecksums) {
	case "", "NONE", "CRC32C", "SHA224", "SHA256", "SHA384", "SHA512":
	default:
		return fmt.Errorf("manifest checksums %q: use NONE, CRC32C, SHA224, SHA256, SHA384 or SHA512", o.ManifestChecksums)
	}
	if strings.ContainsRune(o.Label, 0) || len(o.Label) > 1023 {
		return errors.New("label: at most 1023 bytes, no NUL")
	}
	return nil
}

// position is a row of BASE_BACKUP's start or end result set.
type position struct {
	LSN      pipeline.LSN
	Timeline uint32
}

// tablespace is a row of BASE_BACKUP's tablespace result set.
type tablespace struct {
	OID      string
	Location string
}

// stream receives a backup's CopyData messages (PostgreSQL 15 and later):
// archive starts a new archive (name as the server gives it, e.g.
// "base.tar" or "16385.tar"; location empty for the data directory),
// manifest starts the manifest, data is the current one's bytes (valid
// only during the call).
type stream interface {
	archive(name, location string) error
	manifest() error
	data(p []byte) error
}

// readRows reads one result set up to its CommandComplete.
func readRows(ctx context.Context, conn *pgconn.PgConn) ([][]string, error) {
	var rows [][]string
	for {
		msg, err := conn.ReceiveMessage(ctx)
		if err != nil {
			return nil, err
		}
		switch m := msg.(type) {
		case *pgproto3.RowDescription, *pgproto3.NoticeResponse, *pgproto3.ParameterStatus:
		case *pgproto3.DataRow:
			row := make([]string, len(m.Values))
			for i, v := range m.Values {
				row[i] = string(v)
			}
			rows = append(rows, row)
		case *pgproto3.CommandComplete:
			return rows, nil
		case *pgproto3.ErrorResponse:
			return nil, pgconn.ErrorResponseToPgError(m)
		default:
			return nil, fmt.Errorf("BASE_BACKUP: unexpected %T", msg)
		}
	}
}

func parsePosition(rows [][]string) (position, error) {
	if len(rows) != 1 || len(rows[0]) < 2 {
		return position{}, fmt.Errorf("BASE_BACKUP: position result set has %d rows", len(rows))
	}
	l, err := pipeline.ParseLSN(rows[0][0])
	if err != nil {
		return position{}, fmt.Errorf("BASE_BACKUP: position %q: %v", rows[0][0], err)
	}
	tli, err := strconv.ParseUint(rows[0][1], 10, 32)
	if err != nil || tli == 0 {
		return position{}, fmt.Errorf("BASE_BACKUP: timeline %q", rows[0][1])
	}
	return position{LSN: l, Timeline: uint32(tli)}, nil
}

// baseBackup runs BASE_BACKUP on a replication connection: started is
// called with the start position and tablespaces before any data, the
// archives and the manifest go to s, and the end position is returned.
func baseBackup(ctx context.Context, conn *pgconn.PgConn, o Options, started func(position, []tablespace) error, s stream) (position, error) {
	conn.Frontend().SendQuery(&pgproto3.Query{String: o.command()})
	if err := conn.Frontend().Flush(); err != nil {
		return position{}, fmt.Errorf("send BASE_BACKUP: %w", err)
	}
	rows, err := readRows(ctx, conn)
	if err != nil {
		return position{}, err
	}
	start, err := parsePosition(rows)
	if err != nil {
		return position{}, err
	}
	if rows, err = readRows(ctx, conn); err != nil {
		return position{}, err
	}
	var tbs []tablespace
	for _, r := range rows {
		if len(r) >= 2 && r[0] != "" {
			tbs = append(tbs, tablespace{OID: r[0], Location: r[1]})
		}
	}
	if err := started(start, tbs); err != nil {
		return position{}, err
	}
	if err := copyOut(ctx, conn, s); err != nil {
		return position{}, err
	}
	var end position
	for {
		msg, err := conn.ReceiveMessage(ctx)
		if err != nil {
			return position{}, err
		}
		switch m := msg.(type) {
		case *pgproto3.DataRow:
			if len(m.Values) >= 2 {
				if end, err = parsePosition([][]string{{string(m.Values[0]), string(m.Values[1])}}); err != nil {
					return position{}, err
				}
			}
		case *pgproto3.ErrorResponse:
			return position{}, pgconn.ErrorResponseToPgError(m)
		case *pgproto3.ReadyForQuery:
			if end.LSN == 0 {
				return position{}, errors.New("BASE_BACKUP ended without an end position")
			}
			return end, nil
		}
	}
}

// copyOut reads the CopyOut stream of a PostgreSQL 15 (or later) backup:
// 'n' new archive, 'm' manifest, 'd' data, 'p' progress.
func copyOut(ctx context.Context, conn *pgconn.PgConn, s stream) error {
	for {
		msg, err := conn.ReceiveMessage(ctx)
		if err != nil {
			return err
		}
		switch m := msg.(type) {
		case *pgproto3.CopyOutResponse, *pgproto3.NoticeResponse, *pgproto3.ParameterStatus:
		case *pgproto3.CopyData:
			if len(m.Data) == 0 {
				return errors.New("BASE_BACKUP: empty CopyData message")
			}
			body := m.Data[1:]
			switch m.Data[0] {
			case 'n':
				name, rest, ok1 := cutString(body)
				loc, _, ok2 := cutString(rest)
				if !ok1 || !ok2 {
					return errors.New("BASE_BACKUP: malformed new-archive message")
				}
				err = s.archive(name, loc)
			case 'm':
				err = s.manifest()
			case 'd':
				err = s.data(body)
			case 'p':
				if len(body) != 8 {
					return errors.New("BASE_BACKUP: malformed progress message")
				}
				_ = binary.BigEndian.Uint64(body)
			default:
				return fmt.Errorf("BASE_BACKUP: unknown message type %q (a server older than PostgreSQL 15?)", m.Data[0])
			}
			if err != nil {
				return err
			}
		case *pgproto3.CopyDone:
			return nil
		case *pgproto3.ErrorResponse:
			return pgconn.ErrorResponseToPgError(m)
		default:
			return fmt.Errorf("BASE_BACKUP: unexpected %T in the data stream", msg)
		}
	}
}

// cutString splits a NUL-terminated string off b.
func cutString(b []byte) (string, []byte, bool) {
	for i, c := range b {
		if c == 0 {
			return string(b[:i]), b[i+1:], true
		}
	}
	return "", nil, false
}
