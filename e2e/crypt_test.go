package e2e

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"filippo.io/age"
	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/s3"

	"github.com/walship/walship/pipeline"
)

// keyFiles writes age key files where the postgres user (restore_command)
// can read them, and returns their paths.
func keyFiles(t *testing.T, files map[string]string) map[string]string {
	t.Helper()
	dir, err := os.MkdirTemp("", "walship-keys-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	os.Chmod(dir, 0o755)
	out := map[string]string{}
	for name, content := range files {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
		out[name] = p
	}
	return out
}

// Issue 14, test 4: with a recipient, every WAL object in the bucket is
// age ciphertext — not a zstd frame, not WAL, without a marker the WAL
// holds in plain — and names its scheme in its metadata; recovery with
// fetch --decrypt-identity restores every row; a wrong identity, or none,
// makes fetch exit 255 and PostgreSQL abort recovery.
func TestEncryptedArchive(t *testing.T) {
	key, stranger := mustIdentity(t), mustIdentity(t)
	keys := keyFiles(t, map[string]string{
		"recipients": "# walship archive key\n" + key.Recipient().String() + "\n",
		"identity":   "# rotated keys stay here\n" + mustIdentity(t).String() + "\n" + key.String() + "\n",
		"wrong":      stranger.String() + "\n",
	})
	nonce := make([]byte, 8)
	rand.Read(nonce)
	marker := "WALSHIP-PLAINTEXT-MARKER-" + hex.EncodeToString(nonce)

	st := newStack(t)
	st.pg.Exec(`CREATE TABLE ledger (id serial primary key, note text)`)
	// --compression none: the ciphertext is the only thing between the
	// WAL and the bucket, so a plaintext marker would show.
	w := startWalship(t, st.env(), st.args("run", "--create-slot", "--compression", "none",
		"--encrypt-recipients-file", keys["recipients"])...)
	waitFor(t, 30*time.Second, "streaming", func() bool { return st.walsenderPID() != "" })
	first := uint64(segSize.Start(st.slotRestart())) / uint64(segSize)
	backup := st.pg.BaseBackup()
	const rows = 500
	st.pg.Exec(`INSERT INTO ledger (note) SELECT $1 || ' ' || g FROM generate_series(1, $2::int) g`, marker, rows)
	st.writeSegments(2)
	end := st.switchWAL()
	waitFor(t, 60*time.Second, "everything archived", func() bool { return st.replFlush() >= end })
	if err := w.stop(t); err != nil {
		t.Fatalf("walship exit: %v", err)
	}

	// The marker is in the server's WAL (so the test can fail), and in
	// none of the bucket's objects.
	inWAL := 0
	have := st.archivedSegments()
	for no := first; no < uint64(end)/uint64(segSize); no++ {
		name := pipeline.Segment{Timeline: 1, No: no}.Name(segSize)
		raw, err := os.ReadFile(filepath.Join(st.pg.WALDir(), name))
		if err != nil {
			t.Fatal(err)
		}
		if bytes.Contains(raw, []byte(marker)) {
			inWAL++
		}
		if have[no] == "" {
			t.Errorf("segment %s not archived", name)
		}
	}
	if inWAL == 0 {
		t.Fatal("the marker is in no segment of pg_wal: the test proves nothing")
	}
	walMagic := []byte{0x10, 0xd1} // XLOG_PAGE_MAGIC of PostgreSQL 15, little-endian
	for no, k := range have {
		body, err := os.ReadFile(filepath.Join(st.s3.Root, st.s3.Bucket, k))
		if err != nil {
			t.Fatal(err)
		}
		switch {
		case bytes.HasPrefix(body, []byte{0x28, 0xb5, 0x2f, 0xfd}):
			t.Errorf("%s is a zstd frame", k)
		case bytes.HasPrefix(body, walMagic):
			t.Errorf("%s is plain WAL", k)
		case !bytes.HasPrefix(body, []byte("age-encryption.org/v1\n")):
			t.Errorf("%s is not an age file: starts %q", k, body[:min(len(body), 24)])
		}
		if bytes.Contains(body, []byte(marker)) {
			t.Errorf("%s holds the plaintext marker", k)
		}
		if strings.Contains(string(body), key.String()) {
			t.Errorf("%s holds the private key", k)
		}
		_, meta := st.objectMeta(k)
		if meta["walship-encryption"] != "age" || meta["walship-sha256"] == "" {
			t.Errorf("segment %d: metadata %v, want walship-encryption: age and the raw sha256", no, meta)
		}
		for _, v := range meta {
			if strings.Contains(v, "AGE-SECRET-KEY") || strings.Contains(v, key.Recipient().String()) {
				t.Errorf("%s: metadata names a key: %v", k, meta)
			}
		}
	}

	flags := []string{"--dest", "s3://" + st.s3.Bucket + "/" + st.prefix, "--s3-endpoint", st.s3.Endpoint(), "--s3-path-style", "--server", st.server}
	seg := pipeline.Segment{Timeline: 1, No: first + 1}.Name(segSize)
	dest := filepath.Join(t.TempDir(), "RECOVERYXLOG")
	for _, c := range []struct {
		name  string
		extra []string
		want  string
	}{
		{"wrong identity", []string{"--decrypt-identity", keys["wrong"]}, "none of the identities can decrypt"},
		{"no identity", nil, "--decrypt-identity"},
	} {
		code, out, _ := fetchRun(t, st.env(), 60*time.Second, append(append([]string{seg, dest, "--prefetch", "0"}, flags...), c.extra...)...)
		if code != 255 || !strings.Contains(out, c.want) || strings.Contains(out, "not in the archive") {
			t.Errorf("fetch with %s: exit %d, want 255 saying %q:\n%s", c.name, code, c.want, out)
		}
		if strings.Count(strings.TrimSpace(out), "\n") > 0 {
			t.Errorf("fetch with %s: more than one line:\n%s", c.name, out)
		}
	}
	code, out, _ := fetchRun(t, st.env(), 60*time.Second, append([]string{seg, dest, "--prefetch", "0", "--decrypt-identity", keys["identity"]}, flags...)...)
	got, _ := os.ReadFile(dest)
	want, _ := os.ReadFile(filepath.Join(st.pg.WALDir(), seg))
	if code != 0 || !bytes.Equal(got, want) {
		t.Fatalf("fetch with the identity: exit %d, %d bytes (want %d equal to pg_wal)\n%s", code, len(got), len(want), out)
	}
	if out, err := runWalship(t, st.env(), append([]string{"verify", "--deep", "--decrypt-identity", keys["identity"]}, flags...)...); err != nil || !strings.Contains(out, "OK: no gaps") {
		t.Errorf("verify --deep with the identity: %v\n%s", err, out)
	}
	if out, err := runWalship(t, st.env(), append([]string{"verify", "--deep", "--decrypt-identity", keys["wrong"]}, flags...)...); err == nil || !strings.Contains(out, "none of the identities can decrypt") {
		t.Errorf("verify --deep with a wrong identity: %v\n%s", err, out)
	}

	// Recovery with the identity (via WALSHIP_DECRYPT_IDENTITY): every row.
	cmd := strings.Replace(st.restoreCommand("barman-cloud"), "env ", "env WALSHIP_DECRYPT_IDENTITY="+keys["identity"]+" ", 1)
	r := st.pg.Restored(backup, "restore_command = '"+cmd+"'")
	if err := r.TryStart(120 * time.Second); err != nil {
		t.Fatalf("%v\n%s", err, r.Log())
	}
	waitPromoted(t, r)
	if got := count(r, `SELECT count(*)::text FROM ledger WHERE note LIKE '`+marker+` %'`); got != rows {
		t.Errorf("recovered %d rows, want %d", got, rows)
	}
	r.Stop("fast")

	// A wrong identity: recovery aborts, the server never opens.
	refused(t, st.pg.Restored(backup, "restore_command = '"+st.restoreCommand("barman-cloud", "--decrypt-identity", keys["wrong"])+"'"),
		"none of the identities can decrypt")
}

func mustIdentity(t *testing.T) *age.X25519Identity {
	t.Helper()
	id, err := age.GenerateX25519Identity()
	if err != nil {
		t.Fatal(err)
	}
	return id
}

// objectMeta reads an object's size and user metadata with a HEAD.
func (st *stack) objectMeta(key string) (int64, map[string]string) {
	st.t.Helper()
	out, err := st.s3.Client().HeadObject(context.Background(), &s3.HeadObjectInput{Bucket: aws.String(st.s3.Bucket), Key: aws.String(key)})
	if err != nil {
		st.t.Fatalf("head %s: %v", key, err)
	}
	return aws.ToInt64(out.ContentLength), out.Metadata
}
