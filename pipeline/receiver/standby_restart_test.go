package receiver

import (
	"context"
	"errors"
	"io"
	"testing"
	"time"

	"github.com/jackc/pglogrepl"

	"github.com/walship/walship/internal/testenv"
	"github.com/walship/walship/pipeline"
)

// review2: a --standby receiver that waits while another connection
// streams the slot ends for good (Run returns, the process exits) when
// PostgreSQL is briefly unreachable during the wait: awaitSlot returns
// querySlot's connection error. A PostgreSQL restart — the usual moment a
// takeover is needed — thus removes the standby; when the active receiver
// later dies nobody takes over and flush stops. README: "PostgreSQL
// restarted ... the receiver reconnects with capped back-off; automatic".
func TestStandbySurvivesPostgresRestart(t *testing.T) {
	pg := testenv.StartPostgres(t, testenv.PGOptions{})
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()

	// Another "receiver" streams the slot.
	cfg, err := ConnConfig(pg.URL("postgres"), "other", "true")
	if err != nil {
		t.Fatal(err)
	}
	other, err := Connect(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := CreateSlot(ctx, other, "walship", true); err != nil {
		t.Fatal(err)
	}
	slot, _, err := ReadSlot(ctx, other, "walship")
	if err != nil {
		t.Fatal(err)
	}
	if err := pglogrepl.StartReplication(ctx, other, "walship", pglogrepl.LSN(slot.RestartLSN), pglogrepl.StartReplicationOptions{Mode: pglogrepl.PhysicalReplication}); err != nil {
		t.Fatal(err)
	}

	r := New(Config{ConnString: pg.URL("postgres"), AppName: "walship", Slot: "walship", Server: "db", SpoolDir: t.TempDir(), Standby: true}, nopPublisher{}, nopConfirmations{})
	done := make(chan error, 1)
	go func() { done <- r.Run(ctx) }()
	deadline := time.Now().Add(60 * time.Second)
	for !r.standby.Load() && time.Now().Before(deadline) {
		select {
		case err := <-done:
			t.Fatalf("the receiver ended before reporting standby: %v", err)
		case <-time.After(50 * time.Millisecond):
		}
	}
	if !r.standby.Load() {
		t.Fatal("receiver never reported standby")
	}

	pg.Stop("immediate") // a PostgreSQL restart: the other connection drops too
	time.Sleep(3 * time.Second)
	pg.Start()

	// The restart dropped the other connection: the standby takes over.
	deadline = time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		select {
		case err := <-done:
			t.Fatalf("the standby receiver ended on a PostgreSQL restart (the process exits): %v", err)
		case <-time.After(200 * time.Millisecond):
		}
		if pg.QueryString(`SELECT count(*)::text FROM pg_stat_replication WHERE application_name = 'walship'`) == "1" {
			break
		}
	}
	if pg.QueryString(`SELECT count(*)::text FROM pg_stat_replication WHERE application_name = 'walship'`) != "1" {
		t.Fatal("the standby did not take the slot over after the restart")
	}
	cancel()
	if err := <-done; err != nil && !errors.Is(err, context.Canceled) {
		t.Logf("after cancel: %v", err)
	}
}

type nopPublisher struct{}

func (nopPublisher) PutObject(ctx context.Context, name string, r io.Reader) error { return nil }
func (nopPublisher) PublishSegment(ctx context.Context, ev *pipeline.SegmentEvent) (uint64, error) {
	return 0, nil
}

type nopConfirmations struct{}

func (nopConfirmations) WatchArchived(ctx context.Context, server string, since time.Time, fn func(pipeline.ArchivedEvent), bad func(error)) error {
	<-ctx.Done()
	return nil
}
