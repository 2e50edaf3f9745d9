package e2e

import (
	"archive/tar"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"io"
	"os"
	"os/exec"
	"os/user"
	"path"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/s3"

	"github.com/walship/walship/internal/testenv"
	"github.com/walship/walship/pipeline"
	"github.com/walship/walship/pipeline/backup"
)

// backupArgs are `walship backup`'s flags for the stack, its S3 reached
// at endpoint.
func (st *stack) backupArgs(endpoint string, extra ...string) []string {
	a := []string{"backup", "--pg", st.pg.URL("postgres"), "--server", st.server, "--nats", st.nats.URL(),
		"--dest", "s3://" + st.s3.Bucket + "/" + st.prefix, "--s3-endpoint", endpoint, "--s3-path-style",
		"--data-dir", st.dataDir, "--log-level", "debug"}
	return append(a, extra...)
}

// backupCmd starts `walship backup`; its stdout (the backup ID) and its
// log are returned by the function it returns, which waits for it.
func backupCmd(t *testing.T, st *stack, args []string) (*exec.Cmd, func() (string, string, error)) {
	t.Helper()
	cmd := exec.Command(walshipBin, args...)
	cmd.Env = append(os.Environ(), st.env()...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	t.Cleanup(func() { cmd.Process.Kill() })
	return cmd, func() (string, string, error) {
		select {
		case err := <-done:
			return strings.TrimSpace(stdout.String()), stderr.String(), err
		case <-time.After(2 * time.Minute):
			cmd.Process.Kill()
			t.Fatalf("walship backup did not end within 2 minutes:\n%s", stderr.String())
			return "", "", nil
		}
	}
}

func (st *stack) backupPrefix() string { return st.prefix + "/" + st.server + "/walship-backups/" }

// getObject reads a key's stored bytes; a missing key is nil, false.
func (st *stack) getObject(key string) ([]byte, map[string]string, bool) {
	st.t.Helper()
	out, err := st.s3.Client().GetObject(context.Background(), &s3.GetObjectInput{Bucket: aws.String(st.s3.Bucket), Key: aws.String(key)})
	if err != nil {
		if strings.Contains(err.Error(), "NoSuchKey") || strings.Contains(err.Error(), "404") {
			return nil, nil, false
		}
		st.t.Fatalf("get %s: %v", key, err)
	}
	defer out.Body.Close()
	b, err := io.ReadAll(out.Body)
	if err != nil {
		st.t.Fatal(err)
	}
	return b, out.Metadata, true
}

// backupKeys lists the keys under a backup's prefix.
func (st *stack) backupKeys(id string) []string {
	st.t.Helper()
	var keys []string
	p := s3.NewListObjectsV2Paginator(st.s3.Client(), &s3.ListObjectsV2Input{Bucket: aws.String(st.s3.Bucket), Prefix: aws.String(st.backupPrefix() + id)})
	for p.HasMorePages() {
		page, err := p.NextPage(context.Background())
		if err != nil {
			st.t.Fatal(err)
		}
		for _, o := range page.Contents {
			keys = append(keys, *o.Key)
		}
	}
	return keys
}

// backupKeysOf lists every backup key of another server name.
func (st *stack) backupKeysOf(server string) []string {
	st.t.Helper()
	out, err := st.s3.Client().ListObjectsV2(context.Background(), &s3.ListObjectsV2Input{Bucket: aws.String(st.s3.Bucket),
		Prefix: aws.String(st.prefix + "/" + server + "/walship-backups/")})
	if err != nil {
		st.t.Fatal(err)
	}
	var keys []string
	for _, o := range out.Contents {
		keys = append(keys, *o.Key)
	}
	return keys
}

// readCatalog reads and validates a backup's catalogue.
func (st *stack) readCatalog(id string) backup.Catalog {
	st.t.Helper()
	body, meta, ok := st.getObject(st.backupPrefix() + id + "/backup.json")
	if !ok {
		st.t.Fatalf("backup %s has no catalogue", id)
	}
	sum := sha256.Sum256(body)
	if meta["walship-sha256"] != pipeline.SHA256Hex(sum[:]) {
		st.t.Errorf("catalogue metadata sha256 %q does not match its bytes", meta["walship-sha256"])
	}
	cat, err := backup.DecodeCatalog(body)
	if err != nil {
		st.t.Fatalf("catalogue: %v", err)
	}
	return cat
}

// archiveBytes downloads an archive's chunks, checks each decoded chunk
// against its SHA-256 (and its object's metadata), and returns the
// concatenation, checked against the archive's SHA-256.
func (st *stack) archiveBytes(a backup.Archive) []byte {
	st.t.Helper()
	var all []byte
	for _, ch := range a.Chunks {
		raw, meta := st.object(ch.Key)
		sum := sha256.Sum256(raw)
		if got := pipeline.SHA256Hex(sum[:]); got != ch.SHA256 || meta["walship-sha256"] != ch.SHA256 || int64(len(raw)) != ch.Size {
			st.t.Fatalf("chunk %s: sha256 %s, metadata %s, catalogue %s; %d bytes, catalogue %d", ch.Key, got, meta["walship-sha256"], ch.SHA256, len(raw), ch.Size)
		}
		all = append(all, raw...)
	}
	sum := sha256.Sum256(all)
	if pipeline.SHA256Hex(sum[:]) != a.SHA256 || int64(len(all)) != a.Size {
		st.t.Fatalf("archive %s: concatenated chunks do not match its sha256 and size", a.Name)
	}
	return all
}

// untar reads a tar stream into name -> content (regular files).
func untar(t *testing.T, b []byte) map[string][]byte {
	t.Helper()
	out := map[string][]byte{}
	r := tar.NewReader(bytes.NewReader(b))
	for {
		h, err := r.Next()
		if errors.Is(err, io.EOF) {
			return out
		}
		if err != nil {
			t.Fatalf("tar: %v (after %d entries)", err, len(out))
		}
		if h.Typeflag == tar.TypeReg {
			data, err := io.ReadAll(r)
			if err != nil {
				t.Fatal(err)
			}
			out[path.Clean(h.Name)] = data
		} else {
			out[path.Clean(h.Name)] = nil
		}
	}
}

// tablespaceDir makes an empty directory the cluster's OS user owns.
func tablespaceDir(t *testing.T) string {
	dir, err := os.MkdirTemp("", "walship-ts-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if os.Geteuid() == 0 {
		u, err := user.Lookup("postgres")
		if err != nil {
			t.Fatal(err)
		}
		uid, _ := strconv.Atoi(u.Uid)
		gid, _ := strconv.Atoi(u.Gid)
		os.Chown(dir, uid, gid)
	}
	return dir
}

// A backup of a server under load, with a second tablespace: walship
// backup exits 0 and prints the ID; the catalogue is valid; every chunk
// decodes to its SHA-256; the archives are tar streams holding PG_VERSION,
// backup_label (with the catalogue's start), tablespace_map and the
// tablespace's table byte for byte; the manifest lists them and carries
// the catalogue's checksum; the WAL from start to end is in the bucket.
func TestBackupTake(t *testing.T) {
	st := newStack(t)
	ts := tablespaceDir(t)
	st.pg.Exec(`CREATE TABLESPACE ts2 LOCATION '` + ts + `'`)
	st.pg.Exec(`CREATE TABLE in_ts2 (id int, v text) TABLESPACE ts2;
		INSERT INTO in_ts2 SELECT g, md5(g::text) FROM generate_series(1, 20000) g`)
	st.pg.Exec(`VACUUM (FREEZE) in_ts2`)
	st.pg.Exec(`CHECKPOINT`)
	if err := st.pg.Pgbench(context.Background(), "-i", "-s", "3", "-q"); err != nil {
		t.Fatal(err)
	}
	startWalship(t, st.env(), st.args("run", "--create-slot")...)
	ctx, stop := context.WithCancel(context.Background())
	wg := st.load(ctx, t)
	_, wait := backupCmd(t, st, st.backupArgs(st.s3.Endpoint(), "--chunk-size", "1MiB", "--label", "e2e take"))
	began := time.Now()
	id, log, err := wait()
	t.Logf("walship backup took %s", time.Since(began))
	if os.Getenv("WALSHIP_E2E_BACKUP_LOG") != "" {
		t.Log(log)
	}
	stop()
	wg.Wait()
	if err != nil {
		t.Fatalf("walship backup: %v\n%s", err, log)
	}
	if _, err := backup.ParseID(id); err != nil {
		t.Fatalf("stdout %q is not a backup ID: %v\n%s", id, err, log)
	}
	cat := st.readCatalog(id)
	if cat.ID != id || cat.Server != st.server || cat.Label != "e2e take" || cat.EndLSN <= cat.StartLSN || cat.Timeline != 1 || cat.PGVersion < 150000 {
		t.Fatalf("catalogue %+v", cat)
	}
	if _, _, ok := st.getObject(st.backupPrefix() + id + "/started.json"); !ok {
		t.Error("no started.json")
	}
	oid := st.pg.QueryString(`SELECT oid::text FROM pg_tablespace WHERE spcname = 'ts2'`)
	if len(cat.Archives) != 2 || cat.Archives[1].Name != oid || cat.Archives[1].Location != ts {
		t.Fatalf("archives %+v, want base and %s at %s", cat.Archives, oid, ts)
	}
	if len(cat.Archives[0].Chunks) < 2 {
		t.Errorf("base archive in %d chunks of 1 MiB", len(cat.Archives[0].Chunks))
	}
	base := untar(t, st.archiveBytes(cat.Archives[0]))
	for _, f := range []string{"PG_VERSION", "backup_label", "tablespace_map", "global/pg_control"} {
		if _, ok := base[f]; !ok {
			t.Errorf("base archive lacks %s", f)
		}
	}
	if !strings.Contains(string(base["backup_label"]), "START WAL LOCATION: "+cat.StartLSN.String()) ||
		!strings.Contains(string(base["backup_label"]), "LABEL: e2e take") {
		t.Errorf("backup_label does not match the catalogue's start %s:\n%s", cat.StartLSN, base["backup_label"])
	}
	if !strings.Contains(string(base["tablespace_map"]), oid+" "+ts) {
		t.Errorf("tablespace_map: %q", base["tablespace_map"])
	}
	// The tablespace's table, byte for byte as on disk (frozen, checkpointed).
	rel := st.pg.QueryString(`SELECT pg_relation_filepath('in_ts2')`) // pg_tblspc/<oid>/PG_15_x/<db>/<node>
	inTS := strings.TrimPrefix(rel, "pg_tblspc/"+oid+"/")
	tsFiles := untar(t, st.archiveBytes(cat.Archives[1]))
	onDisk, err := os.ReadFile(filepath.Join(ts, inTS))
	if err != nil {
		t.Fatal(err)
	}
	if got, ok := tsFiles[inTS]; !ok || len(onDisk) == 0 || !bytes.Equal(got, onDisk) {
		t.Errorf("tablespace archive: %s present %v, %d bytes, on disk %d", inTS, ok, len(got), len(onDisk))
	}
	var man struct {
		Files []struct {
			Path string `json:"Path"`
			Size int64  `json:"Size"`
		} `json:"Files"`
		Checksum string `json:"Manifest-Checksum"`
	}
	if err := json.Unmarshal(st.archiveBytes(cat.Manifest), &man); err != nil {
		t.Fatalf("manifest: %v", err)
	}
	if man.Checksum == "" || man.Checksum != cat.ManifestChecksum {
		t.Errorf("manifest checksum %q, catalogue %q", man.Checksum, cat.ManifestChecksum)
	}
	listed := map[string]int64{}
	for _, f := range man.Files {
		listed[f.Path] = f.Size
	}
	for _, f := range []string{"PG_VERSION", "backup_label", "tablespace_map", rel} {
		if _, ok := listed[f]; !ok {
			t.Errorf("manifest does not list %s", f)
		}
	}
	if listed[rel] != int64(len(onDisk)) {
		t.Errorf("manifest lists %s with %d bytes, the table has %d", rel, listed[rel], len(onDisk))
	}
	// The WAL from the backup's start to its end is in the bucket.
	have := st.archivedSegments()
	for no := pipeline.SegmentOf(1, cat.StartLSN, segSize).No; no <= pipeline.SegmentOf(1, cat.EndLSN-1, segSize).No; no++ {
		if _, ok := have[no]; !ok {
			t.Errorf("segment %s (between the backup's start %s and end %s) is not in the bucket", pipeline.Segment{Timeline: 1, No: no}.Name(segSize), cat.StartLSN, cat.EndLSN)
		}
	}
}

// A backup that cannot complete leaves no catalogue and exits non-zero:
// killed (SIGKILL) in the middle, with S3 unreachable past --timeout, or
// with its WAL never archived. The next backup succeeds.
func TestBackupIncomplete(t *testing.T) {
	st := newStack(t)
	if err := st.pg.Pgbench(context.Background(), "-i", "-s", "2", "-q"); err != nil {
		t.Fatal(err)
	}
	faulty := testenv.StartFaultyS3(t, st.s3)
	runArgs := st.args("run", "--create-slot")
	for i, a := range runArgs {
		if a == "--s3-endpoint" {
			runArgs[i+1] = faulty.Endpoint()
		}
	}
	startWalship(t, st.env(), runArgs...)
	slow := []string{"--chunk-size", "256KiB", "--max-rate", "2M", "--window", "2"}

	// PostgreSQL unreachable: one line, non-zero, nothing written.
	noPG := st.backupArgs(faulty.Endpoint())
	for i, a := range noPG {
		if a == "--pg" {
			noPG[i+1] = "postgres://postgres@127.0.0.1:" + strconv.Itoa(testenv.FreePort(t)) + "/postgres?sslmode=disable&connect_timeout=5"
		}
	}
	failsWith(t, st.env(), noPG, "127.0.0.1")

	chunksOf := func(id string) int {
		n := 0
		for _, k := range st.backupKeys(id) {
			if strings.Contains(k, "/base/") {
				n++
			}
		}
		return n
	}
	// startedID waits for a backup not seen before to write started.json.
	var seen []string
	startedID := func() string {
		var id string
		waitFor(t, 30*time.Second, "a new backup's started.json", func() bool {
			out, err := st.s3.Client().ListObjectsV2(context.Background(), &s3.ListObjectsV2Input{Bucket: aws.String(st.s3.Bucket), Prefix: aws.String(st.backupPrefix())})
			if err != nil {
				return false
			}
			for _, o := range out.Contents {
				rest, ok := strings.CutSuffix(strings.TrimPrefix(*o.Key, st.backupPrefix()), "/started.json")
				if ok && !slices.Contains(seen, rest) {
					id = rest
					return true
				}
			}
			return false
		})
		seen = append(seen, id)
		return id
	}

	// Killed in the middle, once some chunks are archived.
	cmd, wait := backupCmd(t, st, st.backupArgs(faulty.Endpoint(), slow...))
	killed := startedID()
	waitFor(t, 30*time.Second, "chunks of the backup in the bucket", func() bool { return chunksOf(killed) >= 2 })
	cmd.Process.Signal(syscall.SIGKILL)
	if _, _, err := wait(); err == nil {
		t.Fatal("a killed backup exited 0")
	}

	// S3 unreachable mid-backup, --timeout short.
	_, wait = backupCmd(t, st, st.backupArgs(faulty.Endpoint(), append(slow, "--timeout", "8s")...))
	failed := startedID()
	waitFor(t, 30*time.Second, "chunks of the backup in the bucket", func() bool { return chunksOf(failed) >= 1 })
	faulty.Fail.Store(true)
	out, log, err := wait()
	faulty.Fail.Store(false)
	if err == nil || out != "" {
		t.Fatalf("a backup with S3 down past its timeout exited %v, printed %q", err, out)
	}
	lines := strings.Split(strings.TrimSpace(log), "\n")
	t.Logf("the backup with S3 down ended: %s", lines[len(lines)-1])
	if last := lines[len(lines)-1]; !strings.HasPrefix(last, "walship: backup "+failed) || !strings.Contains(last, "--timeout") {
		t.Errorf("last line %q does not say which backup failed and why", last)
	}

	// WAL that never arrives: the chunks are archived, but no receiver
	// streams for this server name, so the backup is never complete.
	other := st.backupArgs(faulty.Endpoint(), "--timeout", "10s")
	for i, a := range other {
		if a == "--server" {
			other[i+1] = "nowal"
		}
	}
	_, wait = backupCmd(t, st, other)
	out, log, err = wait()
	lines = strings.Split(strings.TrimSpace(log), "\n")
	t.Logf("the backup without WAL ended: %s", lines[len(lines)-1])
	if err == nil || out != "" || !strings.Contains(lines[len(lines)-1], "is not in the bucket after --timeout 10s: is walship receive or run running for server nowal?") {
		t.Errorf("a backup whose WAL never arrives exited %v, printed %q", err, out)
	}
	if keys := st.backupKeysOf("nowal"); len(keys) < 2 || slices.ContainsFunc(keys, func(k string) bool { return strings.HasSuffix(k, "/backup.json") }) {
		t.Errorf("the backup without WAL left %v: want its chunks, no catalogue", keys)
	}

	// The next backup completes; neither failed one ever has a catalogue.
	_, wait = backupCmd(t, st, st.backupArgs(faulty.Endpoint(), "--chunk-size", "1MiB"))
	id, log, err := wait()
	if err != nil {
		t.Fatalf("the backup after the failures: %v\n%s", err, log)
	}
	cat := st.readCatalog(id)
	if len(cat.Archives) != 1 || cat.Archives[0].Size == 0 {
		t.Fatalf("catalogue %+v", cat)
	}
	st.archiveBytes(cat.Archives[0])
	for _, bad := range []string{killed, failed} {
		if _, _, ok := st.getObject(st.backupPrefix() + bad + "/backup.json"); ok {
			t.Errorf("incomplete backup %s has a catalogue", bad)
		}
	}
}

// walship backup's own flags: each mistake is one line naming the flag,
// exit non-zero, before anything is contacted.
func TestBackupBadInput(t *testing.T) {
	base := []string{"backup", "--nats", "nats://127.0.0.1:1", "--dest", "s3://bucket/prefix", "--s3-endpoint", "http://127.0.0.1:1"}
	for _, tc := range []struct {
		args    []string
		phrases []string
	}{
		{[]string{"backup", "--dest", "s3://b/p"}, []string{"--nats"}},
		{[]string{"backup", "--nats", "nats://127.0.0.1:1"}, []string{"--dest"}},
		{append(base, "--checkpoint", "now"), []string{"checkpoint", "fast or spread"}},
		{append(base, "--max-rate", "10"), []string{"--max-rate", "32 kB/s"}},
		{append(base, "--max-rate", "lots"), []string{"--max-rate"}},
		{append(base, "--chunk-size", "1"), []string{"chunk size", "64 KiB"}},
		{append(base, "--window", "0"), []string{"--window"}},
		{append(base, "--server", "a b"), []string{"--server"}},
		{append(base, "--timeout", "0s"), []string{"--timeout"}},
		{append(base, "--manifest-checksums", "md5"), []string{"manifest checksums"}},
		{append(base, "extra"), []string{"unexpected argument"}},
	} {
		failsWith(t, nil, tc.args, tc.phrases...)
	}
}
