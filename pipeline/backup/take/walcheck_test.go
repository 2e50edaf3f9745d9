package take

import (
	"context"
	"testing"

	"github.com/walship/walship/pipeline"
	"github.com/walship/walship/pipeline/backup"
	"github.com/walship/walship/sinks"
	filesink "github.com/walship/walship/sinks/file"
)

const testSys = "7300000000000000042"

type walBucket struct {
	t      *testing.T
	fs     *filesink.Sink
	layout sinks.Layout
}

func newWALBucket(t *testing.T) *walBucket {
	fs, err := filesink.New(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	return &walBucket{t: t, fs: fs, layout: sinks.BarmanCloud{Prefix: "p", Server: "s"}}
}

func (b *walBucket) putAs(key, sysID string) {
	b.t.Helper()
	if err := b.fs.Put(context.Background(), key, []byte("x"), sinks.Metadata{SHA256: hashHex([]byte("x")), SystemID: sysID}); err != nil {
		b.t.Fatal(err)
	}
}

func (b *walBucket) put(key string) { b.t.Helper(); b.putAs(key, testSys) }

func (b *walBucket) missing(c *walCheck) string {
	b.t.Helper()
	m, err := c.missing(context.Background())
	if err != nil {
		b.t.Fatal(err)
	}
	return m
}

const mb = pipeline.SegmentSize(1 << 20)

func seg(tli uint32, no uint64) string { return pipeline.Segment{Timeline: tli, No: no}.Name(mb) }

func mustPath(t *testing.T, startTLI, endTLI uint32, hist []pipeline.HistoryEntry) []leg {
	t.Helper()
	p, err := timelinePath(startTLI, endTLI, hist)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// The WAL a backup needs, start to end, counts as archived only when every
// segment is there whole (any codec, this system's), or, for the last one,
// as the end timeline's .partial or ranges reaching the end.
func TestWALCheck(t *testing.T) {
	b := newWALBucket(t)
	start, end := pipeline.LSN(3<<20+100), pipeline.LSN(6<<20+5000) // segments 3..6
	c := newWALCheck(b.fs, b.layout, testSys, mb, mustPath(t, 1, 1, nil), start, end)
	if m := b.missing(c); m != seg(1, 3) {
		t.Fatalf("empty bucket: missing %q", m)
	}
	// Someone else's object at the segment's key (a conflict the archivers
	// refuse to overwrite) is not this server's WAL.
	b.putAs(b.layout.Key(seg(1, 3), ".zst"), "")
	b.putAs(b.layout.Key(seg(1, 3), ".gz"), "6900000000000000001")
	if m := b.missing(c); m != seg(1, 3) {
		t.Fatalf("a foreign object at the key: missing %q", m)
	}
	b.put(b.layout.Key(seg(1, 3), ""))
	b.put(b.layout.Key(seg(1, 4), ".gz"))
	// A .partial stands only for the last segment: timeline 1 cannot have
	// ended in segment 5 and gone on to segment 6.
	b.put(b.layout.Key(seg(1, 5)+".partial", ".zst"))
	if m := b.missing(c); m != seg(1, 5) {
		t.Fatalf("a .partial before the last segment: missing %q", m)
	}
	b.put(b.layout.Key(seg(1, 5), ".zst"))
	if m := b.missing(c); m != seg(1, 6) {
		t.Fatalf("missing %q, want the last segment", m)
	}
	// Ranges of the last segment that stop short of the end, then reach it.
	b.put(b.layout.RangeKey(seg(1, 6), 0, 0x1000, ".zst"))
	if m := b.missing(c); m != seg(1, 6) {
		t.Fatalf("ranges short of the end: missing %q", m)
	}
	b.put(b.layout.RangeKey(seg(1, 6), 0x800, 0x2000, ".zst"))
	if m := b.missing(c); m != "" {
		t.Fatalf("ranges reaching the end: missing %q", m)
	}
	// The end timeline ended later, inside the backup's last segment: its
	// .partial holds the WAL up to the switch, past the backup's end.
	c = newWALCheck(b.fs, b.layout, testSys, mb, mustPath(t, 1, 1, nil), start, 7<<20+10)
	if m := b.missing(c); m != seg(1, 6) {
		t.Fatalf("ranges of a segment before the last: missing %q", m)
	}
	b.put(b.layout.Key(seg(1, 6), ".zst"))
	if m := b.missing(c); m != seg(1, 7) {
		t.Fatalf("missing %q", m)
	}
	b.put(b.layout.Key(seg(1, 7)+".partial", ".zst"))
	if m := b.missing(c); m != "" {
		t.Fatalf("the end timeline's .partial of the last segment: missing %q", m)
	}
}

// A standby backup whose upstream was promoted during the backup starts
// on timeline 1 and ends on 2 (review finding 1): the switch segment and
// every one after it come from timeline 2 only; timeline 1's .partial,
// which stops at the switch, never stands for them.
func TestWALCheckAcrossASwitch(t *testing.T) {
	b := newWALBucket(t)
	hist := []pipeline.HistoryEntry{{Parent: 1, Switch: 6<<20 + 1000}}
	start, end := pipeline.LSN(3<<20+100), pipeline.LSN(6<<20+5000)
	for _, n := range []uint64{3, 4, 5} {
		b.put(b.layout.Key(seg(1, n), ".zst"))
	}
	b.put(b.layout.Key(seg(1, 6)+".partial", ".zst"))
	c := newWALCheck(b.fs, b.layout, testSys, mb, mustPath(t, 1, 2, hist), start, end)
	if m := b.missing(c); m != seg(2, 6) {
		t.Fatalf("missing %q, want %s: only timeline 2's copy holds the WAL past the switch", m, seg(2, 6))
	}
	b.put(b.layout.RangeKey(seg(2, 6), 0, 0x2000, ".zst"))
	if m := b.missing(c); m != "00000002.history" {
		t.Fatalf("timeline 2's ranges reach the end, its history is not there: missing %q", m)
	}
	b.put(b.layout.Key("00000002.history", ".zst"))
	if m := b.missing(c); m != "" {
		t.Fatalf("timeline 2's ranges reach the end: missing %q", m)
	}

	// The switch inside segment 5, the end in segment 7.
	b = newWALBucket(t)
	hist = []pipeline.HistoryEntry{{Parent: 1, Switch: 5<<20 + 300}}
	end = 7<<20 + 5000
	b.put(b.layout.Key(seg(1, 3), ".zst"))
	b.put(b.layout.Key(seg(1, 4), ".zst"))
	b.put(b.layout.Key(seg(1, 5)+".partial", ".zst"))
	b.put(b.layout.Key(seg(1, 6), ".zst")) // an old primary archiving on after the failover
	b.put(b.layout.Key(seg(2, 6), ".zst"))
	b.put(b.layout.Key(seg(2, 7), ".zst"))
	c = newWALCheck(b.fs, b.layout, testSys, mb, mustPath(t, 1, 2, hist), start, end)
	if m := b.missing(c); m != seg(2, 5) {
		t.Fatalf("missing %q, want %s", m, seg(2, 5))
	}
	b.put(b.layout.Key(seg(2, 5), ".zst"))
	b.put(b.layout.Key("00000002.history", ""))
	if m := b.missing(c); m != "" {
		t.Fatalf("missing %q", m)
	}
}

// A backup across two switches (review finding 6) needs the middle
// timeline's segments, and finds them.
func TestWALCheckMiddleTimeline(t *testing.T) {
	b := newWALBucket(t)
	hist := []pipeline.HistoryEntry{{Parent: 1, Switch: 5 << 20}, {Parent: 2, Switch: 6 << 20}}
	start, end := pipeline.LSN(3<<20+100), pipeline.LSN(6<<20+5000)
	b.put(b.layout.Key(seg(1, 3), ".zst"))
	b.put(b.layout.Key(seg(1, 4), ".zst"))
	b.put(b.layout.Key(seg(2, 5), ".zst"))
	b.put(b.layout.Key(seg(3, 6), ".zst"))
	b.put(b.layout.Key("00000002.history", ".zst"))
	c := newWALCheck(b.fs, b.layout, testSys, mb, mustPath(t, 1, 3, hist), start, end)
	if m := b.missing(c); m != "00000003.history" {
		t.Fatalf("missing %q, want the end timeline's history", m)
	}
	b.put(b.layout.Key("00000003.history", ".zst"))
	if m := b.missing(c); m != "" {
		t.Fatalf("missing %q", m)
	}
	// A path that does not lead from the start timeline is refused.
	if _, err := timelinePath(2, 4, []pipeline.HistoryEntry{{Parent: 1, Switch: 5 << 20}, {Parent: 3, Switch: 6 << 20}}); err == nil {
		t.Fatal("timeline 2 is not an ancestor of 4 in that history, but the path was accepted")
	}
	// Starting on the middle timeline: timeline 1 is not on the path.
	p := mustPath(t, 2, 3, hist)
	if len(p) != 2 || p[0].tli != 2 || p[1].tli != 3 {
		t.Fatalf("path %+v", p)
	}
}

// After the catalogue is written, a backup whose start marker or chunks a
// prune removed meanwhile is not complete (review finding 5a).
func TestStillThere(t *testing.T) {
	b := newWALBucket(t)
	ctx := context.Background()
	s := &state{t: &Taker{sink: b.fs}, layout: b.layout, id: "20261129T210000Z"}
	pre := b.layout.BackupPrefix()
	cat := &backup.Catalog{
		Archives: []backup.Archive{{Name: backup.ArchiveBase, Chunks: []backup.Chunk{{Key: backup.ChunkKey(pre, s.id, "base", 0, ".zst")}}}},
		Manifest: backup.Archive{Name: backup.ArchiveManifest, Chunks: []backup.Chunk{{Key: backup.ChunkKey(pre, s.id, "manifest", 0, ".zst")}}},
	}
	if err := s.stillThere(ctx, cat); err == nil {
		t.Fatal("nothing in the bucket, but the backup was still there")
	}
	b.put(backup.StartedKey(pre, s.id))
	b.put(cat.Archives[0].Chunks[0].Key)
	if err := s.stillThere(ctx, cat); err == nil {
		t.Fatal("the manifest chunk is gone, but the backup was still there")
	}
	b.put(cat.Manifest.Chunks[0].Key)
	if err := s.stillThere(ctx, cat); err != nil {
		t.Fatal(err)
	}
}
