package restore

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"sync/atomic"
	"syscall"
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

// testArchive is a file-sink archive holding segments from..to of
// timeline 1, with its identity.
func testArchive(t *testing.T, from, to uint64) *archive {
	sink, _ := file.New(t.TempDir())
	enc, _ := compress.NewEncoder(compress.Zstd, 0)
	a := &archive{t: t, sink: sink, layout: sinks.BarmanCloud{Prefix: "p", Server: "s"}, enc: enc}
	a.identity(testSysID, size1M)
	for no := from; no <= to; no++ {
		seg := pipeline.Segment{Timeline: 1, No: no}
		raw := fakeSegment(seg, size1M)
		a.put(seg.Name(size1M), raw, segMeta(seg, size1M, raw, 0))
	}
	return a
}

func segName(no uint64) string { return pipeline.Segment{Timeline: 1, No: no}.Name(size1M) }

func newPrefetch(t *testing.T, f *Fetcher, dir string) *Prefetch {
	if dir == "" {
		dir = filepath.Join(t.TempDir(), ".walship-prefetch")
	}
	return &Prefetch{Fetcher: f, Dir: dir, Count: 3, IdleExit: 2 * time.Second,
		Manifest: Manifest{Dest: "file:///a", Layout: "barman-cloud", Server: "s", SystemID: f.SystemID}}
}

func runPrefetch(t *testing.T, pf *Prefetch) <-chan error {
	done, finished := make(chan error, 1), make(chan struct{})
	go func() { done <- pf.Run(context.Background(), size1M); close(finished) }()
	t.Cleanup(func() { pf.writeHint(stopFile, "test done"); <-finished })
	return done
}

// Files of another configuration or archive, or from a walship without a
// manifest, are never served, and a prefetcher empties such a directory.
func TestPrefetchManifest(t *testing.T) {
	a := testArchive(t, 3, 8)
	pf := newPrefetch(t, a.fetcher(), "")
	os.MkdirAll(pf.Dir, 0o700)
	// A stale directory: segment 5 of another cluster, no manifest.
	stale := newWAL(seg5, size1M, testSysID+1).fill()
	os.WriteFile(filepath.Join(pf.Dir, segName(5)), stale, 0o600)
	if pf.Usable() {
		t.Fatal("a directory without a manifest is usable")
	}
	// Another configuration's manifest.
	for _, m := range []Manifest{
		{Dest: "file:///b", Layout: "barman-cloud", Server: "s", SystemID: a.fetcher().SystemID},
		{Dest: "file:///a", Layout: "barman-cloud", Server: "s2", SystemID: a.fetcher().SystemID},
		{Dest: "file:///a", Layout: "barman-cloud", Server: "s", SystemID: "42"},
		{Dest: "file:///a", Layout: "barman-cloud", Server: "s", SystemID: a.fetcher().SystemID, AllowPartial: true},
	} {
		b, _ := json.Marshal(m)
		os.WriteFile(filepath.Join(pf.Dir, manifestFile), b, 0o600)
		if pf.Usable() {
			t.Errorf("manifest %+v is usable for %+v", m, pf.Manifest)
		}
	}
	pf.Want(segName(4))
	runPrefetch(t, pf)
	waitFile(t, filepath.Join(pf.Dir, segName(7)))
	if !pf.Usable() {
		t.Fatal("the prefetcher did not write its manifest")
	}
	got, _ := os.ReadFile(filepath.Join(pf.Dir, segName(5)))
	if !bytes.Equal(got, fakeSegment(seg5, size1M)) {
		t.Error("the other cluster's segment 5 survived the prefetcher's reset")
	}
	// A foreign file dropped into a usable directory is checked on serve.
	os.WriteFile(filepath.Join(pf.Dir, segName(9)), newWAL(pipeline.Segment{Timeline: 1, No: 9}, size1M, testSysID+1).fill(), 0o600)
	if ok, _ := pf.Serve(segName(9), filepath.Join(t.TempDir(), "x")); ok {
		t.Error("served a cached segment of another system")
	}
}

// failingHeads fails every HEAD, counting them.
type failingHeads struct {
	sinks.Sink
	n atomic.Int64
}

func (f *failingHeads) Head(ctx context.Context, key string) (sinks.Metadata, error) {
	f.n.Add(1)
	return sinks.Metadata{}, errors.New("503 SlowDown")
}

// A failing store is retried with back-off, not in a tight loop.
func TestPrefetchBacksOff(t *testing.T) {
	a := testArchive(t, 3, 3)
	failing := &failingHeads{Sink: a.sink}
	f := a.fetcher()
	f.Sink = failing
	pf := newPrefetch(t, f, "")
	pf.IdleExit = 2 * time.Second
	pf.Want(segName(3))
	began := time.Now()
	if err := <-runPrefetch(t, pf); err != nil {
		t.Fatal(err)
	}
	// Two workers, back-off from 200 ms doubling: about a dozen rounds in 2 s.
	t.Logf("%d HEAD requests in %s", failing.n.Load(), time.Since(began).Round(time.Millisecond))
	if n := failing.n.Load(); n > 60 {
		t.Errorf("%d HEAD requests in %s against a failing store", n, time.Since(began).Round(time.Millisecond))
	}
}

