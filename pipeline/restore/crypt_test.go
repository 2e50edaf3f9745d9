package restore

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"filippo.io/age"

	"github.com/walship/walship/compress"
	"github.com/walship/walship/crypt"
	"github.com/walship/walship/pipeline"
	"github.com/walship/walship/sinks"
	"github.com/walship/walship/sinks/file"
)

// putEncrypted stores raw as the archiver does with recipients: compressed,
// then encrypted, the metadata naming the scheme and the raw SHA-256.
func (a *archive) putEncrypted(file string, raw []byte, meta sinks.Metadata, to *age.X25519Identity) {
	a.t.Helper()
	z, err := a.enc.Encode(raw)
	if err != nil {
		a.t.Fatal(err)
	}
	body, err := crypt.NewEncrypter([]age.Recipient{to.Recipient()}).Encrypt(z)
	if err != nil {
		a.t.Fatal(err)
	}
	meta.Encryption = crypt.Scheme
	if err := a.sink.Put(context.Background(), a.layout.Key(file, ".zst"), body, meta); err != nil {
		a.t.Fatal(err)
	}
}

// An archive whose segments 3-4 were encrypted for an old key and 5-6 (and
// a history file) for a new one, after a rotation, plus a plaintext
// segment 2 from before encryption was turned on.
func TestEncryptedArchive(t *testing.T) {
	ctx := context.Background()
	const size = pipeline.SegmentSize(1 << 20)
	root := t.TempDir()
	sink, _ := file.New(root)
	layout := sinks.BarmanCloud{Prefix: "p", Server: "s"}
	enc, _ := compress.NewEncoder(compress.Zstd, 0)
	a := &archive{t: t, sink: sink, layout: layout, enc: enc}
	a.identity(testSysID, size)
	oldKey, newKey, stranger := genIdentity(t), genIdentity(t), genIdentity(t)
	for no := uint64(2); no <= 6; no++ {
		seg := pipeline.Segment{Timeline: 1, No: no}
		raw := fakeSegment(seg, size)
		switch {
		case no == 2:
			a.put(seg.Name(size), raw, segMeta(seg, size, raw, 0))
		case no <= 4:
			a.putEncrypted(seg.Name(size), raw, segMeta(seg, size, raw, 0), oldKey)
		default:
			a.putEncrypted(seg.Name(size), raw, segMeta(seg, size, raw, 0), newKey)
		}
	}
	hist := []byte("1\t0/900000\tpromoted\n")
	hm := segMeta(pipeline.Segment{Timeline: 2}, size, hist, 0)
	hm.StartLSN, hm.EndLSN = "", ""
	a.putEncrypted("00000002.history", hist, hm, newKey)

	fetch := func(ids []age.Identity, no uint64) error {
		f := a.fetcher()
		f.Identities = ids
		dest := filepath.Join(t.TempDir(), "RECOVERYXLOG")
		err := f.Fetch(ctx, pipeline.Segment{Timeline: 1, No: no}.Name(size), dest)
		if err == nil {
			got, _ := os.ReadFile(dest)
			if string(got) != string(fakeSegment(pipeline.Segment{Timeline: 1, No: no}, size)) {
				t.Errorf("segment %d: fetched bytes differ", no)
			}
		} else if _, serr := os.Stat(dest); serr == nil {
			t.Errorf("segment %d: written although the fetch failed", no)
		}
		return err
	}
	both := []age.Identity{newKey, oldKey}
	for no := uint64(2); no <= 6; no++ {
		if err := fetch(both, no); err != nil {
			t.Errorf("segment %d with both identities: %v", no, err)
		}
	}
	// The new key alone reads only what was written after the rotation;
	// the plaintext segment needs no key.
	for no, want := range map[uint64]error{2: nil, 3: ErrCannotDecrypt, 5: nil} {
		if err := fetch([]age.Identity{newKey}, no); !errors.Is(err, want) || (want != nil && errors.Is(err, ErrNotFound)) {
			t.Errorf("segment %d with the new key: %v, want %v", no, err, want)
		}
	}
	if err := fetch([]age.Identity{stranger}, 5); !errors.Is(err, ErrCannotDecrypt) || !Permanent(err) {
		t.Errorf("wrong identity: %v, want ErrCannotDecrypt", err)
	}
	if err := fetch(nil, 5); !errors.Is(err, ErrCannotDecrypt) || !strings.Contains(err.Error(), "--decrypt-identity") {
		t.Errorf("no identity: %v, want ErrCannotDecrypt naming --decrypt-identity", err)
	}

	rep, err := Verify(ctx, sink, layout, VerifyOptions{Metadata: true, Deep: true, Parallel: 2, Identities: both})
	if err != nil {
		t.Fatal(err)
	}
	// The history file was decrypted and read: it says timeline 1 ran
	// into segment 8, which is not archived.
	if rep.Checked != 5 || len(rep.Problems) != 1 || !strings.Contains(rep.Problems[0].Problem, "segment 000000010000000000000008 of timeline 1 is not archived") {
		t.Errorf("verify --deep with both identities: checked %d, problems %+v", rep.Checked, rep.Problems)
	}
	// Without identities, verify still walks and checks metadata (the
	// encrypted history file is not read); --deep names every encrypted
	// object it cannot check.
	if rep, err := Verify(ctx, sink, layout, VerifyOptions{Metadata: true}); err != nil || len(rep.Problems) != 0 {
		t.Errorf("verify without identities: %v %+v", err, rep)
	}
	rep, _ = Verify(ctx, sink, layout, VerifyOptions{Deep: true, Parallel: 2, Identities: []age.Identity{newKey}})
	if rep.Checked != 3 || len(rep.Problems) != 3 || !strings.Contains(rep.Problems[1].Problem, "none of the identities can decrypt") {
		t.Errorf("verify --deep with the new key only: checked %d, problems %+v", rep.Checked, rep.Problems)
	}

	// A flipped byte in an encrypted object is corruption, not a key problem.
	key := filepath.Join(root, layout.Key(pipeline.Segment{Timeline: 1, No: 6}.Name(size), ".zst"))
	b, _ := os.ReadFile(key)
	b[len(b)/2] ^= 1
	os.WriteFile(key, b, 0o644)
	if err := fetch(both, 6); !errors.Is(err, ErrCorrupt) {
		t.Errorf("tampered encrypted object: %v, want ErrCorrupt", err)
	}
}

