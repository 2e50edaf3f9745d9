package bus

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"log/slog"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/walship/walship/internal/testenv"
	"github.com/walship/walship/pipeline"
)

func connect(t *testing.T, n *testenv.NATS) *Bus {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	b, err := Connect(ctx, n.URL(), DefaultOptions(), slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(b.Close)
	return b
}

func event(file string) pipeline.SegmentEvent {
	seg, _ := pipeline.ParseSegmentName(file, 1<<20)
	return pipeline.SegmentEvent{V: 1, Server: "db1", SystemID: "42", Timeline: 1, File: file, Kind: pipeline.KindSegment,
		StartLSN: seg.StartLSN(1 << 20), EndLSN: seg.EndLSN(1 << 20), Size: 1 << 20, SegSize: 1 << 20,
		SHA256: "0000000000000000000000000000000000000000000000000000000000000000"}
}

// A published event is queued until an archiver acknowledges it; then
// Queued says so, and a reused sequence with another message ID is not
// taken for it.
func TestQueued(t *testing.T) {
	b := connect(t, testenv.StartNATS(t))
	ctx := context.Background()
	ev := event("000000010000000000000005")
	seq, err := b.PublishSegment(ctx, &ev)
	if err != nil || seq == 0 {
		t.Fatalf("publish: seq %d, %v", seq, err)
	}
	if q, err := b.Queued(ctx, seq, ev.PublishID()); err != nil || !q {
		t.Fatalf("fresh event: queued %v, %v", q, err)
	}
	if q, _ := b.Queued(ctx, seq, "someone/else"); q {
		t.Error("another message ID at the same sequence taken for the event")
	}
	d, err := b.Next(ctx, 5*time.Second)
	if err != nil || d == nil {
		t.Fatalf("next: %v %v", d, err)
	}
	if err := d.Ack(ctx); err != nil {
		t.Fatal(err)
	}
	if q, err := b.Queued(ctx, seq, ev.PublishID()); err != nil || q {
		t.Errorf("acknowledged event: queued %v, %v", q, err)
	}
}

func TestObjects(t *testing.T) {
	b := connect(t, testenv.StartNATS(t))
	ctx := context.Background()
	data := bytes.Repeat([]byte("wal"), 100000)
	sum := sha256.Sum256(data)
	if _, err := b.GetObject(ctx, "db1/x", nil); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("missing object: %v, want os.ErrNotExist", err)
	}
	if err := b.PutObject(ctx, "db1/x", bytes.NewReader(data)); err != nil {
		t.Fatal(err)
	}
	if ok, err := b.HasObject(ctx, "db1/x", pipeline.SHA256Hex(sum[:])); err != nil || !ok {
		t.Errorf("HasObject with its digest: %v %v", ok, err)
	}
	if ok, _ := b.HasObject(ctx, "db1/x", "00"+pipeline.SHA256Hex(sum[1:])); ok {
		t.Error("HasObject with another digest")
	}
	got, err := b.GetObject(ctx, "db1/x", nil)
	if err != nil || !bytes.Equal(got, data) {
		t.Fatalf("get: %d bytes, %v", len(got), err)
	}
	if err := b.DeleteObject(ctx, "db1/x"); err != nil {
		t.Fatal(err)
	}
	if ok, _ := b.HasObject(ctx, "db1/x", pipeline.SHA256Hex(sum[:])); ok {
		t.Error("HasObject after delete")
	}
}

// Defect 4 of issue 8: NATS unreachable when the watch starts. The watch
// waits it out and delivers confirmations once NATS is back, instead of
// returning and leaving the receiver without confirmations. Events it
// cannot decode are reported, not dropped silently.
func TestWatchArchivedWaitsForNATS(t *testing.T) {
	n := testenv.StartNATS(t)
	b := connect(t, n)
	n.Stop()
	var mu sync.Mutex
	var got []string
	var bad []error
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		done <- b.WatchArchived(ctx, "db1", time.Now().Add(-time.Hour),
			func(ev pipeline.ArchivedEvent) { mu.Lock(); got = append(got, ev.File); mu.Unlock() },
			func(err error) { mu.Lock(); bad = append(bad, err); mu.Unlock() })
	}()
	time.Sleep(2 * time.Second)
	select {
	case err := <-done:
		t.Fatalf("the watch returned while NATS was down: %v", err)
	default:
	}
	n.Start()
	ev := pipeline.ArchivedEvent{SegmentEvent: event("000000010000000000000005"), Key: "k", Dest: "s3://b/p"}
	deadline := time.Now().Add(20 * time.Second)
	for {
		pctx, pcancel := context.WithTimeout(context.Background(), 2*time.Second)
		err := b.PublishArchived(pctx, &ev)
		pcancel()
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("publish after NATS returned: %v", err)
		}
		time.Sleep(200 * time.Millisecond)
	}
	nc, err := nats.Connect(n.URL())
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	js, _ := nc.JetStream()
	if _, err := js.Publish(ArchivedSubject("db1"), []byte(`{"v":2}`)); err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(20 * time.Second); ; time.Sleep(100 * time.Millisecond) {
		mu.Lock()
		ok := len(got) == 1 && got[0] == ev.File && len(bad) == 1
		mu.Unlock()
		if ok {
			break
		}
		if time.Now().After(deadline) {
			mu.Lock()
			t.Fatalf("after NATS returned: delivered %v, undecodable %v", got, bad)
		}
	}
	cancel()
	if err := <-done; err != nil {
		t.Errorf("watch ended with %v", err)
	}
}
