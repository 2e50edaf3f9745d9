package fsutil

import (
	"errors"
	"os"
	"path/filepath"
	"testing"
)

func TestWriteFileReplacesAtomically(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "f")
	for _, want := range []string{"one", "two, longer"} {
		if err := WriteFile(p, []byte(want), 0o600); err != nil {
			t.Fatal(err)
		}
		got, err := os.ReadFile(p)
		if err != nil || string(got) != want {
			t.Fatalf("read %q, %v; want %q", got, err, want)
		}
	}
	entries, _ := os.ReadDir(dir)
	if len(entries) != 1 {
		t.Errorf("temporary files left behind: %v", entries)
	}
	if err := WriteFile(filepath.Join(dir, "missing", "f"), nil, 0o600); err == nil {
		t.Error("write into a missing directory succeeded")
	}
}

func TestLock(t *testing.T) {
	p := filepath.Join(t.TempDir(), ".lock")
	if Held(p) {
		t.Fatal("a missing lock file is held")
	}
	l, err := TryLock(p)
	if err != nil {
		t.Fatal(err)
	}
	if !Held(p) {
		t.Error("a taken lock is not seen as held")
	}
	// flock locks belong to the open file description: a second open in
	// this process conflicts like another process would.
	if _, err := TryLock(p); !errors.Is(err, ErrLocked) {
		t.Errorf("second TryLock: %v, want ErrLocked", err)
	}
	l.Unlock()
	if Held(p) {
		t.Error("lock still held after Unlock")
	}
	l2, err := TryLock(p)
	if err != nil {
		t.Fatalf("relock: %v", err)
	}
	l2.Unlock()
	var nilLock *Lock
	nilLock.Unlock()
}