// The prefetcher decrypts too; an object it cannot decrypt is left to the
// fetch, which aborts.
func TestPrefetchDecrypts(t *testing.T) {
	ctx := context.Background()
	sink, _ := file.New(t.TempDir())
	layout := sinks.BarmanCloud{Prefix: "p", Server: "s"}
	enc, _ := compress.NewEncoder(compress.Zstd, 0)
	a := &archive{t: t, sink: sink, layout: layout, enc: enc}
	a.identity(testSysID, size1M)
	key, other := genIdentity(t), genIdentity(t)
	for no := uint64(3); no <= 6; no++ {
		seg := pipeline.Segment{Timeline: 1, No: no}
		raw := fakeSegment(seg, size1M)
		to := key
		if no == 6 {
			to = other
		}
		a.putEncrypted(seg.Name(size1M), raw, segMeta(seg, size1M, raw, 0), to)
	}
	f := a.fetcher()
	f.Identities = []age.Identity{key}
	pf := newPrefetch(t, f, "")
	pf.Want(segName(3))
	runPrefetch(t, pf)
	waitFile(t, filepath.Join(pf.Dir, windowFile))
	for no := uint64(4); no <= 5; no++ {
		if !pf.Await(segName(no), 10*time.Second) {
			t.Fatalf("segment %d was not prefetched", no)
		}
	}
	waitFile(t, filepath.Join(pf.Dir, segName(6)+corruptExt))
	if pf.Await(segName(6), time.Second) {
		t.Error("a segment the identity cannot decrypt was prefetched")
	}
	dest := filepath.Join(t.TempDir(), "RECOVERYXLOG")
	if ok, err := pf.Serve(segName(4), dest); !ok || err != nil {
		t.Fatalf("serve: %v %v", ok, err)
	}
	got, _ := os.ReadFile(dest)
	if string(got) != string(fakeSegment(pipeline.Segment{Timeline: 1, No: 4}, size1M)) {
		t.Error("served bytes differ")
	}
	if err := f.Fetch(ctx, segName(6), dest); !errors.Is(err, ErrCannotDecrypt) {
		t.Errorf("fetch of the segment for another key: %v", err)
	}
}

func genIdentity(t *testing.T) *age.X25519Identity {
	t.Helper()
	id, err := age.GenerateX25519Identity()
	if err != nil {
		t.Fatal(err)
	}
	return id
}
