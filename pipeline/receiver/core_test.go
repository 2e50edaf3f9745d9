package receiver

import (
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/walship/walship/internal/walgen"
	"github.com/walship/walship/pipeline"
)

// fakePub records what the Core publishes (a unit-test stand-in; the
// pipeline is proved against NATS in e2e and the simulation).
type fakePub struct {
	events []pipeline.SegmentEvent
	puts   []string
	queued map[uint64]bool
	staged map[string]bool
	seq    uint64
}

func (p *fakePub) PutObject(ctx context.Context, name string, r io.Reader) error {
	io.Copy(io.Discard, r)
	p.puts = append(p.puts, name)
	return nil
}

func (p *fakePub) PublishSegment(ctx context.Context, ev *pipeline.SegmentEvent) (uint64, error) {
	p.seq++
	p.events = append(p.events, *ev)
	return p.seq, nil
}

func (p *fakePub) Queued(ctx context.Context, seq uint64, msgID string) (bool, error) {
	return p.queued[seq], nil
}

func (p *fakePub) HasObject(ctx context.Context, name, sha string) (bool, error) {
	return p.staged[name], nil
}

var hist = walgen.History{{TLI: 1}, {TLI: 2, Begin: 7<<20 + 300}, {TLI: 3, Begin: 9<<20 + 5000}}

