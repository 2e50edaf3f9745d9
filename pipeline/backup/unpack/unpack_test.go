package unpack

import (
	"archive/tar"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"filippo.io/age"

	"github.com/walship/walship/compress"
	"github.com/walship/walship/crypt"
	"github.com/walship/walship/pipeline/backup"
	"github.com/walship/walship/pipeline/restore"
	"github.com/walship/walship/sinks"
	filesink "github.com/walship/walship/sinks/file"
)

type entry struct {
	name, link string
	typ        byte
	body       string
	mode       int64
}

func makeTar(t *testing.T, entries []entry) []byte {
	t.Helper()
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, e := range entries {
		h := &tar.Header{Name: e.name, Typeflag: e.typ, Linkname: e.link, Mode: e.mode, Size: int64(len(e.body)), ModTime: time.Unix(0, 0)}
		if h.Mode == 0 {
			h.Mode = 0o600
		}
		if e.typ != tar.TypeReg {
			h.Size = 0
		}
		if err := tw.WriteHeader(h); err != nil {
			t.Fatal(err)
		}
		if e.typ == tar.TypeReg {
			tw.Write([]byte(e.body))
		}
	}
	tw.Close()
	return buf.Bytes()
}

// makeManifest writes a backup_manifest of files (path -> contents) with
// CRC32C checksums and a correct Manifest-Checksum, as PostgreSQL does.
func makeManifest(files map[string]string, override map[string]string) []byte {
	var b strings.Builder
	b.WriteString("{ \"PostgreSQL-Backup-Manifest-Version\": 1,\n\"Files\": [\n")
	first := true
	for p, body := range files {
		c, _ := newChecksum("CRC32C")
		c.Write([]byte(body))
		sum := c.hex()
		if o, ok := override[p]; ok {
			sum = o
		}
		if !first {
			b.WriteString(",\n")
		}
		first = false
		fmt.Fprintf(&b, `{ "Path": %q, "Size": %d, "Last-Modified": "2026-11-29 21:00:00 GMT", "Checksum-Algorithm": "CRC32C", "Checksum": %q }`, p, len(body), sum)
	}
	b.WriteString("\n],\n\"WAL-Ranges\": [\n{ \"Timeline\": 1, \"Start-LSN\": \"0/2000028\", \"End-LSN\": \"0/2000100\" }\n],\n")
	s := sha256.Sum256([]byte(b.String()))
	fmt.Fprintf(&b, "\"Manifest-Checksum\": \"%s\"}\n", hex.EncodeToString(s[:]))
	return []byte(b.String())
}

// putBackup stores archives (name -> bytes; "base" first, then
// tablespaces with their locations) and the manifest as chunks of size
// chunk, and the catalogue unless incomplete.
func putBackup(t *testing.T, sink sinks.Sink, prefix, id string, chunk int, base []byte, ts map[string][]byte, locs map[string]string, manifest []byte, incomplete bool, encrypt ...*crypt.Encrypter) backup.Catalog {
	t.Helper()
	ctx := context.Background()
	enc, _ := compress.NewEncoder(compress.Zstd, 0)
	put := func(name string, raw []byte) backup.Archive {
		sum := sha256.Sum256(raw)
		a := backup.Archive{Name: name, Size: int64(len(raw)), SHA256: hex.EncodeToString(sum[:]), Location: locs[name]}
		for seq := 0; seq == 0 || seq*chunk < len(raw); seq++ {
			part := raw[seq*chunk : min((seq+1)*chunk, len(raw))]
			body, _ := enc.Encode(part)
			body = append([]byte(nil), body...)
			scheme := ""
			if len(encrypt) > 0 {
				e, err := encrypt[0].Encrypt(body)
				if err != nil {
					t.Fatal(err)
				}
				body, scheme = append([]byte(nil), e...), crypt.Scheme
			}
			s := sha256.Sum256(part)
			key := backup.ChunkKey(prefix, id, name, seq, ".zst")
			if err := sink.Put(ctx, key, body, sinks.Metadata{SHA256: hex.EncodeToString(s[:]), Codec: "zstd", RawSize: int64(len(part)), Encryption: scheme}); err != nil {
				t.Fatal(err)
			}
			a.Chunks = append(a.Chunks, backup.Chunk{Seq: seq, Key: key, Size: int64(len(part)), SHA256: hex.EncodeToString(s[:]), StoredSize: int64(len(body))})
		}
		return a
	}
	cat := backup.Catalog{V: 1, ID: id, Server: "db1", SystemID: "1", SegSize: 1 << 20, Timeline: 1, EndTimeline: 1, StartLSN: 0x2000028, EndLSN: 0x2000100, Codec: "zstd"}
	if len(encrypt) > 0 {
		cat.Encryption = crypt.Scheme
	}
	cat.Archives = []backup.Archive{put("base", base)}
	for name, raw := range ts {
		cat.Archives = append(cat.Archives, put(name, raw))
	}
	cat.Manifest = put("manifest", manifest)
	if err := sink.Put(ctx, backup.StartedKey(prefix, id), []byte("{}"), sinks.Metadata{}); err != nil {
		t.Fatal(err)
	}
	if !incomplete {
		b, _ := cat.Encode()
		if err := sink.Put(ctx, backup.CatalogKey(prefix, id), b, sinks.Metadata{}); err != nil {
			t.Fatal(err)
		}
	}
	return cat
}

