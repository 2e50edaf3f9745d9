package unpack

import (
	"context"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/walship/walship/pipeline"
	"github.com/walship/walship/pipeline/backup"
	"github.com/walship/walship/sinks"
	filesink "github.com/walship/walship/sinks/file"
)

// putCatalog stores a catalogue (no chunks: Find reads catalogues only).
func putCatalog(t *testing.T, sink sinks.Sink, key, id string, tli uint32, end pipeline.LSN, endTime time.Time) {
	t.Helper()
	a := func(name string) backup.Archive {
		return backup.Archive{Name: name, Size: 1, SHA256: "x", Chunks: []backup.Chunk{{Key: "k", Size: 1}}}
	}
	c := backup.Catalog{V: 1, ID: id, Server: "db1", SystemID: "1", SegSize: 1 << 20, Timeline: 1, EndTimeline: tli,
		StartLSN: end - 0x100, EndLSN: end, EndTime: endTime, Codec: "zstd",
		Archives: []backup.Archive{a(backup.ArchiveBase)}, Manifest: a(backup.ArchiveManifest)}
	b, err := c.Encode()
	if err != nil {
		t.Fatal(err)
	}
	if err := sink.Put(context.Background(), key, b, sinks.Metadata{}); err != nil {
		t.Fatal(err)
	}
}

// latest is the backup that ends last in the WAL (timeline, then LSN),
// not the one whose ID (the backup host's clock) is greatest; a catalogue
// under a directory that is not an ID is reported among the skipped.
func TestFindLatestByWALPosition(t *testing.T) {
	sink, err := filesink.New(filepath.Join(t.TempDir(), "archive"))
	if err != nil {
		t.Fatal(err)
	}
	at := time.Date(2026, 11, 29, 21, 0, 0, 0, time.UTC)
	cat := func(id string, tli uint32, end pipeline.LSN) {
		putCatalog(t, sink, backup.CatalogKey(prefix, id), id, tli, end, at)
	}
	cat("20261129T210000Z", 1, 0x3000100)
	cat("20261201T210000Z", 1, 0x4000100) // taken on a host whose clock runs two days ahead
	cat("20261129T220000Z", 1, 0x5000100) // the newest in the WAL
	odd := prefix + "20261129T230000.500Z/" + backup.CatalogFile
	putCatalog(t, sink, odd, "20261129T230000Z", 1, 0x6000100, at)

	got, skipped, err := Find(context.Background(), sink, prefix, "latest")
	if err != nil {
		t.Fatal(err)
	}
	if got.ID != "20261129T220000Z" {
		t.Errorf("latest = %s, want 20261129T220000Z (the highest end LSN)", got.ID)
	}
	if len(skipped) != 1 || !strings.Contains(skipped[0], odd) {
		t.Errorf("skipped = %q, want the catalogue %s", skipped, odd)
	}

	// A later timeline is newer than any LSN on an earlier one.
	cat("20261129T200000Z", 2, 0x3800000)
	if got, _, err := Find(context.Background(), sink, prefix, "latest"); err != nil || got.ID != "20261129T200000Z" {
		t.Errorf("latest = %s, %v; want 20261129T200000Z (ends on timeline 2)", got.ID, err)
	}
}
