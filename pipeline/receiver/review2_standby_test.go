package receiver

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/jackc/pglogrepl"

	"github.com/walship/walship/internal/testenv"
)

// review2: a --standby receiver that waits while another connection
// streams the slot ends for good (Run returns, the process exits) when
// PostgreSQL is briefly unreachable during the wait: awaitSlot returns
// querySlot's connection error. A PostgreSQL restart — the usual moment a
// takeover is needed — thus removes the standby; when the active receiver
// later dies nobody takes over and flush stops. README: "PostgreSQL
// restarted ... the receiver reconnects with capped back-off; automatic".
func TestReview2StandbySurvivesPostgresRestart(t *testing.T) {
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

	r := New(Config{ConnString: pg.URL("postgres"), AppName: "walship", Slot: "walship", Server: "db", SpoolDir: t.TempDir(), Standby: true}, nil, nil)
	done := make(chan error, 1)
	go func() { done <- r.Run(ctx) }()
	deadline := time.Now().Add(30 * time.Second)
	for !r.standby.Load() && time.Now().Before(deadline) {
		time.Sleep(50 * time.Millisecond)
	}
	if !r.standby.Load() {
		t.Fatal("receiver never reported standby")
	}

	pg.Stop("immediate") // a PostgreSQL restart: the other connection drops too
	time.Sleep(3 * time.Second)
	pg.Start()

	select {
	case err := <-done:
		t.Fatalf("the standby receiver ended on a PostgreSQL restart (the process exits): %v", err)
	case <-time.After(3 * time.Second):
	}
	cancel()
	if err := <-done; err != nil && !errors.Is(err, context.Canceled) {
		t.Logf("after cancel: %v", err)
	}
}
