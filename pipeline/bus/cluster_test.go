package bus

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/walship/walship/internal/testenv"
	"github.com/walship/walship/pipeline"
)

// A receiver and two archivers started together against a fresh 3-node
// cluster race to create the same replicated streams; nats-server leaves
// the losers' creates unanswered. Every Connect must still succeed, well
// inside the 30 s the commands give it, and leave three replicas.
func TestConnectTogetherOnCluster(t *testing.T) {
	c := testenv.StartNATSCluster(t, 3)
	opts := DefaultOptions()
	opts.Replicas = 3
	var wg sync.WaitGroup
	for i := range 3 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			start := time.Now()
			b, err := Connect(ctx, c.URLs(), opts, slog.New(slog.DiscardHandler))
			if err != nil {
				t.Errorf("process %d: %v", i, err)
				return
			}
			t.Logf("process %d set up in %.1fs", i, time.Since(start).Seconds())
			b.Close()
		}()
	}
	wg.Wait()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	for _, s := range []string{"WALSHIP_SEGMENTS", "WALSHIP_ARCHIVED", "OBJ_WALSHIP_SPOOL", "KV_WALSHIP_STATE"} {
		info, err := c.StreamInfo(ctx, s)
		if err != nil {
			t.Fatalf("%s: %v", s, err)
		}
		if info.Config.Replicas != 3 || info.Cluster == nil || len(info.Cluster.Replicas) != 2 {
			t.Errorf("%s: %d replicas, cluster %+v", s, info.Config.Replicas, info.Cluster)
		}
	}
}

// A process started without --nats-replicas 3 (the default, 1) on a
// cluster whose streams are R3 does not scale them down.
func TestReplicasNeverScaleDown(t *testing.T) {
	c := testenv.StartNATSCluster(t, 3)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	for _, r := range []int{3, 1} {
		opts := DefaultOptions()
		opts.Replicas = r
		b, err := Connect(ctx, c.URLs(), opts, slog.New(slog.DiscardHandler))
		if err != nil {
			t.Fatalf("connect with %d replicas: %v", r, err)
		}
		b.Close()
	}
	for _, s := range []string{"WALSHIP_SEGMENTS", "WALSHIP_ARCHIVED", "OBJ_WALSHIP_SPOOL", "KV_WALSHIP_STATE"} {
		info, err := c.StreamInfo(ctx, s)
		if err != nil {
			t.Fatalf("%s: %v", s, err)
		}
		if info.Config.Replicas != 3 {
			t.Errorf("%s scaled down to %d replicas by a process asking for 1", s, info.Config.Replicas)
		}
	}
}

// An object staged through one connection is read at once through
// another, as an archiver reads what the receiver just staged. A replica
// a moment behind the leader may serve the read; GetObject must still
// return the bytes, never "not found" for an object that exists.
func TestGetObjectJustStagedOnCluster(t *testing.T) {
	c := testenv.StartNATSCluster(t, 3)
	opts := DefaultOptions()
	opts.Replicas = 3
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	connect := func() *Bus {
		b, err := Connect(ctx, c.URLs(), opts, slog.New(slog.DiscardHandler))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(b.Close)
		return b
	}
	recv, arch := connect(), connect()
	data := make([]byte, 1<<20)
	var buf []byte
	for i := range 100 {
		name := fmt.Sprintf("db1/%024X", i)
		binary.BigEndian.PutUint64(data, uint64(i))
		if err := recv.PutObject(ctx, name, bytes.NewReader(data)); err != nil {
			t.Fatal(err)
		}
		got, err := arch.GetObject(ctx, name, buf)
		if err != nil {
			t.Fatalf("object %d: %v", i, err)
		}
		if !bytes.Equal(got, data) {
			t.Fatalf("object %d: other bytes", i)
		}
		buf = got
		if err := recv.DeleteObject(ctx, name); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := arch.GetObject(ctx, "db1/gone", nil); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("a missing object: %v, want os.ErrNotExist", err)
	}
}

