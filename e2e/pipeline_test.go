package e2e

import (
	"context"
	"sync"
	"sync/atomic"
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
// restart_lsn nor the reported flush_lsn is ever past the contiguous WAL
// in the bucket: the run of whole segments, and the ranges of the segment
// after it. PostgreSQL is read before the bucket, so a sample can only err
// towards passing by the few milliseconds between. It counts the samples
// whose flush was inside a segment, beyond the whole segments (midSegment).
//
// The slot was created at initial, inside segment first: the archive needs
// nothing before it, so positions up to initial are always allowed. While
// S3 is unreachable no sample is taken.
func (st *stack) invariantSampler(ctx context.Context, t *testing.T, first uint64) (samples *int, midSegment *atomic.Int64, wait func()) {
	n := 0
	var mid atomic.Int64
	done := make(chan struct{})
	initial := st.slotRestart()
	go func() {
		defer close(done)
		for ctx.Err() == nil {
			restart := st.slotRestart()
			flush := st.replFlush()
			ranges, err := rangesOnDisk(st) // before the whole segments: see rangesOnDisk
			if err != nil {
				time.Sleep(100 * time.Millisecond)
				continue
			}
			have, err := st.tryArchivedSegments()
			if err != nil {
				time.Sleep(100 * time.Millisecond)
				continue
			}
			whole := contiguousEnd(have, first)
			end := max(extendByRanges(whole, ranges, nil, nil), initial)
			if restart > end || flush > end {
				t.Errorf("invariant broken: restart_lsn %s, flush_lsn %s, bucket contiguous to %s", restart, flush, end)
			}
			if flush > max(whole, initial) && segSize.Offset(flush) != 0 {
				mid.Add(1)
			}
			n++
			time.Sleep(100 * time.Millisecond)
		}
	}()
	return &n, &mid, func() { <-done }
}

// Byte for byte, with the invariant sampled throughout: 20 s of heavy load
// (whose segments fill faster than --partial-interval: no ranges), then a
// quiet spell of small commits, whose WAL goes up in ranges and moves flush
// inside the segment being written.
func TestByteForByteAndInvariant(t *testing.T) {
	st := newStack(t)
	st.pg.Exec(`SELECT 1`)
	if err := st.pg.Pgbench(context.Background(), "-i", "-s", "2", "-q"); err != nil {
		t.Fatal(err)
	}
	w := startWalship(t, st.env(), st.args("run", "--create-slot", "--partial-interval", "1s")...)
	waitFor(t, 30*time.Second, "the slot to be active", func() bool {
		return st.pg.QueryString(`SELECT active::text FROM pg_replication_slots WHERE slot_name='walship'`) == "true"
	})
	first := segSize.Start(st.slotRestart())
	firstSeg := uint64(first) / uint64(segSize)

	ctx, cancel := context.WithCancel(context.Background())
	samples, mid, waitSampler := st.invariantSampler(ctx, t, firstSeg)
	// However the test ends, the sampler stops before it does.
	defer func() { cancel(); waitSampler() }()
	cutBefore, _ := st.metric("walship_partial_ranges_cut_total")
	segsBefore := st.currentLSN()
	loadCtx, stopLoad := context.WithTimeout(ctx, 20*time.Second)
	wg := st.load(loadCtx, t)
	wg.Wait()
	stopLoad()
	cutLoad, _ := st.metric("walship_partial_ranges_cut_total")
	loadSegs := (st.currentLSN() - segsBefore) / pipeline.LSN(segSize)
	// At most the segment open when the load began (it may have been open
	// longer than the interval) is cut.
	if cutLoad-cutBefore > 1 {
		t.Errorf("%v ranges cut during a load that wrote %d segments: a busy server must upload whole segments only", cutLoad-cutBefore, loadSegs)
	}
	// The quiet spell starts once the receiver has caught up with the load
	// (before that, the segments it writes fill at once: no ranges).
	loadEnd := st.currentLSN()
	waitFor(t, 60*time.Second, "the receiver to catch up with the load", func() bool {
		return st.lsn(`SELECT coalesce((SELECT write_lsn::text FROM pg_stat_replication WHERE application_name = 'walship'), '0/0')`) >= loadEnd
	})
	st.pg.Exec(`CREATE TABLE quiet (id serial, at timestamptz default clock_timestamp())`)
	for i := 0; i < 40; i++ {
		st.pg.Exec(`INSERT INTO quiet DEFAULT VALUES`)
		time.Sleep(200 * time.Millisecond)
	}
	waitFor(t, 30*time.Second, "a sample with flush inside the segment being written", func() bool { return mid.Load() > 0 })
	cutQuiet, _ := st.metric("walship_partial_ranges_cut_total")
	if cutQuiet-cutLoad < 3 {
		t.Errorf("%v ranges cut in 8 s of small commits with --partial-interval 1s, want at least 3", cutQuiet-cutLoad)
	}
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
	t.Logf("%d segments compared byte for byte, %d invariant samples (%d with flush inside a segment); ranges cut: %v during %d segments of load, %v in the quiet spell",
		n, *samples, mid.Load(), cutLoad-cutBefore, loadSegs, cutQuiet-cutLoad)
}
