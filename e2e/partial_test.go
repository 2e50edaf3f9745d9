package e2e

import (
	"context"
	"os"
	"path/filepath"
	"sort"
	"sync"
	"testing"
	"time"

	"github.com/walship/walship/internal/testenv"
)

// committer inserts a row every gap into rpo on p, recording when each
// commit returned, until stopped.
type committer struct {
	mu    sync.Mutex
	times []time.Time // times[i]: when the commit of row id i+1 returned
	stop  context.CancelFunc
	done  chan struct{}
}

func startCommitter(t testing.TB, p *testenv.Postgres, phase string, gap time.Duration) *committer {
	ctx, cancel := context.WithCancel(context.Background())
	c := &committer{stop: cancel, done: make(chan struct{})}
	conn := p.Conn(context.Background())
	go func() {
		defer close(c.done)
		defer conn.Close(context.Background())
		for ctx.Err() == nil {
			if _, err := conn.Exec(ctx, `INSERT INTO rpo (phase) VALUES ($1)`, phase); err != nil {
				if ctx.Err() == nil {
					t.Errorf("insert: %v", err)
				}
				return
			}
			c.mu.Lock()
			c.times = append(c.times, time.Now())
			c.mu.Unlock()
			select {
			case <-ctx.Done():
			case <-time.After(gap):
			}
		}
	}()
	return c
}

func (c *committer) halt() []time.Time {
	c.stop()
	<-c.done
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]time.Time(nil), c.times...)
}

// committedBefore counts the commits that returned before at.
func committedBefore(times []time.Time, at time.Time) int {
	return sort.Search(len(times), func(i int) bool { return !times[i].Before(at) })
}

// crash loses the walship host and the server at once: walship killed,
// PostgreSQL stopped immediately, the spool deleted.
func (st *stack) crash(t *testing.T, w *proc, pg *testenv.Postgres) time.Time {
	at := time.Now()
	w.kill()
	pg.Stop("immediate")
	if err := os.RemoveAll(filepath.Join(st.dataDir, "spool")); err != nil {
		t.Fatal(err)
	}
	return at
}

// checkAmplification measures the range objects in the bucket: their raw
// bytes and stored bytes against the WAL they cover. On a quiet server a
// range holds only new WAL: both must stay within 1.5 times.
func (st *stack) checkAmplification(t *testing.T) (segments, objects int, raw, stored, covered uint64) {
	t.Helper()
	ranges, err := rangesOnDisk(st)
	if err != nil {
		t.Fatal(err)
	}
	for _, rs := range ranges {
		segments++
		reach := reachOf(rs)
		covered += reach
		for _, r := range rs {
			objects++
			raw += r.to - r.from
			stored += uint64(r.size)
		}
	}
	if covered == 0 {
		t.Fatalf("no WAL covered by ranges in the bucket (%d range objects)", objects)
	}
	if a := float64(raw) / float64(covered); a > 1.5 {
		t.Errorf("ranges hold %d raw bytes for %d bytes of WAL: %.2fx, want at most 1.5x", raw, covered, a)
	}
	if a := float64(stored) / float64(covered); a > 1.5 {
		t.Errorf("ranges store %d bytes for %d bytes of WAL: %.2fx, want at most 1.5x", stored, covered, a)
	}
	return segments, objects, raw, stored, covered
}

// restoreAll restores backup from the bucket alone, with fetch
// --allow-partial, and returns the restored server once it is open.
func (st *stack) restoreAll(t *testing.T, from *testenv.Postgres, backup string) *testenv.Postgres {
	t.Helper()
	r := from.Restored(backup, "restore_command = '"+st.restoreCommand("barman-cloud", "--allow-partial")+"'")
	if err := r.TryStart(120 * time.Second); err != nil {
		t.Fatalf("%v\n%s", err, r.Log())
	}
	waitPromoted(t, r)
	return r
}