const prefix = "p/db1/walship-backups/"

func baseFiles() map[string]string {
	return map[string]string{"PG_VERSION": "15\n", "backup_label": "START WAL LOCATION: 0/2000028\n", "global/pg_control": strings.Repeat("c", 8192),
		"base/1/1259": strings.Repeat("x", 70000), "tablespace_map": "16384 /srv/ts\n",
		"pg_tblspc/16384/PG_15_202209061/1/16385": strings.Repeat("t", 9000)}
}

func tars(t *testing.T, files map[string]string) (base, ts []byte) {
	base = makeTar(t, []entry{
		{name: "PG_VERSION", typ: tar.TypeReg, body: files["PG_VERSION"]},
		{name: "backup_label", typ: tar.TypeReg, body: files["backup_label"]},
		{name: "tablespace_map", typ: tar.TypeReg, body: files["tablespace_map"]},
		{name: "global", typ: tar.TypeDir, mode: 0o700},
		{name: "global/pg_control", typ: tar.TypeReg, body: files["global/pg_control"]},
		{name: "base/1", typ: tar.TypeDir, mode: 0o700},
		{name: "base/1/1259", typ: tar.TypeReg, body: files["base/1/1259"]},
		{name: "pg_wal", typ: tar.TypeDir, mode: 0o700},
		{name: "pg_tblspc", typ: tar.TypeDir, mode: 0o700},
	})
	ts = makeTar(t, []entry{
		{name: "PG_15_202209061", typ: tar.TypeDir, mode: 0o700},
		{name: "PG_15_202209061/1", typ: tar.TypeDir, mode: 0o700},
		{name: "PG_15_202209061/1/16385", typ: tar.TypeReg, body: files["pg_tblspc/16384/PG_15_202209061/1/16385"]},
	})
	return base, ts
}

