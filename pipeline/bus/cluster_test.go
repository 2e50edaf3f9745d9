package bus

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"log/slog"
	"sync"
	"testing"
	"time"

	"github.com/walship/walship/internal/testenv"
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