// Test 1 of issue 10: a quiet server (a small commit every 200 ms, 1 MB
// segments that never fill), then the server and the walship host both
// lost. Restored from a base backup and the bucket alone, with fetch
// --allow-partial, it has every row committed more than the partial
// interval plus an upload before the crash; the rows it has are exactly
// the first ones, without a hole.
func TestPartialRPO(t *testing.T) {
	t.Parallel() // mostly waiting: runs beside the other range tests
	const interval = time.Second
	st := newStack(t)
	st.pg.Exec(`CREATE TABLE rpo (id serial primary key, phase text, at timestamptz default clock_timestamp())`)
	w := startWalship(t, st.env(), st.args("run", "--create-slot", "--partial-interval", interval.String())...)
	waitFor(t, 30*time.Second, "streaming", func() bool { return st.walsenderPID() != "" })
	backup := st.pg.BaseBackup()

	c := startCommitter(t, st.pg, "quiet", 200*time.Millisecond)
	time.Sleep(40 * time.Second)
	segs, objs, raw, stored, covered := st.checkAmplification(t)
	times := c.halt()
	crashed := st.crash(t, w, st.pg)

	r := st.restoreAll(t, st.pg, backup)
	got := count(r, `SELECT count(*)::text FROM rpo`)
	maxID := count(r, `SELECT coalesce(max(id), 0)::text FROM rpo`)
	// A commit is safe once a range holding it is cut (within an interval)
	// and uploaded and confirmed; 2 s is generous for one upload on loopback.
	want := committedBefore(times, crashed.Add(-interval-2*time.Second))
	if got < want || got > len(times) || maxID != got {
		t.Fatalf("restored %d rows (max id %d); %d committed, %d of them more than %s before the crash", got, maxID, len(times), want, interval+2*time.Second)
	}
	lost := len(times) - got
	rpo := time.Duration(0)
	if lost > 0 {
		rpo = crashed.Sub(times[got])
	}
	t.Logf("restored %d of %d rows: the bucket lost the last %d, committed in the %s before the crash; ranges: %d objects over %d segments, %d raw / %d stored bytes for %d bytes of WAL (%.2fx / %.2fx)",
		got, len(times), lost, rpo.Round(10*time.Millisecond), objs, segs, raw, stored, covered, float64(raw)/float64(covered), float64(stored)/float64(covered))
}

// Test 2 of issue 10: the same with a promotion in the middle. walship
// streams from a standby that is promoted; ranges cover the old timeline's
// last segment, then the new timeline's. Restored from a base backup of the
// standby and the bucket alone, every row of timeline 1 is there, and every
// row of timeline 2 committed more than an interval and an upload before
// the crash.
func TestPartialRPOPromotion(t *testing.T) {
	t.Parallel() // mostly waiting: runs beside the other range tests
	const interval = time.Second
	st := newStack(t)
	primary := st.pg
	primary.Exec(`CREATE TABLE rpo (id serial primary key, phase text, at timestamptz default clock_timestamp())`)
	standby := primary.StartStandby()
	st.pg = standby
	w := startWalship(t, st.env(), st.args("run", "--create-slot", "--partial-interval", interval.String())...)
	waitFor(t, 30*time.Second, "streaming from the standby", func() bool { return st.walsenderPID() != "" })
	backup := standby.BaseBackup()

	c1 := startCommitter(t, primary, "timeline 1", 200*time.Millisecond)
	time.Sleep(8 * time.Second)
	tl1 := len(c1.halt())
	waitFor(t, 30*time.Second, "the standby to replay timeline 1's rows", func() bool {
		return count(standby, `SELECT count(*)::text FROM rpo`) == tl1
	})
	primary.Stop("fast")
	standby.Promote()
	waitFor(t, 30*time.Second, "promotion", func() bool { return standby.QueryString(`SELECT pg_is_in_recovery()::text`) == "false" })

	c2 := startCommitter(t, standby, "timeline 2", 200*time.Millisecond)
	time.Sleep(15 * time.Second)
	times := c2.halt()
	crashed := st.crash(t, w, standby)

	r := st.restoreAll(t, standby, backup)
	if got := count(r, `SELECT count(*)::text FROM rpo WHERE phase = 'timeline 1'`); got != tl1 {
		t.Errorf("restored %d rows of timeline 1, want all %d", got, tl1)
	}
	got := count(r, `SELECT count(*)::text FROM rpo WHERE phase = 'timeline 2'`)
	want := committedBefore(times, crashed.Add(-interval-2*time.Second))
	if got < want || got > len(times) {
		t.Fatalf("restored %d rows of timeline 2; %d committed, %d of them more than %s before the crash", got, len(times), want, interval+2*time.Second)
	}
	if tli := r.QueryString(`SELECT substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8)`); tli != "00000003" {
		t.Errorf("restored server on timeline %s, want 3 (recovery followed timeline 2 and ended)", tli)
	}
	t.Logf("restored all %d rows of timeline 1 and %d of %d of timeline 2", tl1, got, len(times))
}