func TestRestoreFileSink(t *testing.T) {
	dir := t.TempDir()
	sink, err := filesink.New(filepath.Join(dir, "archive"))
	if err != nil {
		t.Fatal(err)
	}
	files := baseFiles()
	base, ts := tars(t, files)
	locs := map[string]string{"16384": "/srv/ts"}
	good := putBackup(t, sink, prefix, "20261129T210000Z", 4096, base, map[string][]byte{"16384": ts}, locs, makeManifest(files, nil), false)
	// A newer backup that never completed, and a newer one whose files do
	// not match its manifest.
	putBackup(t, sink, prefix, "20261129T230000Z", 4096, base, map[string][]byte{"16384": ts}, locs, makeManifest(files, nil), true)
	bad := putBackup(t, sink, prefix, "20261129T220000Z", 4096, base, map[string][]byte{"16384": ts}, locs,
		makeManifest(files, map[string]string{"base/1/1259": "00000000"}), false)

	ctx := context.Background()
	cat, _, err := Find(ctx, sink, prefix, "latest")
	if err != nil || cat.ID != bad.ID {
		t.Fatalf("latest: %s, %v; want %s (the newest with a catalogue)", cat.ID, err, bad.ID)
	}
	if _, _, err := Find(ctx, sink, prefix, "20261129T230000Z"); !errors.Is(err, ErrIncomplete) || !strings.Contains(err.Error(), "is not complete (no catalogue)") {
		t.Errorf("incomplete by ID: %v", err)
	}
	if _, _, err := Find(ctx, sink, prefix, "20261129T000000Z"); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("missing by ID: %v", err)
	}

	tsDir := filepath.Join(dir, "newts")
	opts := Options{Sink: sink, Jobs: 3, Tablespaces: map[string]string{"/srv/ts": tsDir}}
	// The manifest disagrees with base/1/1259: refused, named, marked.
	if _, err := Restore(ctx, opts, bad, filepath.Join(dir, "bad")); !errors.Is(err, ErrVerify) || !strings.Contains(err.Error(), "base/1/1259") {
		t.Errorf("restore against a mismatching manifest: %v", err)
	}
	if _, err := os.Stat(filepath.Join(dir, "bad", FailedFile)); err != nil {
		t.Errorf("failed restore not marked: %v", err)
	}
	// The tablespace directory is not empty any more: refused.
	if _, err := Restore(ctx, opts, good, filepath.Join(dir, "good")); !errors.Is(err, ErrTarget) {
		t.Errorf("restore into a used tablespace directory: %v", err)
	}
	os.RemoveAll(tsDir)
	res, err := Restore(ctx, opts, good, filepath.Join(dir, "good"))
	if err != nil {
		t.Fatal(err)
	}
	if res.Files != 6 {
		t.Errorf("%d files restored, want 6", res.Files)
	}
	for p, body := range files {
		path := filepath.Join(dir, "good", p)
		if rest, ok := strings.CutPrefix(p, "pg_tblspc/16384/"); ok {
			path = filepath.Join(tsDir, rest)
		}
		got, err := os.ReadFile(path)
		if p == "tablespace_map" {
			body = "16384 " + tsDir + "\n"
		}
		if err != nil || string(got) != body {
			t.Errorf("%s: %q, %v", p, got, err)
		}
	}
	if fi, err := os.Stat(filepath.Join(dir, "good", "global", "pg_control")); err != nil || fi.Mode().Perm() != 0o600 {
		t.Errorf("pg_control mode: %v %v", fi.Mode(), err)
	}
	if _, err := os.Stat(filepath.Join(dir, "good", "backup_manifest")); err != nil {
		t.Error(err)
	}
	// Into a non-empty directory: refused.
	if _, err := Restore(ctx, Options{Sink: sink}, good, filepath.Join(dir, "good")); !errors.Is(err, ErrTarget) {
		t.Errorf("restore into a non-empty directory: %v", err)
	}

	// A catalogue whose archive SHA-256 disagrees with its chunks'.
	wrong := good
	wrong.Archives = append([]backup.Archive(nil), good.Archives...)
	wrong.Archives[0].SHA256 = strings.Repeat("0", 64)
	os.RemoveAll(tsDir)
	if _, err := Restore(ctx, opts, wrong, filepath.Join(dir, "wrongsum")); !errors.Is(err, restore.ErrCorrupt) || !strings.Contains(err.Error(), "archive base") {
		t.Errorf("archive SHA-256 mismatch: %v", err)
	}

	// A chunk replaced by other valid zstd bytes (same metadata): refused by its key.
	victim := good.Archives[0].Chunks[2]
	enc, _ := compress.NewEncoder(compress.Zstd, 0)
	body, _ := enc.Encode(bytes.Repeat([]byte("z"), int(victim.Size)))
	os.WriteFile(filepath.Join(dir, "archive", victim.Key), body, 0o644)
	os.RemoveAll(tsDir)
	if _, err := Restore(ctx, opts, good, filepath.Join(dir, "corrupt")); !errors.Is(err, restore.ErrCorrupt) || !strings.Contains(err.Error(), victim.Key) {
		t.Errorf("corrupt chunk: %v", err)
	}
}

