package testenv

import (
	"context"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// The helper's own proof: three processes form a JetStream cluster, an R3
// stream has a leader the API names, the leader killed with SIGKILL is
// replaced, and restarted on its store it catches up with what was
// published while it was down.
func TestNATSCluster(t *testing.T) {
	c := StartNATSCluster(t, 3)
	nc, err := nats.Connect(c.URLs(), nats.MaxReconnects(-1), nats.ReconnectWait(100*time.Millisecond))
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	js, _ := jetstream.New(nc)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	if _, err := js.CreateStream(ctx, jetstream.StreamConfig{Name: "T", Subjects: []string{"t"}, Replicas: 3, Storage: jetstream.FileStorage}); err != nil {
		t.Fatal(err)
	}
	publish := func() {
		for {
			pctx, stop := context.WithTimeout(ctx, 2*time.Second)
			_, err := js.Publish(pctx, "t", []byte("x"))
			stop()
			if err == nil {
				return
			}
			if ctx.Err() != nil {
				t.Fatalf("publish: %v", err)
			}
		}
	}
	publish()
	leader, err := c.StreamLeader(ctx, "T")
	if err != nil {
		t.Fatal(err)
	}
	leader.Kill()
	killed := time.Now()
	var next *NATSProc
	for next == nil || next == leader {
		if ctx.Err() != nil {
			t.Fatal("no new leader within 60s")
		}
		qctx, stop := context.WithTimeout(ctx, time.Second)
		next, _ = c.StreamLeader(qctx, "T")
		stop()
	}
	t.Logf("leader %s killed; %s leads after %.1fs", leader.Name, next.Name, time.Since(killed).Seconds())
	publish()
	leader.Start()
	if err := c.WaitHealthy(60 * time.Second); err != nil {
		t.Fatal(err)
	}
	if err := c.WaitStreamCurrent(ctx, "T"); err != nil {
		t.Fatal(err)
	}
	info, err := c.StreamInfo(ctx, "T")
	if err != nil {
		t.Fatal(err)
	}
	if info.State.Msgs != 2 || len(info.Cluster.Replicas) != 2 {
		t.Fatalf("after the restart: %d messages, cluster %+v", info.State.Msgs, info.Cluster)
	}
}
