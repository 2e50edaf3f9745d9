package e2e

import (
	"archive/tar"
	"bufio"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/walship/walship/compress"
	"github.com/walship/walship/pipeline"
	"github.com/walship/walship/pipeline/backup"
	"github.com/walship/walship/sinks"
	s3sink "github.com/walship/walship/sinks/s3"
)

// fixtureOpts shape a fixture backup.
type fixtureOpts struct {
	Layout     string // default barman-cloud
	ChunkSize  int    // raw bytes per chunk; default 256 KiB
	Incomplete bool   // started.json and the chunks, but no catalogue
	ID         string // default: from backup_label's START TIME
	// NoWALWait skips waiting for the running walship to archive the WAL
	// up to the backup's end before the catalogue is written.
	NoWALWait bool
}

// putFixtureBackup puts a base backup of st.pg into st's bucket exactly
// as the catalogue describes one (pipeline/backup), without `walship
// backup`: pg_basebackup -Ft -X none --manifest-checksums=CRC32C, each
// tar (base, <oid> per tablespace) and backup_manifest split into chunks,
// each chunk compressed with zstd as the archiver does and put with the
// sink API (put-if-absent, SHA-256 of the raw bytes in the metadata);
// started.json first and backup.json last, once walship (which must be
// streaming st.pg) has archived the WAL up to the backup's end.
func putFixtureBackup(t testing.TB, st *stack, o fixtureOpts) backup.Catalog {
	t.Helper()
	if o.Layout == "" {
		o.Layout = "barman-cloud"
	}
	if o.ChunkSize == 0 {
		o.ChunkSize = 256 << 10
	}
	ctx := context.Background()
	dir := st.pg.BaseBackupTar("--manifest-checksums=CRC32C", "-c", "fast")
	endTime := time.Now().UTC()

	label := tarFile(t, filepath.Join(dir, "base.tar"), "backup_label")
	startLSN, _ := pipeline.ParseLSN(labelField(t, label, "START WAL LOCATION"))
	startTime, err := time.Parse("2006-01-02 15:04:05 MST", labelField(t, label, "START TIME"))
	if err != nil {
		t.Fatalf("backup_label START TIME: %v", err)
	}
	manifest, err := os.ReadFile(filepath.Join(dir, "backup_manifest"))
	if err != nil {
		t.Fatal(err)
	}
	var m struct {
		Ranges []struct {
			Timeline uint32 `json:"Timeline"`
			Start    string `json:"Start-LSN"`
			End      string `json:"End-LSN"`
		} `json:"WAL-Ranges"`
		Checksum string `json:"Manifest-Checksum"`
	}
	if err := json.Unmarshal(manifest, &m); err != nil || len(m.Ranges) == 0 {
		t.Fatalf("backup_manifest: %v (%d WAL ranges)", err, len(m.Ranges))
	}
	endLSN, _ := pipeline.ParseLSN(m.Ranges[0].End)
	id := o.ID
	if id == "" {
		id = backup.NewID(startTime)
	}

	sink := fixtureSink(t, st)
	layout, err := sinks.NewLayout(o.Layout, st.prefix, st.server)
	if err != nil {
		t.Fatal(err)
	}
	prefix := layout.BackupPrefix()
	sysID := st.pg.QueryString(`SELECT system_identifier::text FROM pg_control_system()`)
	tli := m.Ranges[0].Timeline
	putJSON := func(key string, v any) {
		b, err := json.MarshalIndent(v, "", "  ")
		if err != nil {
			t.Fatal(err)
		}
		sum := sha256.Sum256(b)
		if err := sink.Put(ctx, key, b, sinks.Metadata{SHA256: hex.EncodeToString(sum[:]), SystemID: sysID, Codec: "none", RawSize: int64(len(b))}); err != nil {
			t.Fatalf("put %s: %v", key, err)
		}
	}
	putJSON(backup.StartedKey(prefix, id), backup.Started{V: backup.CatalogVersion, ID: id, Server: st.server, SystemID: sysID,
		Timeline: tli, StartLSN: startLSN, StartTime: startTime})

	enc, err := compress.NewEncoder(compress.Zstd, 0)
	if err != nil {
		t.Fatal(err)
	}
	var size, stored int64
	putArchive := func(name, file string) backup.Archive {
		f, err := os.Open(filepath.Join(dir, file))
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		whole := sha256.New()
		a := backup.Archive{Name: name}
		part := make([]byte, o.ChunkSize)
		for seq := 0; ; seq++ {
			n, err := io.ReadFull(f, part)
			if err == io.EOF && seq > 0 {
				break
			}
			if err != nil && err != io.ErrUnexpectedEOF && err != io.EOF {
				t.Fatal(err)
			}
			raw := part[:n]
			whole.Write(raw)
			body, err := enc.Encode(raw)
			if err != nil {
				t.Fatal(err)
			}
			sum := sha256.Sum256(raw)
			key := backup.ChunkKey(prefix, id, name, seq, compress.Zstd.Ext())
			meta := sinks.Metadata{SHA256: hex.EncodeToString(sum[:]), StartLSN: startLSN.String(), EndLSN: startLSN.String(),
				Timeline: tli, SystemID: sysID, Codec: string(compress.Zstd), RawSize: int64(n)}
			if err := sink.Put(ctx, key, body, meta); err != nil {
				t.Fatalf("put %s: %v", key, err)
			}
			a.Chunks = append(a.Chunks, backup.Chunk{Seq: seq, Key: key, Size: int64(n), SHA256: meta.SHA256, StoredSize: int64(len(body))})
			a.Size += int64(n)
			stored += int64(len(body))
			if n < o.ChunkSize {
				break
			}
		}
		a.SHA256 = hex.EncodeToString(whole.Sum(nil))
		if name != backup.ArchiveManifest {
			size += a.Size
		}
		return a
	}
	archives := []backup.Archive{putArchive(backup.ArchiveBase, "base.tar")}
	locations := map[string]string{}
	for _, line := range strings.Split(st.pg.QueryString(`SELECT string_agg(oid::text || '=' || pg_tablespace_location(oid), E'\n') FROM pg_tablespace WHERE spcname NOT IN ('pg_default', 'pg_global')`), "\n") {
		if oid, loc, ok := strings.Cut(line, "="); ok {
			locations[oid] = loc
		}
	}
	oids := make([]string, 0, len(locations))
	for oid := range locations {
		oids = append(oids, oid)
	}
	sort.Strings(oids)
	for _, oid := range oids {
		a := putArchive(oid, oid+".tar")
		a.Location = locations[oid]
		archives = append(archives, a)
	}
	man := putArchive(backup.ArchiveManifest, "backup_manifest")
	cat := backup.Catalog{V: backup.CatalogVersion, ID: id, Server: st.server, SystemID: sysID, SegSize: uint64(segSize),
		Timeline: tli, StartLSN: startLSN, EndLSN: endLSN, EndTimeline: m.Ranges[len(m.Ranges)-1].Timeline,
		StartTime: startTime, EndTime: endTime, Label: "fixture", Codec: string(compress.Zstd),
		Archives: archives, Manifest: man, ManifestChecksum: m.Checksum, Size: size, StoredSize: stored}
	if _, err := fmt.Sscan(st.pg.QueryString(`SHOW server_version_num`), &cat.PGVersion); err != nil {
		t.Fatal(err)
	}
	if err := cat.Validate(); err != nil {
		t.Fatal(err)
	}
	if o.Incomplete {
		return cat
	}
	if !o.NoWALWait {
		end := st.switchWAL()
		waitFor(t, 60*time.Second, "the backup's WAL archived", func() bool { return st.replFlush() >= max(end, endLSN) })
	}
	putJSON(backup.CatalogKey(prefix, id), cat)
	return cat
}

