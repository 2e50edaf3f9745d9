package e2e

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"os"
	"path/filepath"
	"strconv"
	"syscall"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/s3"

	"github.com/walship/walship/internal/testenv"
	"github.com/walship/walship/pipeline"
)

// standbyFromArchive makes a standby in continuous archive recovery
// (standby.signal, no primary_conninfo) from a base backup.
func (st *stack) standbyFromArchive(backup string, extra ...string) *testenv.Postgres {
	st.t.Helper()
	r := st.pg.Restored(backup, "restore_command = '"+st.restoreCommand("barman-cloud", extra...)+"'",
		"hot_standby = on", "wal_retrieve_retry_interval = '500ms'")
	os.Remove(filepath.Join(r.DataDir, "recovery.signal"))
	p := filepath.Join(r.DataDir, "standby.signal")
	if err := os.WriteFile(p, nil, 0o600); err != nil {
		st.t.Fatal(err)
	}
	var sys syscall.Stat_t
	syscall.Stat(r.DataDir, &sys)
	os.Chown(p, int(sys.Uid), int(sys.Gid))
	if err := r.TryStart(120 * time.Second); err != nil {
		st.t.Fatalf("%v\n%s", err, r.Log())
	}
	return r
}

// (e) Standbys in continuous recovery from the archive keep waiting while
// it has nothing new and catch up as segments arrive, with and without
// --allow-partial. The one that allows partials replays a .partial of the
// segment being written (zero-padded WAL up to its end LSN) and then the
// whole segment; the other waits for the whole segment.
func TestStandbyFollowsArchive(t *testing.T) {
	st := newStack(t)
	st.pg.Exec(`CREATE TABLE ledger (id serial primary key, phase text)`)
	w := startWalship(t, st.env(), st.args("run", "--create-slot")...)
	waitFor(t, 30*time.Second, "streaming", func() bool { return st.walsenderPID() != "" })
	backup := st.pg.BaseBackup()
	insert := func(phase string) {
		st.pg.Exec(`INSERT INTO ledger (phase) SELECT $1 FROM generate_series(1, 100)`, phase)
	}
	archived := func() {
		end := st.switchWAL()
		waitFor(t, 60*time.Second, "archiving", func() bool { return st.replFlush() >= end })
	}
	rows := func(p *testenv.Postgres) int { return count(p, `SELECT count(*)::text FROM ledger`) }
	insert("one")
	archived()

	plain := st.standbyFromArchive(backup)
	partial := st.standbyFromArchive(backup, "--allow-partial")
	for _, s := range []*testenv.Postgres{plain, partial} {
		waitFor(t, 60*time.Second, "a standby to replay the archive", func() bool { return rows(s) == 100 })
	}

	// More WAL, not archived: both wait.
	insert("two")
	time.Sleep(2 * time.Second)
	if a, b := rows(plain), rows(partial); a != 100 || b != 100 {
		t.Fatalf("standbys have %d and %d rows before the archive has more, want 100", a, b)
	}
	for _, s := range []*testenv.Postgres{plain, partial} {
		if s.QueryString(`SELECT pg_is_in_recovery()::text`) != "true" {
			t.Fatalf("a standby left recovery while the archive had nothing new:\n%s", s.Log())
		}
	}

	// The WAL of the segment being written, uploaded as a .partial.
	insertLSN := st.lsn(`SELECT pg_current_wal_insert_lsn()::text`)
	waitFor(t, 10*time.Second, "the WAL to be flushed", func() bool { return st.lsn(`SELECT pg_current_wal_flush_lsn()::text`) >= insertLSN })
	seg := pipeline.SegmentOf(1, insertLSN, segSize)
	st.uploadPartial(seg, insertLSN)
	waitFor(t, 60*time.Second, "the --allow-partial standby to replay the .partial", func() bool { return rows(partial) == 200 })
	time.Sleep(2 * time.Second)
	if n := rows(plain); n != 100 {
		t.Errorf("the standby without --allow-partial has %d rows: it replayed the .partial", n)
	}

	// The whole segment and more arrive: both catch up.
	insert("three")
	archived()
	if err := w.stop(t); err != nil {
		t.Fatal(err)
	}
	want := st.pg.QueryString(`SELECT string_agg(phase || ':' || n, ',' ORDER BY phase) FROM (SELECT phase, count(*) n FROM ledger GROUP BY phase) s`)
	for name, s := range map[string]*testenv.Postgres{"plain": plain, "allow-partial": partial} {
		waitFor(t, 60*time.Second, name+" standby to catch up", func() bool { return rows(s) == 300 })
		got := s.QueryString(`SELECT string_agg(phase || ':' || n, ',' ORDER BY phase) FROM (SELECT phase, count(*) n FROM ledger GROUP BY phase) s`)
		if got != want {
			t.Errorf("%s standby: %s, want %s", name, got, want)
		}
	}
}

// uploadPartial stores seg's WAL up to end as <segment>.partial, zero
// after end, with the metadata walship's archiver writes.
func (st *stack) uploadPartial(seg pipeline.Segment, end pipeline.LSN) {
	st.t.Helper()
	name := seg.Name(segSize)
	raw, err := os.ReadFile(filepath.Join(st.pg.WALDir(), name))
	if err != nil {
		st.t.Fatal(err)
	}
	clear(raw[end-seg.StartLSN(segSize):])
	sum := sha256.Sum256(raw)
	meta := map[string]string{
		"walship-sha256": hex.EncodeToString(sum[:]), "walship-start-lsn": seg.StartLSN(segSize).String(),
		"walship-end-lsn": end.String(), "walship-timeline": "1", "walship-codec": "none",
		"walship-system-id": st.pg.QueryString(`SELECT system_identifier::text FROM pg_control_system()`),
		"walship-raw-size":  strconv.Itoa(len(raw)),
	}
	key := st.prefix + "/" + st.server + "/wals/" + name[:16] + "/" + name + ".partial"
	if _, err := st.s3.Client().PutObject(context.Background(), &s3.PutObjectInput{Bucket: aws.String(st.s3.Bucket), Key: aws.String(key),
		Body: bytes.NewReader(raw), Metadata: meta}); err != nil {
		st.t.Fatal(err)
	}
}
