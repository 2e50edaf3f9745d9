package e2e

import (
	"bytes"
	"context"
	"crypto/sha256"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/walship/walship/compress"
	"github.com/walship/walship/pipeline"
	"github.com/walship/walship/sinks"
	s3sink "github.com/walship/walship/sinks/s3"
)

// putRanges stores bytes [from, to) of seg's WAL in raw as range objects
// under layout, with the metadata an archiver writes.
func putRanges(t *testing.T, sink sinks.Sink, layout sinks.Layout, seg pipeline.Segment, raw []byte, sysID string, ranges [][2]uint64) {
	t.Helper()
	enc, _ := compress.NewEncoder(compress.Zstd, 0)
	start := seg.StartLSN(segSize)
	for _, rg := range ranges {
		body := raw[rg[0]:rg[1]]
		z, err := enc.Encode(body)
		if err != nil {
			t.Fatal(err)
		}
		sum := sha256.Sum256(body)
		meta := sinks.Metadata{SHA256: pipeline.SHA256Hex(sum[:]), StartLSN: (start + pipeline.LSN(rg[0])).String(),
			EndLSN: (start + pipeline.LSN(rg[1])).String(), Timeline: seg.Timeline, SystemID: sysID, Codec: "zstd", RawSize: int64(len(body))}
		if err := sink.Put(context.Background(), layout.RangeKey(seg.Name(segSize), rg[0], rg[1], ".zst"), append([]byte(nil), z...), meta); err != nil {
			t.Fatal(err)
		}
	}
}