// fixtureSink is the sink API on st's bucket (the S3 credentials are set
// in the test's environment).
func fixtureSink(t testing.TB, st *stack) *s3sink.Sink {
	t.Helper()
	st.s3.SetEnv(t)
	sink, err := s3sink.New(context.Background(), s3sink.Options{Bucket: st.s3.Bucket, Endpoint: st.s3.Endpoint(), PathStyle: true})
	if err != nil {
		t.Fatal(err)
	}
	return sink
}

// tarFile returns one file of a tar archive.
func tarFile(t testing.TB, path, name string) string {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	tr := tar.NewReader(bufio.NewReader(f))
	for {
		h, err := tr.Next()
		if err != nil {
			t.Fatalf("%s in %s: %v", name, path, err)
		}
		if h.Name == name {
			b, err := io.ReadAll(tr)
			if err != nil {
				t.Fatal(err)
			}
			return string(b)
		}
	}
}

// labelField is a backup_label field's value up to its first blank
// ("START WAL LOCATION: 0/2000028 (file ...)" -> "0/2000028"); START TIME
// keeps its date, time and zone.
func labelField(t testing.TB, label, field string) string {
	t.Helper()
	for _, line := range strings.Split(label, "\n") {
		if v, ok := strings.CutPrefix(line, field+": "); ok {
			if field == "START TIME" {
				return v
			}
			return strings.Fields(v)[0]
		}
	}
	t.Fatalf("backup_label has no %s:\n%s", field, label)
	return ""
}
