package bus

import (
	"context"
	"testing"
	"time"

	"github.com/walship/walship/internal/testenv"
)

// Consuming says the archivers consume only once a fetch from their
// consumer has succeeded, and not after one failed: /readyz of an archiver.
func TestConsuming(t *testing.T) {
	n := testenv.StartNATS(t)
	b := connect(t, n)
	ctx := context.Background()
	if err := b.Consuming(); err == nil {
		t.Fatal("consuming before any fetch")
	}
	if d, err := b.Next(ctx, 200*time.Millisecond); err != nil || d != nil {
		t.Fatalf("next on an empty queue: %v %v", d, err)
	}
	if err := b.Consuming(); err != nil {
		t.Fatalf("after a fetch that found nothing: %v", err)
	}
	n.Stop()
	deadline := time.Now().Add(20 * time.Second)
	for b.Consuming() == nil && time.Now().Before(deadline) {
		b.Next(ctx, 200*time.Millisecond)
	}
	if err := b.Consuming(); err == nil {
		t.Fatal("still consuming with NATS stopped")
	} else {
		t.Logf("NATS stopped: %v", err)
	}
	n.Start()
	deadline = time.Now().Add(30 * time.Second)
	for b.Consuming() != nil && time.Now().Before(deadline) {
		b.Next(ctx, 200*time.Millisecond)
	}
	if err := b.Consuming(); err != nil {
		t.Fatalf("NATS back: %v", err)
	}
}