// Confirmations keep reaching a receiver's watch when the node it is
// connected to, which also leads the confirmation stream, is killed: the
// flush watermark depends on them. The watch's R1 consumer may have been
// placed on the dead node; the watch must not wait for that node to
// return. Every confirmation published reaches it.
func TestWatchArchivedSurvivesNodeLoss(t *testing.T) {
	c := testenv.StartNATSCluster(t, 3)
	opts := DefaultOptions()
	opts.Replicas = 3
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	connect := func() *Bus {
		b, err := Connect(ctx, c.URLs(), opts, slog.New(slog.DiscardHandler))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(b.Close)
		return b
	}
	watcher, pub := connect(), connect()
	var mu sync.Mutex
	got := map[string]time.Time{}
	published := map[string]time.Time{}
	wctx, stopWatch := context.WithCancel(ctx)
	var wg sync.WaitGroup
	wg.Add(2)
	go func() {
		defer wg.Done()
		watcher.WatchArchived(wctx, "db1", time.Now().Add(-time.Minute), func(ev pipeline.ArchivedEvent) {
			mu.Lock()
			got[ev.File] = time.Now()
			mu.Unlock()
		}, func(err error) { t.Errorf("undecodable: %v", err) })
	}()
	go func() { // a confirmation every 20 ms, each retried until stored
		defer wg.Done()
		for i := uint64(1); wctx.Err() == nil; i++ {
			file := pipeline.Segment{Timeline: 1, No: i}.Name(1 << 20)
			ev := pipeline.ArchivedEvent{SegmentEvent: event(file), Key: "k", Dest: "s3://b/p"}
			for wctx.Err() == nil {
				pctx, stop := context.WithTimeout(wctx, 2*time.Second)
				err := pub.PublishArchived(pctx, &ev)
				stop()
				if err == nil {
					mu.Lock()
					published[file] = time.Now()
					mu.Unlock()
					break
				}
			}
			time.Sleep(20 * time.Millisecond)
		}
	}()
	defer func() { stopWatch(); wg.Wait() }()
	// seen waits until a confirmation published after t reaches the watch.
	seen := func(after time.Time) time.Duration {
		for deadline := time.Now().Add(60 * time.Second); time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
			mu.Lock()
			for f, at := range published {
				if g, ok := got[f]; ok && at.After(after) {
					mu.Unlock()
					return g.Sub(after)
				}
			}
			mu.Unlock()
		}
		t.Fatalf("no confirmation published after %s reached the watch within 60s", after.Format("15:04:05.000"))
		return 0
	}
	seen(time.Now())
	for round := range 4 {
		victim := c.Node(watcher.Conn().ConnectedServerName())
		if err := c.MoveStreamLeader(ctx, "WALSHIP_ARCHIVED", victim); err != nil {
			t.Fatal(err)
		}
		victim.Kill()
		killed := time.Now()
		d := seen(killed)
		t.Logf("round %d: %s (the watcher's server, leader of WALSHIP_ARCHIVED) killed; confirmations again after %.1fs", round, victim.Name, d.Seconds())
		if d > 30*time.Second {
			t.Errorf("round %d: the watch stood still %.1fs", round, d.Seconds())
		}
		victim.Start()
		if err := c.WaitStreamCurrent(ctx, "WALSHIP_ARCHIVED"); err != nil {
			t.Fatal(err)
		}
	}
	seen(time.Now())
	stopWatch()
	wg.Wait()
	mu.Lock()
	defer mu.Unlock()
	last := time.Time{}
	for _, at := range got {
		if at.After(last) {
			last = at
		}
	}
	for f, at := range published {
		if _, ok := got[f]; !ok && at.Before(last) {
			t.Errorf("confirmation %s, published before the last one the watch saw, never reached it", f)
		}
	}
	t.Logf("%d confirmations published, %d seen", len(published), len(got))
}

// An archiver hands an event back (Nak with a delay) just after the
// archivers' consumer lost its leader: the nak must reach the next leader,
// so that the event comes back after the delay, not after AckWait (the
// flush watermark waits for it).
func TestNakAcrossConsumerLeaderLoss(t *testing.T) {
	c := testenv.StartNATSCluster(t, 3)
	opts := DefaultOptions()
	opts.Replicas = 3
	opts.AckWait = 45 * time.Second
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	b, err := Connect(ctx, c.URLs(), opts, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	ev := event("000000010000000000000005")
	if _, err := b.PublishSegment(ctx, &ev); err != nil {
		t.Fatal(err)
	}
	d, err := b.Next(ctx, 5*time.Second)
	if err != nil || d == nil {
		t.Fatalf("next: %v %v", d, err)
	}
	leader, err := c.ConsumerLeader(ctx, "WALSHIP_SEGMENTS", DefaultNames().ServerConsumer("db1"))
	if err != nil {
		t.Fatal(err)
	}
	leader.Kill()
	killed := time.Now()
	if err := d.Nak(time.Second); err != nil {
		t.Fatalf("nak after the consumer's leader died: %v", err)
	}
	t.Logf("nak confirmed %.1fs after %s died", time.Since(killed).Seconds(), leader.Name)
	for time.Since(killed) < opts.AckWait {
		d2, err := b.Next(ctx, 2*time.Second)
		if err != nil || d2 == nil {
			continue
		}
		t.Logf("delivered again %.1fs after the kill (AckWait %s)", time.Since(killed).Seconds(), opts.AckWait)
		if d2.NumDelivered() != 2 {
			t.Errorf("delivery count %d, want 2", d2.NumDelivered())
		}
		if time.Since(killed) > 25*time.Second {
			t.Errorf("the nak was lost: the event came back only after %.1fs", time.Since(killed).Seconds())
		}
		return
	}
	t.Fatalf("the event did not come back within AckWait")
}