// A corrupt object is recorded: the fetch for it does not wait for the
// prefetcher, and it is not downloaded again and again.
func TestPrefetchRecordsCorruption(t *testing.T) {
	a := testArchive(t, 3, 4)
	seg := pipeline.Segment{Timeline: 1, No: 5}
	raw := fakeSegment(seg, size1M)
	m := segMeta(seg, size1M, raw, 0)
	raw[5000] ^= 1
	a.put(segName(5), raw, m)
	pf := newPrefetch(t, a.fetcher(), "")
	pf.IdleExit = time.Minute // it must not end the wait by leaving
	pf.Want(segName(3))
	runPrefetch(t, pf)
	defer pf.Cleanup(10 * time.Second)
	waitFile(t, filepath.Join(pf.Dir, segName(4)))
	began := time.Now()
	if pf.Await(segName(5), 30*time.Second) {
		t.Fatal("a corrupt segment was prefetched")
	}
	if took := time.Since(began); took > 3*time.Second {
		t.Errorf("waited %s for a segment the prefetcher found corrupt", took)
	}
	if !pf.Running() {
		t.Error("the prefetcher left: the wait did not end because of the corruption record")
	}
	if _, err := os.Stat(filepath.Join(pf.Dir, segName(5)+corruptExt)); err != nil {
		t.Errorf("no corruption record: %v", err)
	}
}

// A .partial is never prefetched, even for a fetch that allows it: it
// grows, and each call must get the newest.
func TestPrefetchSkipsPartials(t *testing.T) {
	a := testArchive(t, 3, 4)
	part, end := partialAt(100_000)
	a.put(seg5.Name(size1M)+".partial", part, segMeta(seg5, size1M, part, end))
	f := a.fetcher()
	f.AllowPartial = true
	pf := newPrefetch(t, f, "")
	pf.Manifest.AllowPartial = true
	pf.Want(segName(3))
	runPrefetch(t, pf)
	waitFile(t, filepath.Join(pf.Dir, segName(4)))
	waitFile(t, filepath.Join(pf.Dir, endFile))
	if _, err := os.Stat(filepath.Join(pf.Dir, segName(5))); err == nil {
		t.Error("the prefetcher cached a .partial as the segment")
	}
	if pf.Await(segName(5), 5*time.Second) {
		t.Error("Await found segment 5")
	}
}

// A prefetch directory on another file system than pg_wal is served by
// copying.
func TestServeAcrossFileSystems(t *testing.T) {
	shm, err := os.MkdirTemp("/dev/shm", "walship-prefetch-")
	if err != nil {
		t.Skip("no /dev/shm")
	}
	defer os.RemoveAll(shm)
	destDir := t.TempDir()
	var a, b syscall.Stat_t
	syscall.Stat(shm, &a)
	syscall.Stat(destDir, &b)
	if a.Dev == b.Dev {
		t.Skip("/dev/shm is on the same file system as the temporary directory")
	}
	ar := testArchive(t, 3, 5)
	pf := newPrefetch(t, ar.fetcher(), filepath.Join(shm, "pf"))
	pf.Want(segName(3))
	runPrefetch(t, pf)
	waitFile(t, filepath.Join(pf.Dir, segName(4)))
	waitFile(t, filepath.Join(pf.Dir, segName(5)))
	dest := filepath.Join(destDir, "RECOVERYXLOG")
	pf.Want(segName(4))
	ok, err := pf.Serve(segName(4), dest)
	if err != nil || !ok {
		t.Fatalf("serve across file systems: %v %v", ok, err)
	}
	got, _ := os.ReadFile(dest)
	if !bytes.Equal(got, fakeSegment(pipeline.Segment{Timeline: 1, No: 4}, size1M)) {
		t.Error("served bytes differ")
	}
	if _, err := os.Stat(filepath.Join(pf.Dir, segName(4))); err == nil {
		t.Error("the prefetched copy is still there")
	}
}

// The directory goes when recovery ends, when Cleanup asks, and when an
// earlier recovery left it.
func TestPrefetchCleanup(t *testing.T) {
	a := testArchive(t, 3, 8)
	var ended atomic.Bool
	pf := newPrefetch(t, a.fetcher(), "")
	pf.IdleExit = time.Minute
	pf.RecoveryEnded = ended.Load
	pf.Want(segName(3))
	done := runPrefetch(t, pf)
	waitFile(t, filepath.Join(pf.Dir, segName(6)))
	ended.Store(true)
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("the prefetcher outlived recovery")
	}
	if _, err := os.Stat(pf.Dir); err == nil {
		t.Error("the directory survived the end of recovery")
	}

	pf = newPrefetch(t, a.fetcher(), "")
	pf.IdleExit = time.Minute
	pf.Want(segName(3))
	done = runPrefetch(t, pf)
	waitFile(t, filepath.Join(pf.Dir, segName(6)))
	if err := pf.Cleanup(10 * time.Second); err != nil {
		t.Fatal(err)
	}
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("the prefetcher did not stop on cleanup")
	}
	if _, err := os.Stat(pf.Dir); err == nil {
		t.Error("the directory survived cleanup")
	}

	pf = newPrefetch(t, a.fetcher(), "")
	pf.Want(segName(3))
	os.WriteFile(filepath.Join(pf.Dir, segName(4)), fakeSegment(pipeline.Segment{Timeline: 1, No: 4}, size1M), 0o600)
	old := time.Now().Add(-time.Hour)
	os.Chtimes(filepath.Join(pf.Dir, wantFile), old, old)
	pf.CleanStale()
	if _, err := os.Stat(filepath.Join(pf.Dir, segName(4))); err == nil {
		t.Error("a stale directory kept its segments")
	}
}
