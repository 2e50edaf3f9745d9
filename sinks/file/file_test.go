package file

import (
	"context"
	"os"
	"path/filepath"
	"reflect"
	"testing"

	"github.com/walship/walship/sinks"
	"github.com/walship/walship/sinks/sinktest"
)

func TestConformance(t *testing.T) {
	sinktest.Run(t, func(t *testing.T) sinks.Sink {
		s, err := New(t.TempDir())
		if err != nil {
			t.Fatal(err)
		}
		return s
	})
}

func TestRelativePathRefused(t *testing.T) {
	if _, err := New("relative/dir"); err == nil {
		t.Error("relative path accepted")
	}
}

// Defect 10 of issue 8: a directory another writer created (and has not
// yet made durable) is still fsynced, up to the root, before an object in
// it is reported stored.
func TestPutSyncsDirectoriesAnotherWriterCreated(t *testing.T) {
	root := t.TempDir()
	s, err := New(root)
	if err != nil {
		t.Fatal(err)
	}
	var synced []string
	s.syncDirs = func(dir string) error { synced = append(synced, dir); return nil }
	// Another worker's MkdirAll, before its fsyncs.
	if err := os.MkdirAll(filepath.Join(root, "p", "db1", "wals"), 0o750); err != nil {
		t.Fatal(err)
	}
	if err := s.Put(context.Background(), "p/db1/wals/f", []byte("x"), sinks.Metadata{SHA256: "ab"}); err != nil {
		t.Fatal(err)
	}
	want := []string{filepath.Join(root, "p", "db1"), filepath.Join(root, "p"), root}
	if len(synced) < 3 || !reflect.DeepEqual(synced[:3], want) {
		t.Errorf("parent directories fsynced %v, want %v first", synced, want)
	}
}

// Defect 7 of issue 8: the object is never visible without its metadata;
// an orphan sidecar (a crash before the object's link) is replaced.
func TestPutWritesMetadataFirst(t *testing.T) {
	root := t.TempDir()
	s, err := New(root)
	if err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(root, "k")
	if err := os.WriteFile(p+".meta.json", []byte(`{"walship-sha256":"stale"}`), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := s.Put(context.Background(), "k", []byte("body"), sinks.Metadata{SHA256: "fresh"}); err != nil {
		t.Fatal(err)
	}
	m, err := s.Head(context.Background(), "k")
	if err != nil || m.SHA256 != "fresh" {
		t.Fatalf("metadata %+v, %v", m, err)
	}
}

func TestOpenNeverCreates(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "not-mounted")
	if _, err := Open(dir); err == nil {
		t.Fatal("Open of a missing directory succeeded")
	}
	if _, err := os.Stat(dir); !os.IsNotExist(err) {
		t.Errorf("Open created %s", dir)
	}
}
