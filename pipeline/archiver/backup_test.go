package archiver

import (
	"bytes"
	"context"
	"crypto/sha256"
	"io"
	"testing"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/walship/walship/compress"
	"github.com/walship/walship/pipeline"
	"github.com/walship/walship/sinks"
)

// backupEvent turns the fixture's event into a backup chunk holding raw.
func (f *fixture) backupEvent(raw []byte) pipeline.SegmentEvent {
	sum := sha256.Sum256(raw)
	ev := f.ev
	ev.Kind, ev.File, ev.Size, ev.SHA256 = pipeline.KindBackup, "20261129T210000Z/base/000003", int64(len(raw)), pipeline.SHA256Hex(sum[:])
	ev.StartLSN, ev.EndLSN, ev.Object = 0x3000028, 0x3000028, "db1/backup/20261129T210000Z/base/000003"
	f.bus.objects = map[string][]byte{ev.Object: raw}
	return ev
}

func TestBackupChunkArchived(t *testing.T) {
	f := newFixture(t)
	raw := bytes.Repeat([]byte("not WAL at all, a piece of a tar stream "), 5000)
	ev := f.backupEvent(raw)
	d, out := f.handle(t, ev, 1)
	if out != Acked || d.answer != "ack" {
		t.Fatalf("outcome %v, answer %q", out, d.answer)
	}
	key := sinks.BarmanCloud{Prefix: "p", Server: "db1"}.BackupPrefix() + ev.File + ".zst"
	if key != "p/db1/walship-backups/20261129T210000Z/base/000003.zst" {
		t.Fatalf("key %s", key)
	}
	rc, meta, err := f.sink.Get(context.Background(), key)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(rc)
	rc.Close()
	got, err := compress.Decode(compress.Zstd, body, len(raw))
	if err != nil || !bytes.Equal(got, raw) {
		t.Fatalf("stored chunk does not decode to its bytes (%v)", err)
	}
	if meta.SHA256 != ev.SHA256 {
		t.Fatalf("metadata sha256 %s, want %s", meta.SHA256, ev.SHA256)
	}
	if len(f.bus.archived) != 1 || f.bus.archived[0].Key != key || f.bus.archived[0].Kind != pipeline.KindBackup {
		t.Fatalf("confirmations %+v", f.bus.archived)
	}
	if _, ok := f.bus.objects[ev.Object]; ok {
		t.Fatal("staged object not deleted")
	}
	m := f.a.cfg.Metrics
	if n := testutil.ToFloat64(m.BackupChunks.WithLabelValues("db1")); n != 1 {
		t.Fatalf("walship_backup_chunks_total %v", n)
	}
	if n := testutil.ToFloat64(m.BackupBytes.WithLabelValues("db1")); n != float64(len(raw)) {
		t.Fatalf("walship_backup_bytes_total %v", n)
	}
	if n := testutil.ToFloat64(m.Segments.WithLabelValues("db1")); n != 0 {
		t.Fatalf("a backup chunk counted as a WAL segment: %v", n)
	}

	// Again (a redelivery): found in the sink with the same SHA-256.
	f.bus.objects[ev.Object] = raw
	if _, out := f.handle(t, ev, 2); out != Acked || !f.bus.archived[1].Existed {
		t.Fatalf("redelivery: outcome %v, existed %v", out, f.bus.archived[1].Existed)
	}
	// Other bytes under the same name: a conflict, never overwritten.
	other := f.backupEvent(bytes.Repeat([]byte("x"), 1000))
	if _, out := f.handle(t, other, 1); out != Naked {
		t.Fatalf("conflicting chunk: outcome %v", out)
	}
}

func TestBackupChunkCorrupt(t *testing.T) {
	f := newFixture(t)
	raw := bytes.Repeat([]byte("tar"), 1000)
	ev := f.backupEvent(raw)
	f.bus.objects[ev.Object] = append([]byte("X"), raw[1:]...)
	if d, out := f.handle(t, ev, 1); out != Termed || d.answer != "term" {
		t.Fatalf("corrupt chunk: outcome %v, answer %q", out, d.answer)
	}
	if len(f.bus.archived) != 0 {
		t.Fatal("a corrupt chunk was confirmed")
	}
}
