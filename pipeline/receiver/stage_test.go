package receiver

import (
	"bytes"
	"context"
	"errors"
	"net/http/httptest"
	"os"
	"testing"
	"time"

	"github.com/walship/walship/pipeline"
	"github.com/walship/walship/pipeline/stagehttp"
)

// The claim check end to end inside the receiver: every kind of file the
// Core announces (segments, a range, an ended timeline's last segment, a
// history file) carries a URL under StageURL, and the stage server serves
// exactly the bytes the event's SHA-256 names; once confirmed, the file is
// 404, as are names the Core never announced.
func TestCoreServesAnnouncedFiles(t *testing.T) {
	secret := []byte("0123456789abcdef-secret")
	srv := stagehttp.NewServer(secret, nil, nil)
	hs := httptest.NewServer(srv)
	defer hs.Close()

	clk := &fakeClock{t: time.Unix(1e9, 0)}
	c, err := NewCore(CoreConfig{Server: "s", SystemID: "42", Size: mb, Dir: t.TempDir(), Dest: "s3://b/p",
		PartialInterval: 5 * time.Second, Now: clk.now, StageURL: hs.URL})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Release()
	if err := c.Start(StartInput{Slot: SlotState{Exists: true, RestartLSN: 5 << 20, Timeline: 1}, ServerTLI: 1, ServerPos: 5 << 20, History: serverHistory}); err != nil {
		t.Fatal(err)
	}
	defer srv.Hold("s", c)()
	stream(t, c, 6<<20+1000) // segment 5 whole, 1000 bytes of 6
	clk.t = clk.t.Add(5 * time.Second)
	syncAndCut(t, c) // a range of segment 6
	stream(t, c, hist[1].Begin)
	if err := c.EndTimeline(2, hist[1].Begin, historyContent(2)); err != nil {
		t.Fatal(err)
	}
	pub := &fakePub{}
	publishAll(t, c, pub)

	cl := stagehttp.NewClient(stagehttp.ClientConfig{Secret: secret})
	ctx := context.Background()
	kinds := map[pipeline.Kind]int{}
	for _, ev := range pub.events {
		if ev.URL == "" || ev.Validate() != nil {
			t.Fatalf("%s %s: url %q (%v)", ev.Kind, ev.File, ev.URL, ev.Validate())
		}
		want, err := os.ReadFile(ev.Spool)
		if err != nil {
			t.Fatal(err)
		}
		got, err := cl.Fetch(ctx, ev.URL, ev.SHA256, ev.Size, nil)
		if err != nil || !bytes.Equal(got, want) || int64(len(got)) != ev.Size || sha256Hex(got) != ev.SHA256 {
			t.Fatalf("%s %s: fetched %d bytes (%v), want the spool's %d", ev.Kind, ev.File, len(got), err, len(want))
		}
		kinds[ev.Kind]++
	}
	for _, k := range []pipeline.Kind{pipeline.KindSegment, pipeline.KindRange, pipeline.KindPartial, pipeline.KindHistory} {
		if kinds[k] == 0 {
			t.Errorf("no %s event served (%v)", k, kinds)
		}
	}
	// Another SHA-256 than the held file's: not this file.
	ev := pub.events[0]
	if _, err := cl.Fetch(ctx, ev.URL, sha256Hex([]byte("x")), ev.Size, nil); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("fetch with another sha256: %v, want not found", err)
	}
	// Confirmed: the spool lets it go, the stage forgets it.
	c.Archived(pipeline.ArchivedEvent{SegmentEvent: ev, Key: "k", Dest: "s3://b/p"})
	if _, err := cl.Fetch(ctx, ev.URL, ev.SHA256, ev.Size, nil); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("fetch after confirmation: %v, want not found", err)
	}
	// The open segment is in the spool but never announced.
	open := stagehttp.URL(hs.URL, "s", pipeline.Segment{Timeline: 2, No: 7}.Name(mb)+partialSuffix)
	if _, err := cl.Fetch(ctx, open, "", int64(mb), nil); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("fetch of the segment being written: %v, want not found", err)
	}
}
