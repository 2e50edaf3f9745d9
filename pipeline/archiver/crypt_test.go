package archiver

import (
	"bytes"
	"context"
	"io"
	"testing"

	"filippo.io/age"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/walship/walship/compress"
	"github.com/walship/walship/crypt"
	"github.com/walship/walship/sinks"
)

// With recipients, the stored object is the compressed segment encrypted:
// not a zstd frame, metadata naming the scheme and the raw SHA-256; the
// identity gives the segment back. An archiver with rotated recipients
// confirms the old object as is (same raw SHA-256), without rewriting it.
func TestHandleEncrypts(t *testing.T) {
	f := newFixture(t)
	id, _ := age.GenerateX25519Identity()
	layout := sinks.BarmanCloud{Prefix: "p", Server: "db1"}
	a, err := New(Config{Codec: compress.Zstd, Recipients: []age.Recipient{id.Recipient()}, Layout: func(string) sinks.Layout { return layout },
		Dest: "file:///x", KeepAlive: -1, Metrics: NewMetrics(prometheus.NewRegistry())}, f.bus, f.sink)
	if err != nil {
		t.Fatal(err)
	}
	f.a = a
	if d, out := f.handle(t, f.ev, 1); out != Acked {
		t.Fatalf("outcome %v answer %s", out, d.answer)
	}
	rc, meta, err := f.sink.Get(context.Background(), f.key)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(rc)
	rc.Close()
	if meta.Encryption != crypt.Scheme || meta.SHA256 != f.ev.SHA256 || meta.Codec != "zstd" {
		t.Errorf("metadata %+v", meta)
	}
	if bytes.HasPrefix(body, []byte{0x28, 0xb5, 0x2f, 0xfd}) || !crypt.Encrypted(body) {
		t.Errorf("stored body starts %x: want an age file, not a zstd frame", body[:8])
	}
	if bytes.Contains(body, f.raw[40:4096]) {
		t.Error("the stored body holds raw WAL")
	}
	plain, err := crypt.Decrypt(meta.Encryption, body, []age.Identity{id})
	if err != nil {
		t.Fatal(err)
	}
	raw, err := compress.Decode(compress.Zstd, plain, 0)
	if err != nil || !bytes.Equal(raw, f.raw) {
		t.Fatalf("decrypted object is not the segment: %v", err)
	}

	// Rotation: a new recipient; the segment is published again.
	other, _ := age.GenerateX25519Identity()
	f.a.cfg.Recipients = []age.Recipient{other.Recipient()}
	f.bus.objects[f.ev.Object] = f.raw
	f.bus.archived = nil
	if _, out := f.handle(t, f.ev, 2); out != Acked || len(f.bus.archived) != 1 || !f.bus.archived[0].Existed {
		t.Fatalf("after rotation: %v %+v", out, f.bus.archived)
	}
	rc, _, _ = f.sink.Get(context.Background(), f.key)
	again, _ := io.ReadAll(rc)
	rc.Close()
	if !bytes.Equal(again, body) {
		t.Error("the object was rewritten after a rotation")
	}
}
