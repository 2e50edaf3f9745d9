package e2e

import (
	"context"
	"sync"
	"testing"
	"time"

	"github.com/walship/walship/pipeline"
)

// load runs pgbench and a bulk insert loop until ctx is done.
func (st *stack) load(ctx context.Context, t *testing.T) *sync.WaitGroup {
	st.pg.Exec(`CREATE TABLE IF NOT EXISTS bulk (id bigserial primary key, payload text)`)
	var wg sync.WaitGroup
	wg.Add(2)
	go func() {
		defer wg.Done()
		if err := st.pg.Pgbench(ctx, "-c", "2", "-T", "600", "-n"); err != nil {
			t.Errorf("pgbench: %v", err)
		}
	}()
	go func() {
		defer wg.Done()
		conn := st.pg.Conn(context.Background())
		defer conn.Close(context.Background())
		for ctx.Err() == nil {
			_, err := conn.Exec(ctx, `INSERT INTO bulk (payload) SELECT md5(random()::text) || repeat('x', 200) FROM generate_series(1, 5000)`)
			if err != nil && ctx.Err() == nil {
				t.Errorf("bulk insert: %v", err)
				return
			}
		}
	}()
	return &wg
}

// invariantSampler checks, until ctx is done, that neither the slot's
// restart_lsn nor the reported flush_lsn is ever past the contiguous run of
// segments present in the bucket. PostgreSQL is read before the bucket, so
// a sample can only err towards passing by the few milliseconds between.
//
// The slot was created at initial, inside segment first: the archive needs
// nothing before it, so positions up to initial are always allowed. While
// S3 is unreachable no sample is taken.
func (st *stack) invariantSampler(ctx context.Context, t *testing.T, first uint64) (samples *int, wait func()) {
	n := 0
	done := make(chan struct{})
	initial := st.slotRestart()
	go func() {
		defer close(done)
		for ctx.Err() == nil {
			restart := st.slotRestart()
			flush := st.replFlush()
			have, err := st.tryArchivedSegments()
			if err != nil {
				time.Sleep(100 * time.Millisecond)
				continue
			}
			end := max(contiguousEnd(have, first), initial)
			if restart > end || flush > end {
				t.Errorf("invariant broken: restart_lsn %s, flush_lsn %s, bucket contiguous to %s", restart, flush, end)
			}
			n++
			time.Sleep(100 * time.Millisecond)
		}
	}()
	return &n, func() { <-done }
}

func TestByteForByteAndInvariant(t *testing.T) {
	st := newStack(t)
	st.pg.Exec(`SELECT 1`)
	if err := st.pg.Pgbench(context.Background(), "-i", "-s", "2", "-q"); err != nil {
		t.Fatal(err)
	}
	w := startWalship(t, st.env(), st.args("run", "--create-slot")...)
	waitFor(t, 30*time.Second, "the slot to be active", func() bool {
		return st.pg.QueryString(`SELECT active::text FROM pg_replication_slots WHERE slot_name='walship'`) == "true"
	})
	first := segSize.Start(st.slotRestart())
	firstSeg := uint64(first) / uint64(segSize)

	ctx, cancel := context.WithCancel(context.Background())
	samples, waitSampler := st.invariantSampler(ctx, t, firstSeg)
	// However the test ends, the sampler stops before it does.
	defer func() { cancel(); waitSampler() }()
	loadCtx, stopLoad := context.WithTimeout(ctx, 20*time.Second)
	wg := st.load(loadCtx, t)
	wg.Wait()
	stopLoad()
	end := st.switchWAL()
	waitFor(t, 90*time.Second, "flush to reach the switched segment", func() bool { return st.replFlush() >= end })
	cancel()
	waitSampler()
	if *samples < 20 {
		t.Errorf("only %d invariant samples", *samples)
	}
	if err := w.stop(t); err != nil {
		t.Fatalf("walship exit: %v", err)
	}
	endSeg := uint64(end) / uint64(segSize)
	n := st.checkArchive(firstSeg, endSeg)
	if n < 20 {
		t.Errorf("only %d segments were written in 20s of load; the test proves little", n)
	}
	if got := st.slotRestart(); got > end || got < pipeline.LSN(end)-pipeline.LSN(segSize) {
		t.Errorf("after shutdown restart_lsn %s, want the archived end %s", got, end)
	}
	t.Logf("%d segments compared byte for byte, %d invariant samples", n, *samples)
}