// A bucket with whole segments plus ranges of the segment being written
// (real WAL, uploaded as the archiver does, with overlaps as two receiver
// runs leave them): fetch --allow-partial serves the stitched segment,
// byte for byte the real segment's WAL up to the ranges' end and zeros;
// a restored PostgreSQL replays every commit the ranges hold and ends
// there; verify reports the range end; barman-cloud-wal-restore and the
// wal-g layout's fetch restore the whole segments and do not see ranges.
func TestFetchFromRanges(t *testing.T) {
	ctx := context.Background()
	st := newStack(t)
	for _, kv := range st.env() {
		k, v, _ := strings.Cut(kv, "=")
		t.Setenv(k, v)
	}
	st.pg.Exec(`CREATE TABLE ledger (id serial primary key, phase text, pad text)`)
	// gzip: barman-cloud-wal-restore does not read zstd.
	w := startWalship(t, st.env(), st.args("run", "--create-slot", "--compression", "gzip")...)
	waitFor(t, 30*time.Second, "streaming", func() bool { return st.walsenderPID() != "" })
	backup := st.pg.BaseBackup()
	insert := func(phase string) pipeline.LSN {
		st.pg.Exec(`INSERT INTO ledger (phase, pad) SELECT $1, repeat('x', 200) FROM generate_series(1, 100)`, phase)
		lsn := st.lsn(`SELECT pg_current_wal_insert_lsn()::text`)
		waitFor(t, 10*time.Second, "the WAL to be flushed", func() bool { return st.lsn(`SELECT pg_current_wal_flush_lsn()::text`) >= lsn })
		return lsn
	}
	insert("archived")
	end := st.switchWAL()
	waitFor(t, 60*time.Second, "archiving", func() bool { return st.replFlush() >= end })
	rangesEnd := insert("ranged")
	insert("lost") // after the ranges' end: not in the bucket
	if err := w.stop(t); err != nil {
		t.Fatal(err)
	}
	seg := pipeline.SegmentOf(1, rangesEnd, segSize)
	if seg.StartLSN(segSize) != end {
		t.Fatalf("the ranged rows are in %s, want the segment after the archived ones", seg.Name(segSize))
	}
	name, last := seg.Name(segSize), pipeline.Segment{Timeline: 1, No: seg.No - 1}.Name(segSize)
	n := uint64(rangesEnd - end)
	raw, err := os.ReadFile(filepath.Join(st.pg.WALDir(), name))
	if err != nil {
		t.Fatal(err)
	}
	lastRaw, err := os.ReadFile(filepath.Join(st.pg.WALDir(), last))
	if err != nil {
		t.Fatal(err)
	}
	want := make([]byte, segSize)
	copy(want, raw[:n])
	sysID := st.pg.QueryString(`SELECT system_identifier::text FROM pg_control_system()`)

	sink, err := s3sink.New(ctx, s3sink.Options{Bucket: st.s3.Bucket, Endpoint: st.s3.Endpoint(), PathStyle: true})
	if err != nil {
		t.Fatal(err)
	}
	barman := sinks.BarmanCloud{Prefix: st.prefix, Server: st.server}
	walg := sinks.WalG{Prefix: "walg"}
	// The same archive in the wal-g layout: its objects copied as they are.
	err = sink.List(ctx, barman.WALPrefix(), func(ob sinks.Object) error {
		rc, meta, err := sink.Get(ctx, ob.Key)
		if err != nil {
			return err
		}
		var body bytes.Buffer
		body.ReadFrom(rc)
		rc.Close()
		return sink.Put(ctx, walg.Key(filepath.Base(ob.Key), ""), body.Bytes(), meta)
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := sink.Put(ctx, walg.IdentityKey(), mustGet(t, sink, barman.IdentityKey()), sinks.Metadata{Codec: "none"}); err != nil {
		t.Fatal(err)
	}
	a := align8(n / 2)
	ranges := [][2]uint64{{0, a / 4}, {0, a}, {a / 2, n}} // two receiver runs, overlapping
	leftover := [][2]uint64{{0, 0x2000}, {0x2000, 0x5000}}
	for _, l := range []sinks.Layout{barman, walg} {
		putRanges(t, sink, l, seg, raw, sysID, ranges)
		putRanges(t, sink, l, pipeline.Segment{Timeline: 1, No: seg.No - 1}, lastRaw, sysID, leftover)
	}

	barmanFlags := []string{"--dest", "s3://" + st.s3.Bucket + "/" + st.prefix, "--s3-endpoint", st.s3.Endpoint(), "--s3-path-style", "--server", st.server}
	walgFlags := []string{"--dest", "s3://" + st.s3.Bucket + "/walg", "--s3-endpoint", st.s3.Endpoint(), "--s3-path-style", "--layout", "wal-g"}
	fetch := func(flags []string, file string, extra ...string) ([]byte, int) {
		dest := filepath.Join(t.TempDir(), "RECOVERYXLOG")
		out, err := runWalship(t, st.env(), append(append([]string{"fetch", file, dest, "--prefetch", "0", "--retry-for", "20s"}, flags...), extra...)...)
		code := 0
		if ee, ok := err.(*exec.ExitError); ok {
			code = ee.ExitCode()
		} else if err != nil {
			t.Fatal(err)
		}
		got, _ := os.ReadFile(dest)
		if code != 0 && code != 1 {
			t.Errorf("fetch %s %v: exit %d\n%s", file, extra, code, out)
		}
		return got, code
	}
	for lname, flags := range map[string][]string{"barman-cloud": barmanFlags, "wal-g": walgFlags} {
		if got, code := fetch(flags, name, "--allow-partial"); code != 0 || !bytes.Equal(got, want) {
			t.Errorf("%s: fetch --allow-partial %s: exit %d, %d bytes; want the first %d bytes of the real segment and zeros (%d bytes)",
				lname, name, code, len(got), n, len(want))
		}
		if _, code := fetch(flags, name); code != 1 {
			t.Errorf("%s: fetch %s without --allow-partial: exit %d, want 1 (not in the archive)", lname, name, code)
		}
		if got, code := fetch(flags, last, "--allow-partial"); code != 0 || !bytes.Equal(got, lastRaw) {
			t.Errorf("%s: fetch %s (whole, with leftover ranges): exit %d, differs from pg_wal", lname, last, code)
		}
		out, err := runWalship(t, st.env(), append([]string{"verify", "--deep"}, flags...)...)
		wantEnd := fmt.Sprintf("ends in ranges of %s to %s", name, rangesEnd)
		if err != nil || !strings.Contains(out, wantEnd) || !strings.Contains(out, "leftover ranges: 2 range objects") || strings.Contains(out, "GAP") {
			t.Errorf("%s: verify --deep (%v), want OK and %q:\n%s", lname, err, wantEnd, out)
		}
	}
	// The wal-g layout's WAL prefix holds no range.
	sink.List(ctx, walg.WALPrefix(), func(ob sinks.Object) error {
		if strings.Contains(ob.Key, name) {
			t.Errorf("%s is under the wal-g WAL prefix", ob.Key)
		}
		return nil
	})

	// barman-cloud-wal-restore restores the whole segment and does not see
	// the ranges.
	bin, err := exec.LookPath("barman-cloud-wal-restore")
	if err != nil {
		t.Fatal("barman-cloud-wal-restore not installed: scripts/deps.sh installs barman-cli-cloud and python3-boto3")
	}
	dir := t.TempDir()
	for _, file := range []string{last, name} {
		cmd := exec.Command("/usr/bin/python3", bin, "--endpoint-url", st.s3.Endpoint(), "--cloud-provider", "aws-s3",
			"s3://"+st.s3.Bucket+"/"+st.prefix, st.server, file, filepath.Join(dir, file))
		cmd.Env = append(os.Environ(), st.env()...)
		out, err := cmd.CombinedOutput()
		got, _ := os.ReadFile(filepath.Join(dir, file))
		switch {
		case file == last && (err != nil || !bytes.Equal(got, lastRaw)):
			t.Errorf("barman-cloud-wal-restore %s: %v, bytes equal: %v\n%s", file, err, bytes.Equal(got, lastRaw), out)
		case file == name && (err == nil || len(got) > 0):
			t.Errorf("barman-cloud-wal-restore restored %s, which is only in ranges\n%s", file, out)
		}
	}

	// PostgreSQL replays every commit the ranges hold, then ends recovery.
	r := st.pg.Restored(backup, "restore_command = '"+st.restoreCommand("barman-cloud", "--allow-partial")+"'")
	if err := r.TryStart(90 * time.Second); err != nil {
		t.Fatalf("%v\n%s", err, r.Log())
	}
	waitPromoted(t, r)
	got := r.QueryString(`SELECT string_agg(phase || ':' || n, ',' ORDER BY phase) FROM (SELECT phase, count(*) n FROM ledger GROUP BY phase) s`)
	if got != "archived:100,ranged:100" {
		t.Errorf("restored from whole segments and ranges: %s, want archived:100,ranged:100", got)
	}
}

func align8(n uint64) uint64 { return n &^ 7 }

func mustGet(t *testing.T, sink sinks.Sink, key string) []byte {
	t.Helper()
	rc, _, err := sink.Get(context.Background(), key)
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	var b bytes.Buffer
	b.ReadFrom(rc)
	return b.Bytes()
}
