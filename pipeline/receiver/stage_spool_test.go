package receiver

import (
	"bytes"
	"context"
	"errors"
	"net/http/httptest"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/walship/walship/pipeline"
	"github.com/walship/walship/pipeline/stagehttp"
)

// A receiver process that starts while PostgreSQL is down serves, from
// its spool alone, exactly the files its previous life announced and
// still held (segments, a range, an ended timeline's last segment, a
// history file), byte for byte; never the segment being written, a file
// whose bytes no longer match its checksum, or a file that appeared after
// the start.
func TestSpoolHolderServesPendingFilesBeforePostgres(t *testing.T) {
	secret := []byte("0123456789abcdef-secret")
	srv := stagehttp.NewServer(secret, nil, nil)
	hs := httptest.NewServer(srv)
	defer hs.Close()

	dir := t.TempDir()
	clk := &fakeClock{t: time.Unix(1e9, 0)}
	c, err := NewCore(CoreConfig{Server: "s", SystemID: "42", Size: mb, Dir: dir, Dest: "s3://b/p",
		PartialInterval: 5 * time.Second, Now: clk.now, StageURL: hs.URL})
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Start(StartInput{Slot: SlotState{Exists: true, RestartLSN: 5 << 20, Timeline: 1}, ServerTLI: 1, ServerPos: 5 << 20, History: serverHistory}); err != nil {
		t.Fatal(err)
	}
	stream(t, c, 6<<20+1000)
	clk.t = clk.t.Add(5 * time.Second)
	syncAndCut(t, c)
	stream(t, c, hist[1].Begin)
	if err := c.EndTimeline(2, hist[1].Begin, historyContent(2)); err != nil {
		t.Fatal(err)
	}
	stream(t, c, hist[1].Begin+100) // the open segment of timeline 2
	pub := &fakePub{}
	publishAll(t, c, pub)
	c.CloseSession()
	c.Release() // the process dies

	// The new process, before PostgreSQL answers.
	h := newSpoolHolder(OSFS{}, dir)
	defer srv.Hold("s", h)()
	// A file that appears after the start is not served.
	late := pipeline.Segment{Timeline: 2, No: 9}.Name(mb)
	os.WriteFile(filepath.Join(dir, late), []byte("late"), 0o600)
	os.WriteFile(filepath.Join(dir, late+sumSuffix), []byte(sha256Hex([]byte("late"))+"\n"), 0o600)

	cl := stagehttp.NewClient(stagehttp.ClientConfig{Secret: secret})
	ctx := context.Background()
	if len(pub.events) < 4 {
		t.Fatalf("%d events", len(pub.events))
	}
	for _, ev := range pub.events {
		want, err := os.ReadFile(ev.Spool)
		if err != nil {
			t.Fatal(err)
		}
		got, err := cl.Fetch(ctx, ev.URL, ev.SHA256, ev.Size, nil)
		if err != nil || !bytes.Equal(got, want) || sha256Hex(got) != ev.SHA256 {
			t.Fatalf("%s %s before PostgreSQL: %d bytes (%v), want the spool's %d", ev.Kind, ev.File, len(got), err, len(want))
		}
	}
	if n := h.files(); n != len(pub.events) {
		t.Errorf("serves %d files, the previous life held %d", n, len(pub.events))
	}
	for _, name := range []string{late, pipeline.Segment{Timeline: 2, No: 7}.Name(mb) + partialSuffix} {
		if _, err := cl.Fetch(ctx, stagehttp.URL(hs.URL, "s", name), "", 4, nil); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("%s: %v, want not found", name, err)
		}
	}
	// Damaged on disk: its bytes are not the announced ones: not served.
	var seg pipeline.SegmentEvent
	for _, ev := range pub.events {
		if ev.Kind == pipeline.KindSegment {
			seg = ev
		}
	}
	h2 := newSpoolHolder(OSFS{}, dir)
	defer srv.Hold("s", h2)()
	f, _ := os.OpenFile(seg.Spool, os.O_WRONLY, 0)
	f.WriteAt([]byte{0xff}, 100)
	f.Close()
	if _, err := cl.Fetch(ctx, seg.URL, seg.SHA256, seg.Size, nil); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("damaged %s: %v, want not found", seg.File, err)
	}
}