func newTestCore(t *testing.T, dir string, fs FS) *Core {
	t.Helper()
	c, err := NewCore(CoreConfig{Server: "s", SystemID: "42", Size: mb, Dir: dir, FS: fs, Dest: "s3://b/p"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Release)
	return c
}

// stream feeds the Core the WAL of timeline tli from its resume point to
// end, in chunks.
func stream(t *testing.T, c *Core, end pipeline.LSN) {
	t.Helper()
	tli, start := c.Resume()
	if !c.spool.isOpen() {
		if err := c.Open(start); err != nil {
			t.Fatal(err)
		}
	}
	at := c.spool.written
	buf := make([]byte, 300000)
	for at < end {
		n := min(pipeline.LSN(len(buf)), end-at)
		walgen.Fill(buf[:n], at, tli, end, hist, 42, mb)
		if err := c.WAL(at, buf[:n]); err != nil {
			t.Fatal(err)
		}
		at += n
	}
}

func historyContent(tli uint32) []byte {
	var b strings.Builder
	for i := 1; i < len(hist) && hist[i].TLI <= tli; i++ {
		fmt.Fprintf(&b, "%d\t%s\tno recovery target specified\n", hist[i-1].TLI, hist[i].Begin)
	}
	return []byte(b.String())
}

// serverHistory answers TIMELINE_HISTORY for the test's timelines.
func serverHistory(tli uint32) ([]byte, error) { return historyContent(tli), nil }

func confirmAll(c *Core, pub *fakePub) {
	for _, ev := range pub.events {
		c.Archived(pipeline.ArchivedEvent{SegmentEvent: ev, Key: "k", Dest: "s3://b/p"})
	}
}

func publishAll(t *testing.T, c *Core, pub *fakePub) {
	t.Helper()
	for {
		it, ok := c.TryNext()
		if !ok {
			return
		}
		if err := c.Publish(context.Background(), pub, it); err != nil {
			t.Fatal(err)
		}
	}
}

// Defect 2: two timeline switches before anything is archived; once all
// is confirmed, flush reaches the segment being written on timeline 3.
func TestCoreTwoSwitchesThenArchived(t *testing.T) {
	c := newTestCore(t, t.TempDir(), nil)
	if err := c.Start(StartInput{Slot: SlotState{Exists: true, RestartLSN: 5 << 20, Timeline: 1}, ServerTLI: 1, ServerPos: 5 << 20, History: serverHistory}); err != nil {
		t.Fatal(err)
	}
	stream(t, c, hist[1].Begin)
	if err := c.EndTimeline(2, hist[1].Begin, historyContent(2)); err != nil {
		t.Fatal(err)
	}
	stream(t, c, hist[2].Begin)
	if err := c.EndTimeline(3, hist[2].Begin, historyContent(3)); err != nil {
		t.Fatal(err)
	}
	stream(t, c, 11<<20+77)
	pub := &fakePub{}
	publishAll(t, c, pub)
	if got := c.Flush(); got != 5<<20 {
		t.Fatalf("flush %s before any confirmation", got)
	}
	confirmAll(c, pub)
	if got, want := c.Flush(), pipeline.LSN(11<<20); got != want {
		t.Fatalf("flush %s after every confirmation, want %s (the open segment)", got, want)
	}
	files, _ := os.ReadDir(c.spool.dir)
	for _, f := range files {
		if f.Name() != lockName && !strings.HasSuffix(f.Name(), partialSuffix) {
			t.Errorf("archived file %s still in the spool", f.Name())
		}
	}
}

// Defects 1 and 10: a restart after a promotion keeps every file of the
// old timeline pending, and the ended segment keeps its end LSN.
func TestCoreRestartAfterPromotion(t *testing.T) {
	dir := t.TempDir()
	c := newTestCore(t, dir, nil)
	if err := c.Start(StartInput{Slot: SlotState{Exists: true, RestartLSN: 5 << 20, Timeline: 1}, ServerTLI: 1, ServerPos: 5 << 20, History: serverHistory}); err != nil {
		t.Fatal(err)
	}
	stream(t, c, hist[1].Begin)
	if err := c.EndTimeline(2, hist[1].Begin, historyContent(2)); err != nil {
		t.Fatal(err)
	}
	stream(t, c, 8<<20+10)
	c.Release()

	c2 := newTestCore(t, dir, nil)
	if err := c2.Start(StartInput{Slot: SlotState{Exists: true, RestartLSN: 5 << 20, Timeline: 1}, ServerTLI: 2, ServerPos: 8<<20 + 10, History: serverHistory}); err != nil {
		t.Fatal(err)
	}
	if got := c2.Flush(); got != 5<<20 {
		t.Fatalf("flush %s after the restart, want 0/500000: timeline 1's segments 5 and 6 are not archived", got)
	}
	if tli, start := c2.Resume(); tli != 2 || start != 8<<20 {
		t.Errorf("resume %d/%s, want 2/0/800000", tli, start)
	}
	pub := &fakePub{}
	publishAll(t, c2, pub)
	var partial *pipeline.SegmentEvent
	for i, ev := range pub.events {
		if ev.Attempt != 1 {
			t.Errorf("%s found at start published with attempt %d, want 1", ev.File, ev.Attempt)
		}
		if ev.Kind == pipeline.KindPartial {
			partial = &pub.events[i]
		}
	}
	if len(pub.events) != 5 {
		t.Errorf("published %d files, want 5 (1/5, 1/6, 1/7 partial, 2.history, 2/7)", len(pub.events))
	}
	if partial == nil || partial.EndLSN != hist[1].Begin {
		t.Fatalf("ended segment republished as %+v, want end %s", partial, hist[1].Begin)
	}
}

// Defect 3: after a restart, segments missing from the spool between two
// pending ones need no replayed confirmation: the server sends them again.
func TestCoreRestartWithGapInSpool(t *testing.T) {
	dir := t.TempDir()
	for _, no := range []uint64{5, 20} {
		s := seg(1, no)
		data := walgen.Segment(s, 1<<40, hist[:1], 42, mb)
		if err := os.WriteFile(filepath.Join(dir, s.Name(mb)), data, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	c := newTestCore(t, dir, nil)
	if err := c.Start(StartInput{Slot: SlotState{Exists: true, RestartLSN: 5 << 20, Timeline: 1}, ServerTLI: 1, ServerPos: 30 << 20, History: serverHistory}); err != nil {
		t.Fatal(err)
	}
	if tli, start := c.Resume(); tli != 1 || start != 6<<20 {
		t.Fatalf("resume %d/%s, want 1/0/600000: segments 6 to 19 are not in the spool", tli, start)
	}
	pub := &fakePub{}
	publishAll(t, c, pub)
	confirmAll(c, pub)
	if got := c.Flush(); got != 6<<20 {
		t.Fatalf("flush %s after 5 and 20 are confirmed, want 0/600000", got)
	}
	stream(t, c, 21<<20+100)
	publishAll(t, c, pub)
	confirmAll(c, pub)
	if got := c.Flush(); got != 21<<20 {
		t.Fatalf("flush %s after every segment is confirmed, want 0/1500000", got)
	}
}

// Defect 9: a late confirmation leads to a check first; an event still
// queued is not published again, and staged bytes still in the object
// store are not put again.
func TestCorePublishChecksBeforeRepublishing(t *testing.T) {
	clock := time.Unix(1000, 0)
	c, err := NewCore(CoreConfig{Server: "s", SystemID: "42", Size: mb, Dir: t.TempDir(), StageObjects: true,
		Now: func() time.Time { return clock }})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Release()
	if err := c.Start(StartInput{Slot: SlotState{Exists: true, RestartLSN: 5 << 20, Timeline: 1}, ServerTLI: 1, ServerPos: 5 << 20, History: serverHistory}); err != nil {
		t.Fatal(err)
	}
	stream(t, c, 6<<20+1)
	pub := &fakePub{queued: map[uint64]bool{}, staged: map[string]bool{}}
	publishAll(t, c, pub)
	if len(pub.events) != 1 || len(pub.puts) != 1 {
		t.Fatalf("first publish: %d events, %d puts", len(pub.events), len(pub.puts))
	}
	clock = clock.Add(time.Hour)
	now := clock
	pub.queued[1] = true
	if n := c.Tick(now, time.Minute); n != 1 {
		t.Fatalf("tick queued %d checks", n)
	}
	publishAll(t, c, pub)
	if len(pub.events) != 1 || len(pub.puts) != 1 {
		t.Fatalf("the event is still queued, yet it was published again (%d events, %d puts)", len(pub.events), len(pub.puts))
	}
	if n := c.Tick(now.Add(time.Second), time.Minute); n != 0 {
		t.Fatalf("the check did not restart the timer")
	}
	pub.queued[1] = false
	pub.staged["s/"+pub.events[0].File] = true
	clock = clock.Add(time.Hour)
	c.Tick(clock, time.Minute)
	publishAll(t, c, pub)
	if len(pub.events) != 2 || pub.events[1].Attempt != 1 {
		t.Fatalf("a gone event was not published again with attempt 1: %+v", pub.events)
	}
	if len(pub.puts) != 1 {
		t.Errorf("staged bytes still in the object store were put again")
	}
}

// recFS records the order of file-system calls.
type recFS struct {
	OSFS
	calls []string
}

func (f *recFS) Create(name string, size int64) (File, error) {
	f.calls = append(f.calls, "create "+filepath.Base(name))
	return f.OSFS.Create(name, size)
}

func (f *recFS) SyncDir(dir string) error {
	f.calls = append(f.calls, "syncdir")
	return f.OSFS.SyncDir(dir)
}

// Defect 10: a new .partial's directory entry is durable before a write
// position inside it is reported.
func TestCoreOpenSyncsDirectory(t *testing.T) {
	fs := &recFS{}
	c := newTestCore(t, t.TempDir(), fs)
	if err := c.Start(StartInput{Slot: SlotState{Exists: true, RestartLSN: 5 << 20, Timeline: 1}, ServerTLI: 1, ServerPos: 5 << 20, History: serverHistory}); err != nil {
		t.Fatal(err)
	}
	if err := c.Open(5 << 20); err != nil {
		t.Fatal(err)
	}
	i := len(fs.calls)
	if i < 2 || fs.calls[i-2] != "create 000000010000000000000005.partial" || fs.calls[i-1] != "syncdir" {
		t.Fatalf("calls %v: want the create followed by a directory fsync", fs.calls)
	}
}

// hookFS runs before() once, just before the first Remove of target.
type hookFS struct {
	OSFS
	target string
	before func()
}

func (f *hookFS) Remove(name string) error {
	if f.before != nil && filepath.Base(name) == f.target {
		b := f.before
		f.before = nil
		b()
	}
	return f.OSFS.Remove(name)
}

// Found by the adversarial review: the confirmation of a file and the
// replication loop writing the same name again (after a restart) must not
// interleave, or the removal takes the new file while it is pending and
// its publication fails for good.
func TestCoreConfirmDoesNotRemoveARewrittenFile(t *testing.T) {
	dir := t.TempDir()
	c1 := newTestCore(t, dir, nil)
	if err := c1.Start(StartInput{Slot: SlotState{Exists: true, RestartLSN: 5 << 20, Timeline: 1}, ServerTLI: 1, ServerPos: 5 << 20, History: serverHistory}); err != nil {
		t.Fatal(err)
	}
	stream(t, c1, hist[1].Begin)
	if err := c1.EndTimeline(2, hist[1].Begin, historyContent(2)); err != nil {
		t.Fatal(err)
	}
	stream(t, c1, 7<<20+5000)
	c1.Release()

	// Second life: timeline 1's last segment is streamed again, so the
	// history file is written again while its first copy is pending.
	fs := &hookFS{target: pipeline.HistoryFileName(2)}
	c2 := newTestCore(t, dir, fs)
	if err := c2.Start(StartInput{Slot: SlotState{Exists: true, RestartLSN: 5 << 20, Timeline: 1}, ServerTLI: 2, ServerPos: 7<<20 + 5000, History: serverHistory}); err != nil {
		t.Fatal(err)
	}
	if tli, start := c2.Resume(); tli != 1 || start != 7<<20 {
		t.Fatalf("resume %d/%s, want 1/0/700000", tli, start)
	}
	pub := &fakePub{}
	publishAll(t, c2, pub)
	var histEv pipeline.SegmentEvent
	for _, ev := range pub.events {
		if ev.Kind == pipeline.KindHistory {
			histEv = ev
		}
	}
	// The replication goroutine follows the switch again while the watcher
	// is between confirming the history file and removing it.
	done := make(chan error, 1)
	fs.before = func() {
		go func() {
			if err := c2.Open(7 << 20); err != nil {
				done <- err
				return
			}
			buf := make([]byte, hist[1].Begin-7<<20)
			walgen.Fill(buf, 7<<20, 1, hist[1].Begin, hist, 42, mb)
			if err := c2.WAL(7<<20, buf); err != nil {
				done <- err
				return
			}
			done <- c2.EndTimeline(2, hist[1].Begin, historyContent(2))
		}()
		time.Sleep(100 * time.Millisecond) // room for it to run, if nothing stops it
	}
	c2.Archived(pipeline.ArchivedEvent{SegmentEvent: histEv, Key: "k", Dest: "s3://b/p"})
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	_, err := os.Stat(filepath.Join(dir, pipeline.HistoryFileName(2)))
	if c2.tr.isPending(histEv) && err != nil {
		t.Fatalf("the history file is pending but gone from the spool (%v): its publication can never succeed", err)
	}
}
