package bus

import (
	"context"
	"encoding/json"
	"fmt"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/walship/walship/internal/testenv"
	"github.com/walship/walship/pipeline"
)

func publishFor(t *testing.T, b *Bus, server string, from, n int) {
	t.Helper()
	ctx := context.Background()
	for i := from; i < from+n; i++ {
		ev := event(fmt.Sprintf("0000000100000000%08X", i))
		ev.Server, ev.SystemID = server, "sys-"+server // message IDs are per system
		if _, err := b.PublishSegment(ctx, &ev); err != nil {
			t.Fatal(err)
		}
	}
}

// take acknowledges the next event and returns its server and file.
func take(t *testing.T, b *Bus) (string, string) {
	t.Helper()
	ctx := context.Background()
	d, err := b.Next(ctx, 5*time.Second)
	if err != nil || d == nil {
		t.Fatalf("next: %v %v", d, err)
	}
	var ev pipeline.SegmentEvent
	if err := json.Unmarshal(d.Data(), &ev); err != nil {
		t.Fatal(err)
	}
	if err := d.Ack(ctx); err != nil {
		t.Fatal(err)
	}
	return ev.Server, ev.File
}

// A server that floods the queue does not put the other servers' events
// behind its own: they come among the next few, and busy servers take
// turns.
func TestFairAcrossServers(t *testing.T) {
	n := testenv.StartNATS(t)
	b := connect(t, n)
	publishFor(t, b, "heavy", 0, 200)
	publishFor(t, b, "light1", 0, 1)
	publishFor(t, b, "light2", 0, 1)
	got := map[string]int{}
	for i := 0; i < 3; i++ {
		s, _ := take(t, b)
		got[s]++
	}
	if got["light1"] != 1 || got["light2"] != 1 {
		t.Errorf("the first 3 events came from %v; want one each of light1 and light2 among them (a single queue would give heavy's 200 first)", got)
	}

	// Two busy servers alternate, each in its own order, from the moment
	// a scan finds the new one.
	publishFor(t, b, "other", 0, 20)
	got = map[string]int{}
	next := map[string]int{}
	time.Sleep(scanEvery + 100*time.Millisecond) // the next scan finds the new server
	for i := 0; i < 18; i++ {
		s, f := take(t, b)
		got[s]++
		seg, _ := pipeline.ParseSegmentName(f, 1<<20)
		if s == "other" {
			if int(seg.No) != next[s] {
				t.Fatalf("server %s: event %s out of order, want segment %d", s, f, next[s])
			}
			next[s]++
		}
	}
	if got["heavy"] < 8 || got["other"] < 8 {
		t.Errorf("18 events from two busy servers: %v; want about 9 each", got)
	}

	// A server that appears later is found by the next scan.
	publishFor(t, b, "late", 0, 1)
	deadline := time.Now().Add(3*scanEvery + 5*time.Second)
	for found := false; !found; {
		if time.Now().After(deadline) {
			t.Fatal("the new server's event never came")
		}
		s, _ := take(t, b)
		found = s == "late"
	}
}

// An archiver of this version replaces the single consumer walship used
// before: it deletes it, and every event it held comes again through the
// server's own consumer, the one it had handed out but not acknowledged
// included.
func TestFormerConsumerReplaced(t *testing.T) {
	n := testenv.StartNATS(t)
	b := connect(t, n)
	ctx := context.Background()
	old, err := b.js.CreateOrUpdateConsumer(ctx, "WALSHIP_SEGMENTS", jetstream.ConsumerConfig{
		Durable: "walship-archivers", AckPolicy: jetstream.AckExplicitPolicy, AckWait: time.Minute, MaxDeliver: -1, FilterSubject: "walship.*.segment",
	})
	if err != nil {
		t.Fatal(err)
	}
	publishFor(t, b, "db1", 0, 3)
	batch, err := old.Fetch(1, jetstream.FetchMaxWait(2*time.Second))
	if err != nil {
		t.Fatal(err)
	}
	held := 0
	for range batch.Messages() {
		held++ // handed out by the former consumer, never acknowledged
	}
	if held != 1 {
		t.Fatalf("former consumer handed out %d events, want 1", held)
	}
	files := map[string]bool{}
	for i := 0; i < 3; i++ {
		_, f := take(t, b)
		files[f] = true
	}
	if len(files) != 3 {
		t.Errorf("events after the change: %v, want all 3", files)
	}
	if _, err := b.js.Consumer(ctx, "WALSHIP_SEGMENTS", "walship-archivers"); err == nil {
		t.Error("the former single consumer is still there")
	}
	if _, err := b.js.Consumer(ctx, "WALSHIP_SEGMENTS", DefaultNames().ServerConsumer("db1")); err != nil {
		t.Errorf("the server's consumer: %v", err)
	}
	if p, err := b.Pending(ctx); err != nil || p != 0 {
		t.Errorf("pending after all were acknowledged: %d %v", p, err)
	}
}
