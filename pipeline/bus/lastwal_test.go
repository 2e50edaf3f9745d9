package bus

import (
	"context"
	"fmt"
	"testing"

	"github.com/walship/walship/internal/testenv"
	"github.com/walship/walship/pipeline"
)

// status shows the last archived WAL file, not a base backup's chunk that
// was confirmed after it on the same subject.
func TestSnapshotSkipsBackupConfirmations(t *testing.T) {
	n := testenv.StartNATS(t)
	b := connect(t, n)
	ctx := context.Background()
	if err := b.PutState(ctx, "db1", []byte(`{"server":"db1"}`)); err != nil {
		t.Fatal(err)
	}
	wal := event("000000010000000000000005")
	if err := b.PublishArchived(ctx, &pipeline.ArchivedEvent{SegmentEvent: wal, Key: "k"}); err != nil {
		t.Fatal(err)
	}
	// Another server's WAL in between, then a run of backup chunks.
	other := event("000000010000000000000009")
	other.Server = "db2"
	b.PublishArchived(ctx, &pipeline.ArchivedEvent{SegmentEvent: other, Key: "k"})
	for i := range 20 {
		ch := wal
		ch.Kind, ch.File, ch.EndLSN, ch.Size = pipeline.KindBackup, fmt.Sprintf("20261129T210000Z/base/%06d", i), ch.StartLSN, 10
		if err := b.PublishArchived(ctx, &pipeline.ArchivedEvent{SegmentEvent: ch, Key: "k"}); err != nil {
			t.Fatal(err)
		}
	}
	snap, err := ReadSnapshot(ctx, n.URL(), DefaultNames())
	if err != nil {
		t.Fatal(err)
	}
	if ev := snap.LastArchived["db1"]; ev == nil || ev.File != wal.File {
		t.Fatalf("last archived %+v, want %s", ev, wal.File)
	}
}
