package unpack

import (
	"archive/tar"
	"context"
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	filesink "github.com/walship/walship/sinks/file"
)

// standby.signal is not written, but it is still checked against the
// manifest: a backup whose standby.signal differs from what the manifest
// says fails to restore.
func TestStandbySignalStillVerified(t *testing.T) {
	dir := t.TempDir()
	sink, err := filesink.New(filepath.Join(dir, "archive"))
	if err != nil {
		t.Fatal(err)
	}
	files := map[string]string{"PG_VERSION": "15\n", "standby.signal": ""}
	manifest := makeManifest(files, map[string]string{"standby.signal": "00000001"})
	base := makeTar(t, []entry{
		{name: "PG_VERSION", typ: tar.TypeReg, body: "15\n"},
		{name: "standby.signal", typ: tar.TypeReg, body: ""},
	})
	cat := putBackup(t, sink, prefix, "20261129T210000Z", 4096, base, nil, nil, manifest, false)
	_, err = Restore(context.Background(), Options{Sink: sink, NoSync: true}, cat, filepath.Join(dir, "restored"))
	if !errors.Is(err, ErrVerify) || !strings.Contains(err.Error(), "standby.signal has checksum") {
		t.Fatalf("want a manifest mismatch naming standby.signal, got %v", err)
	}

	// The same backup with a matching manifest restores, without the file.
	cat = putBackup(t, sink, prefix, "20261129T220000Z", 4096, base, nil, nil, makeManifest(files, nil), false)
	target := filepath.Join(dir, "restored2")
	res, err := Restore(context.Background(), Options{Sink: sink, NoSync: true}, cat, target)
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(res.Dropped, []string{"standby.signal"}) {
		t.Errorf("Dropped = %v", res.Dropped)
	}
	if _, err := os.Stat(filepath.Join(target, "standby.signal")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("standby.signal restored: %v", err)
	}
}

// Standby settings are commented out whichever way the line is written
// (PostgreSQL reads `name value` without '=' too); others stay.
func TestWriteRecoveryCommentsOutStandbySettings(t *testing.T) {
	dir := t.TempDir()
	conf := "primary_conninfo 'host=prod'\n  Primary_Slot_Name='s1'\nprimary_conninfo_x = 1\nwork_mem = '4MB'\n# primary_conninfo = 'old'\n"
	if err := os.WriteFile(filepath.Join(dir, "postgresql.auto.conf"), []byte(conf), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := WriteRecovery(dir, "20261129T210000Z", []string{"restore_command = 'x'"}); err != nil {
		t.Fatal(err)
	}
	got, _ := os.ReadFile(filepath.Join(dir, "postgresql.auto.conf"))
	for _, want := range []string{
		"# (walship restore) primary_conninfo 'host=prod'\n",
		"# (walship restore)   Primary_Slot_Name='s1'\n",
		"\nprimary_conninfo_x = 1\n",
		"\nwork_mem = '4MB'\n",
		"\n# primary_conninfo = 'old'\n",
		"\nrestore_command = 'x'\n",
	} {
		if !strings.Contains(string(got), want) {
			t.Errorf("postgresql.auto.conf lacks %q:\n%s", want, got)
		}
	}
	if _, err := os.Stat(filepath.Join(dir, "standby.signal")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("standby.signal: %v", err)
	}
}