func TestExtractRefusesUnsafeEntries(t *testing.T) {
	for _, tc := range []struct {
		name string
		e    []entry
	}{
		{"dotdot", []entry{{name: "../evil", typ: tar.TypeReg, body: "x"}}},
		{"absolute", []entry{{name: "/etc/evil", typ: tar.TypeReg, body: "x"}}},
		{"inner dotdot", []entry{{name: "base/../../evil", typ: tar.TypeReg, body: "x"}}},
		{"symlink elsewhere", []entry{{name: "base/link", typ: tar.TypeSymlink, link: "/etc"}}},
		{"relative tablespace link", []entry{{name: "pg_tblspc/16384", typ: tar.TypeSymlink, link: "../x"}}},
		{"through a tablespace link", []entry{{name: "pg_tblspc/16384", typ: tar.TypeSymlink, link: "/tmp"}, {name: "pg_tblspc/16384/evil", typ: tar.TypeReg, body: "x"}}},
		{"hard link", []entry{{name: "a", typ: tar.TypeReg, body: "x"}, {name: "b", typ: tar.TypeLink, link: "a"}}},
		{"device", []entry{{name: "dev", typ: tar.TypeChar}}},
		{"twice", []entry{{name: "a", typ: tar.TypeReg, body: "x"}, {name: "a", typ: tar.TypeReg, body: "y"}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			root := t.TempDir()
			x := &extractor{root: root, base: true, v: newVerifier(&Manifest{}), linkTarget: func(_, t string) string { return filepath.Join(root, "..", "ts") }}
			err := x.run(bytes.NewReader(makeTar(t, tc.e)))
			if err == nil {
				t.Fatal("extracted")
			}
			if _, serr := os.Stat(filepath.Join(root, "..", "evil")); serr == nil {
				t.Fatal("wrote outside the target")
			}
		})
	}
}

func TestManifestChecksum(t *testing.T) {
	m := makeManifest(map[string]string{"a": "b"}, nil)
	if _, err := ParseManifest(m); err != nil {
		t.Fatal(err)
	}
	bad := bytes.Replace(m, []byte(`"Size": 1`), []byte(`"Size": 2`), 1)
	if _, err := ParseManifest(bad); !errors.Is(err, ErrVerify) {
		t.Errorf("tampered manifest: %v", err)
	}
}

func TestTablespaceMapRoundTrip(t *testing.T) {
	in := []byte("16384 /srv/ts\n16390 /srv/odd\\\\dir\\\nname\n")
	oids, paths, err := parseTablespaceMap(in)
	if err != nil || len(oids) != 2 || paths[1] != "/srv/odd\\dir\nname" {
		t.Fatalf("%q %q %v", oids, paths, err)
	}
	if out := formatTablespaceMap(oids, paths); !bytes.Equal(out, in) {
		t.Errorf("%q != %q", out, in)
	}
}

// An encrypted backup restores with its identity, is refused without one,
// and a chunk swapped for a plaintext one is refused by name.
func TestRestoreEncrypted(t *testing.T) {
	dir := t.TempDir()
	sink, err := filesink.New(filepath.Join(dir, "archive"))
	if err != nil {
		t.Fatal(err)
	}
	id, err := age.GenerateX25519Identity()
	if err != nil {
		t.Fatal(err)
	}
	files := baseFiles()
	base, ts := tars(t, files)
	cat := putBackup(t, sink, prefix, "20261129T210000Z", 4096, base, map[string][]byte{"16384": ts}, map[string]string{"16384": "/srv/ts"},
		makeManifest(files, nil), false, crypt.NewEncrypter([]age.Recipient{id.Recipient()}))
	ctx := context.Background()
	opts := Options{Sink: sink, Tablespaces: map[string]string{"/srv/ts": filepath.Join(dir, "ts1")}}
	if _, err := Restore(ctx, opts, cat, filepath.Join(dir, "noid")); err == nil || !strings.Contains(err.Error(), "--decrypt-identity") {
		t.Errorf("encrypted without identity: %v", err)
	}
	opts.Identities = []age.Identity{id}
	if _, err := Restore(ctx, opts, cat, filepath.Join(dir, "ok")); err != nil {
		t.Fatalf("encrypted with its identity: %v", err)
	}
	got, _ := os.ReadFile(filepath.Join(dir, "ok", "base", "1", "1259"))
	if string(got) != files["base/1/1259"] {
		t.Error("encrypted restore: wrong bytes")
	}
	// A chunk replaced by its plaintext (compressed) twin, metadata without encryption.
	victim := cat.Archives[0].Chunks[1]
	enc, _ := compress.NewEncoder(compress.Zstd, 0)
	body, _ := enc.Encode(base[4096:8192])
	sink.Delete(ctx, victim.Key)
	if err := sink.Put(ctx, victim.Key, body, sinks.Metadata{SHA256: victim.SHA256, Codec: "zstd", RawSize: victim.Size}); err != nil {
		t.Fatal(err)
	}
	opts.Tablespaces = map[string]string{"/srv/ts": filepath.Join(dir, "ts2")}
	if _, err := Restore(ctx, opts, cat, filepath.Join(dir, "plain")); !errors.Is(err, restore.ErrCorrupt) || !strings.Contains(err.Error(), victim.Key) || !strings.Contains(err.Error(), "plaintext") {
		t.Errorf("plaintext chunk in an encrypted backup: %v", err)
	}
}

