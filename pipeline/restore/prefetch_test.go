package restore

import (
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/walship/walship/compress"
	"github.com/walship/walship/pipeline"
	"github.com/walship/walship/sinks"
	"github.com/walship/walship/sinks/file"
)

func TestPrefetchFollowsRecovery(t *testing.T) {
	ctx := context.Background()
	const size = pipeline.SegmentSize(1 << 20)
	sink, _ := file.New(t.TempDir())
	layout := sinks.BarmanCloud{Prefix: "p", Server: "s"}
	enc, _ := compress.NewEncoder(compress.Zstd, 0)
	a := &archive{t: t, sink: sink, layout: layout, enc: enc}
	a.identity(testSysID, size)
	name := func(no uint64) string { return pipeline.Segment{Timeline: 1, No: no}.Name(size) }
	for no := uint64(3); no <= 7; no++ {
		seg := pipeline.Segment{Timeline: 1, No: no}
		raw := fakeSegment(seg, size)
		a.put(name(no), raw, segMeta(seg, size, raw, 0))
	}
	pf := &Prefetch{Fetcher: a.fetcher(), Manifest: Manifest{Dest: "file:///x", Server: "s", SystemID: a.fetcher().SystemID},
		Dir: filepath.Join(t.TempDir(), ".walship-prefetch"), Count: 3, IdleExit: 700 * time.Millisecond}
	pf.Want(name(3))
	done := make(chan error, 1)
	go func() { done <- pf.Run(ctx, size) }()

	waitFile(t, filepath.Join(pf.Dir, windowFile))
	if !pf.Await(name(4), 10*time.Second) {
		t.Fatal("segment 4 was not prefetched")
	}
	for no := uint64(4); no <= 6; no++ {
		waitFile(t, filepath.Join(pf.Dir, name(no)))
	}
	if !pf.Usable() {
		t.Fatal("the prefetcher's own files are not usable")
	}
	dest := filepath.Join(t.TempDir(), "RECOVERYXLOG")
	pf.Want(name(4))
	if ok, err := pf.Serve(name(4), dest); !ok || err != nil {
		t.Fatalf("serve: %v %v", ok, err)
	}
	got, _ := os.ReadFile(dest)
	if string(got) != string(fakeSegment(pipeline.Segment{Timeline: 1, No: 4}, size)) {
		t.Error("served bytes differ")
	}
	// Recovery moves to 6: the window is 7..9, and 8 is not archived.
	pf.Want(name(6))
	waitFile(t, filepath.Join(pf.Dir, name(7)))
	began := time.Now()
	if pf.Await(name(8), 10*time.Second) {
		t.Error("segment 8 appeared, but it is not archived")
	}
	if time.Since(began) > 3*time.Second {
		t.Errorf("waited %s for a segment the prefetcher knows is missing", time.Since(began))
	}
	// Asked again for a segment already served: not in the window, no wait.
	began = time.Now()
	if pf.Await(name(4), 10*time.Second); time.Since(began) > 100*time.Millisecond {
		t.Error("waited for a segment outside the prefetcher's window")
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if pf.Running() {
		t.Error("prefetcher still holds the lock after exiting")
	}
	pf.Clean(name(7))
	if _, err := os.Stat(filepath.Join(pf.Dir, name(5))); err == nil {
		t.Error("Clean kept a segment older than the one asked for")
	}
}

func waitFile(t *testing.T, path string) {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
		if _, err := os.Stat(path); err == nil {
			return
		}
	}
	t.Fatalf("%s never appeared", filepath.Base(path))
}
