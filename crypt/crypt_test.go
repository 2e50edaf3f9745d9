package crypt

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"filippo.io/age"

	"github.com/walship/walship/compress"
)

func genID(t *testing.T) *age.X25519Identity {
	t.Helper()
	id, err := age.GenerateX25519Identity()
	if err != nil {
		t.Fatal(err)
	}
	return id
}

func writeFile(t *testing.T, content string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "f")
	if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// Compress then encrypt then decrypt then decompress gives the bytes back;
// the stored body is neither the plaintext nor a zstd frame.
func TestRoundTripAfterCompression(t *testing.T) {
	id := genID(t)
	raw := bytes.Repeat([]byte("walship-secret-marker "), 50000)
	enc, _ := compress.NewEncoder(compress.Zstd, 0)
	z, err := enc.Encode(raw)
	if err != nil {
		t.Fatal(err)
	}
	e := NewEncrypter([]age.Recipient{id.Recipient()})
	body, err := e.Encrypt(z)
	if err != nil {
		t.Fatal(err)
	}
	if !Encrypted(body) || bytes.HasPrefix(body, []byte{0x28, 0xb5, 0x2f, 0xfd}) {
		t.Fatalf("body starts %q", body[:8])
	}
	if bytes.Contains(body, []byte("walship-secret-marker")) {
		t.Fatal("plaintext in the encrypted body")
	}
	plain, err := Decrypt(Scheme, body, []age.Identity{id})
	if err != nil {
		t.Fatal(err)
	}
	got, err := compress.Decode(compress.Zstd, plain, len(raw))
	if err != nil || !bytes.Equal(got, raw) {
		t.Fatalf("round trip: %v", err)
	}
}

// Each object has its own file key: objects written before a rotation
// decrypt with the old identity, later ones with the new, and an identity
// file holding both reads all of them.
func TestRotation(t *testing.T) {
	old, cur := genID(t), genID(t)
	before, _ := NewEncrypter([]age.Recipient{old.Recipient()}).Encrypt([]byte("before"))
	before = append([]byte(nil), before...)
	after, _ := NewEncrypter([]age.Recipient{cur.Recipient()}).Encrypt([]byte("after"))

	if _, err := Decrypt(Scheme, before, []age.Identity{cur}); !errors.Is(err, ErrWrongKey) {
		t.Errorf("old object with the new identity: %v, want ErrWrongKey", err)
	}
	ids, err := LoadIdentities(writeFile(t, "# rotated 2026\n"+cur.String()+"\n\n# before\n"+old.String()+"\n"))
	if err != nil {
		t.Fatal(err)
	}
	for body, want := range map[string]string{string(before): "before", string(after): "after"} {
		got, err := Decrypt(Scheme, []byte(body), ids)
		if err != nil || string(got) != want {
			t.Errorf("decrypt %s: %q %v", want, got, err)
		}
	}
}

func TestDecryptErrors(t *testing.T) {
	id := genID(t)
	body, _ := NewEncrypter([]age.Recipient{id.Recipient()}).Encrypt([]byte("wal"))
	if _, err := Decrypt(Scheme, body, nil); !errors.Is(err, ErrNoIdentity) {
		t.Errorf("no identity: %v", err)
	}
	if _, err := Decrypt("rot13", body, []age.Identity{id}); !errors.Is(err, ErrUnknownScheme) {
		t.Errorf("unknown scheme: %v", err)
	}
	bad := append([]byte(nil), body...)
	bad[len(bad)-3] ^= 1
	_, err := Decrypt(Scheme, bad, []age.Identity{id})
	if err == nil || errors.Is(err, ErrWrongKey) || errors.Is(err, ErrNoIdentity) {
		t.Errorf("damaged body: %v, want a decryption failure", err)
	}
	if got, err := Decrypt("", []byte("plain"), nil); err != nil || string(got) != "plain" {
		t.Errorf("plaintext object: %q %v", got, err)
	}
}

// Parse errors never show a key's text.
func TestParseErrorsHideKeys(t *testing.T) {
	id := genID(t)
	secret := id.String()
	if _, err := ParseRecipients([]string{secret}, ""); err == nil || strings.Contains(err.Error(), secret) {
		t.Errorf("private key as recipient: %v", err)
	}
	if _, err := ParseRecipients(nil, writeFile(t, id.Recipient().String()+"\n"+secret+"\n")); err == nil || strings.Contains(err.Error(), secret) {
		t.Errorf("private key in the recipients file: %v", err)
	}
	if _, err := ParseRecipients([]string{"age1notakey"}, ""); err == nil {
		t.Error("malformed recipient accepted")
	}
	if _, err := LoadIdentities(writeFile(t, "AGE-SECRET-KEY-1DEFINITELYNOTVALIDSECRETMATERIAL\n")); err == nil || strings.Contains(err.Error(), "DEFINITELYNOTVALID") {
		t.Errorf("malformed identity: %v", err)
	}
	if _, err := LoadIdentities(filepath.Join(t.TempDir(), "missing")); err == nil {
		t.Error("missing identity file accepted")
	}
	rs, err := ParseRecipients([]string{id.Recipient().String()}, writeFile(t, "# team\n"+genID(t).Recipient().String()+"\n"))
	if err != nil || len(rs) != 2 {
		t.Errorf("two recipients: %d %v", len(rs), err)
	}
	if rs, err := ParseRecipients(nil, ""); rs != nil || err != nil || NewEncrypter(rs) != nil {
		t.Errorf("no recipients: %v %v", rs, err)
	}
}

func BenchmarkEncrypt(b *testing.B) {
	id, _ := age.GenerateX25519Identity()
	e := NewEncrypter([]age.Recipient{id.Recipient()})
	src := bytes.Repeat([]byte{1, 2, 3, 4}, 4<<20)
	b.SetBytes(int64(len(src)))
	b.ReportAllocs()
	for b.Loop() {
		if _, err := e.Encrypt(src); err != nil {
			b.Fatal(err)
		}
	}
}