// Recovery settings the backup carries (its server was itself restored)
// are commented out; walship's are appended.
func TestWriteRecovery(t *testing.T) {
	dir := t.TempDir()
	os.WriteFile(filepath.Join(dir, "postgresql.auto.conf"), []byte("# Do not edit this file manually!\nwork_mem = '8MB'\nrestore_command = 'old'\nrecovery_target_name = 'x'\n"), 0o600)
	if err := WriteRecovery(dir, "20261129T210000Z", []string{"restore_command = 'new'"}); err != nil {
		t.Fatal(err)
	}
	got, _ := os.ReadFile(filepath.Join(dir, "postgresql.auto.conf"))
	for _, want := range []string{"\nwork_mem = '8MB'\n", "\n# (walship restore) restore_command = 'old'\n", "\n# (walship restore) recovery_target_name = 'x'\n", "\nrestore_command = 'new'\n"} {
		if !strings.Contains(string(got), want) {
			t.Errorf("postgresql.auto.conf lacks %q:\n%s", want, got)
		}
	}
	if _, err := os.Stat(filepath.Join(dir, "recovery.signal")); err != nil {
		t.Error(err)
	}
}

// flaky fails every object's first two reads as an unreachable store
// does (a fault injected in front of the real file sink).
type flaky struct {
	Store
	mu    sync.Mutex
	fails map[string]int
}

func (f *flaky) Get(ctx context.Context, key string) (io.ReadCloser, sinks.Metadata, error) {
	f.mu.Lock()
	f.fails[key]++
	n := f.fails[key]
	f.mu.Unlock()
	if n <= 2 {
		return nil, sinks.Metadata{}, fmt.Errorf("dial tcp 127.0.0.1:9000: connect: connection refused")
	}
	return f.Store.Get(ctx, key)
}

// Transient errors are retried within RetryFor; past it, the restore fails
// naming the chunk.
func TestRestoreRetriesTransientErrors(t *testing.T) {
	dir := t.TempDir()
	fs, err := filesink.New(filepath.Join(dir, "archive"))
	if err != nil {
		t.Fatal(err)
	}
	files := baseFiles()
	base, ts := tars(t, files)
	cat := putBackup(t, fs, prefix, "20261129T210000Z", 16384, base, map[string][]byte{"16384": ts}, map[string]string{"16384": "/srv/ts"}, makeManifest(files, nil), false)
	ctx := context.Background()
	sink := &flaky{Store: fs, fails: map[string]int{}}
	opts := Options{Sink: sink, Tablespaces: map[string]string{"/srv/ts": filepath.Join(dir, "ts1")}}
	if _, err := Restore(ctx, opts, cat, filepath.Join(dir, "ok")); err != nil {
		t.Fatalf("restore through transient errors: %v", err)
	}
	sink.fails = map[string]int{}
	opts.RetryFor = time.Millisecond
	opts.Tablespaces = map[string]string{"/srv/ts": filepath.Join(dir, "ts2")}
	if _, err := Restore(ctx, opts, cat, filepath.Join(dir, "short")); err == nil || !strings.Contains(err.Error(), cat.Manifest.Chunks[0].Key) {
		t.Errorf("restore past RetryFor: %v", err)
	}
}
