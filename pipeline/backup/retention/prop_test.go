package retention

import (
	"context"
	"fmt"
	"math/rand"
	"os"
	"reflect"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/walship/walship/pipeline"
	"github.com/walship/walship/pipeline/backup"
	"github.com/walship/walship/pipeline/backup/retention/retentiontest"
	"github.com/walship/walship/sinks"
	"github.com/walship/walship/sinks/file"
)

const testSeg = pipeline.SegmentSize(1 << 20)

// recSink records the order of deletions.
type recSink struct {
	*file.Sink
	mu      sync.Mutex
	deleted []string
}

func (s *recSink) Delete(ctx context.Context, key string) error {
	s.mu.Lock()
	s.deleted = append(s.deleted, key)
	s.mu.Unlock()
	return s.Sink.Delete(ctx, key)
}

// world is a random bucket: a chain of timelines (maybe with an abandoned
// branch), WAL with gaps, .partial files and trailing ranges, history
// files, walship backups complete and not, and another tool's backups.
type world struct {
	sink    *recSink
	layout  sinks.Layout
	walKeys map[string]pipeline.Segment // segments, .partial, ranges
	keep    []string                    // history files and identity: never deleted
	foreign []pipeline.LSN
	now     time.Time
	// branchAt is where the abandoned branch (timeline 9) leaves
	// timeline 1; 0: none.
	branchAt pipeline.LSN
}

func put(t *testing.T, s sinks.Sink, key string, body []byte) {
	t.Helper()
	if err := s.Put(context.Background(), key, body, sinks.Metadata{Codec: "none", RawSize: int64(len(body))}); err != nil {
		t.Fatal(err)
	}
}

// fastDir is a temporary directory in memory when the machine has one:
// the file sink fsyncs every object, which on a shared disk would make
// hundreds of random buckets take minutes.
func fastDir(t *testing.T) string {
	if d, err := os.MkdirTemp("/dev/shm", "walship-retention-"); err == nil {
		t.Cleanup(func() { os.RemoveAll(d) })
		return d
	}
	return t.TempDir()
}

func newWorld(t *testing.T, r *rand.Rand) *world {
	fs, err := file.New(fastDir(t))
	if err != nil {
		t.Fatal(err)
	}
	w := &world{sink: &recSink{Sink: fs}, walKeys: map[string]pipeline.Segment{}}
	if r.Intn(2) == 0 {
		w.layout = sinks.BarmanCloud{Prefix: "pre", Server: "db"}
	} else {
		w.layout = sinks.WalG{Prefix: "pre"}
	}
	id := sinks.Identity{SystemID: "7", SegmentSize: uint64(testSeg), Server: "db"}
	put(t, w.sink, w.layout.IdentityKey(), id.Body())
	w.keep = append(w.keep, w.layout.IdentityKey())
	S := pipeline.LSN(testSeg)
	// The chain: timeline k runs from switches[k-1] to switches[k].
	switches := []pipeline.LSN{S}
	n := 1 + r.Intn(3)
	for k := 1; k < n; k++ {
		prev := switches[k-1]
		at := prev + S*pipeline.LSN(3+r.Intn(15))
		if r.Intn(2) == 0 {
			at += pipeline.LSN(r.Intn(int(S)))
		}
		switches = append(switches, at)
	}
	end := switches[n-1] + S*pipeline.LSN(6+r.Intn(15))
	var hist []string
	addWAL := func(tli uint32, from, to pipeline.LSN, last bool) {
		first, lastSeg := pipeline.SegmentOf(tli, from, testSeg), pipeline.SegmentOf(tli, to-1, testSeg)
		for seg := first; seg.No <= lastSeg.No; seg = seg.Next() {
			if r.Intn(30) == 0 {
				continue // a gap
			}
			name := seg.Name(testSeg)
			if seg == lastSeg && !last && to != seg.EndLSN(testSeg) && r.Intn(2) == 0 {
				name += ".partial"
			}
			key := w.layout.Key(name, ".zst")
			put(t, w.sink, key, []byte(name))
			w.walKeys[key] = seg
		}
		if last && r.Intn(3) == 0 {
			seg := lastSeg.Next()
			for _, rg := range [][2]uint64{{0, 0x1000}, {0x1000, 0x3000}} {
				key := w.layout.RangeKey(seg.Name(testSeg), rg[0], rg[1], ".zst")
				put(t, w.sink, key, []byte("range"))
				w.walKeys[key] = seg
			}
		}
	}
	for k := 0; k < n; k++ {
		tli := uint32(k + 1)
		to := end
		if k+1 < n {
			to = switches[k+1]
		}
		addWAL(tli, switches[k], to, k+1 == n)
		if k > 0 {
			hist = append(hist, fmt.Sprintf("%d\t%s\tno recovery target specified", k, switches[k]))
			key := w.layout.Key(pipeline.HistoryFileName(tli), "")
			put(t, w.sink, key, []byte(strings.Join(hist, "\n")+"\n"))
			w.keep = append(w.keep, key)
		}
	}
	if r.Intn(4) == 0 {
		// An abandoned branch off timeline 1, numbered above the chain.
		at := switches[0] + S*pipeline.LSN(1+r.Intn(8)) + 0x28
		tli := uint32(9)
		w.branchAt = at
		addWAL(tli, at, at+S*2, false)
		key := w.layout.Key(pipeline.HistoryFileName(tli), "")
		put(t, w.sink, key, []byte(fmt.Sprintf("1\t%s\tbranch\n", at)))
		w.keep = append(w.keep, key)
	}
	timelineAt := func(l pipeline.LSN) uint32 {
		for k := n - 1; k >= 0; k-- {
			if l >= switches[k] {
				return uint32(k + 1)
			}
		}
		return 1
	}
	base := time.Date(2026, 11, 1, 0, 0, 0, 0, time.UTC)
	nb := r.Intn(8)
	var starts []pipeline.LSN
	for i := 0; i < nb; i++ {
		starts = append(starts, S*2+pipeline.LSN(r.Int63n(int64(end-S*4))))
	}
	sort.Slice(starts, func(i, j int) bool { return starts[i] < starts[j] })
	for i, start := range starts {
		stop := start + pipeline.LSN(r.Intn(int(S)*2))
		st := base.Add(time.Duration(i) * time.Hour)
		_, err := retentiontest.Write(context.Background(), w.sink, w.layout, retentiontest.Spec{
			Server: "db", SystemID: "7", SegSize: uint64(testSeg), Timeline: timelineAt(start), EndTimeline: timelineAt(stop),
			StartLSN: start, EndLSN: stop, StartTime: st, EndTime: st.Add(time.Duration(r.Intn(50)) * time.Minute),
			Incomplete: r.Intn(5) == 0,
		})
		if err != nil {
			t.Fatal(err)
		}
	}
	if r.Intn(3) == 0 {
		l := S*2 + pipeline.LSN(r.Int63n(int64(end-S*3)))
		switch w.layout.(type) {
		case sinks.BarmanCloud:
			put(t, w.sink, "pre/db/base/20261101T000000/backup.info", []byte(fmt.Sprintf("status=DONE\nbegin_xlog=%s\ntimeline=1\n", l)))
		case sinks.WalG:
			put(t, w.sink, "pre/basebackups_005/base_000000010000000000000002_backup_stop_sentinel.json", []byte(fmt.Sprintf(`{"LSN": %d, "Timeline": 1}`, uint64(l))))
		}
		w.foreign = append(w.foreign, l)
	}
	w.now = base.Add(time.Duration(nb)*time.Hour + time.Duration(r.Intn(120))*time.Minute)
	return w
}

func (w *world) exists(t *testing.T, key string) bool {
	_, err := w.sink.Head(context.Background(), key)
	return err == nil
}

// TestPruneProperties checks, over many random buckets, that a prune
// keeps what the policy says, never deletes WAL a kept backup (or another
// tool's backup, or one in progress) needs on any timeline, deletes all
// WAL below the floor, and deletes each backup's catalogue first.
func TestPruneProperties(t *testing.T) {
	ctx := context.Background()
	seeds := 300
	if testing.Short() {
		seeds = 60
	}
	for seed := 0; seed < seeds; seed++ {
		r := rand.New(rand.NewSource(int64(seed)))
		w := newWorld(t, r)
		pol := Policy{Keep: r.Intn(4), IncompleteAfter: 24 * time.Hour, Now: w.now}
		if pol.Keep == 0 || r.Intn(2) == 0 {
			pol.KeepWithin = time.Duration(1+r.Intn(6)) * time.Hour
		}
		if r.Intn(3) == 0 {
			pol.IncompleteAfter = time.Duration(1+r.Intn(4)) * time.Hour
		}
		st, err := Scan(ctx, w.sink, w.layout, Options{})
		if err != nil {
			t.Fatalf("seed %d: scan: %v", seed, err)
		}
		plan, err := NewPlan(st, pol)
		if err != nil {
			t.Fatalf("seed %d: plan: %v", seed, err)
		}
		// The policy, computed independently: newest by end LSN (one
		// timeline chain here, so the end timeline orders the same), broken
		// backups kept but not counted.
		complete := st.Complete()
		for i := 1; i < len(complete); i++ {
			if a, b := complete[i-1].Catalog, complete[i].Catalog; a.EndLSN > b.EndLSN {
				t.Fatalf("seed %d: Complete puts %s (ends %s) before %s (ends %s)", seed, a.ID, a.EndLSN, b.ID, b.EndLSN)
			}
		}
		// A backup counts when it restores and its window ends on the
		// newest timeline any restorable backup's window reaches.
		var newestTLI uint32
		for _, b := range complete {
			if !b.Window.Broken && b.Window.Timeline > newestTLI {
				newestTLI = b.Window.Timeline
			}
		}
		countsTowardKeep := func(b *Backup) bool { return !b.Window.Broken && b.Window.Timeline == newestTLI }
		// Recovery can follow the abandoned branch only from a backup that
		// ends on timeline 1 at or before the branch point: one that ends
		// past it never reaches the branch (replay would switch before the
		// backup's end).
		for _, b := range complete {
			if b.Window.Timeline == 9 && (b.Catalog.EndTimeline != 1 || b.Catalog.EndLSN > w.branchAt) {
				t.Fatalf("seed %d: backup %s (timeline %d-%d, %s-%s) has its window on the branch that leaves timeline 1 at %s",
					seed, b.ID, b.Catalog.Timeline, b.Catalog.EndTimeline, b.Catalog.StartLSN, b.Catalog.EndLSN, w.branchAt)
			}
		}
		wantKeep := map[string]bool{}
		counted := 0
		for i := len(complete) - 1; i >= 0 && counted < pol.Keep; i-- {
			wantKeep[complete[i].ID] = true
			if countsTowardKeep(complete[i]) {
				counted++
			}
		}
		cut := w.now.Add(-pol.KeepWithin)
		olderKept := false
		for i := len(complete) - 1; i >= 0 && pol.KeepWithin > 0; i-- {
			if !complete[i].Catalog.EndTime.Before(cut) {
				wantKeep[complete[i].ID] = true
			} else if !olderKept {
				wantKeep[complete[i].ID], olderKept = true, countsTowardKeep(complete[i])
			}
		}
		gotKeep := map[string]bool{}
		for _, b := range plan.Keep {
			gotKeep[b.ID] = true
		}
		if !reflect.DeepEqual(gotKeep, wantKeep) {
			t.Fatalf("seed %d: kept %v, want %v", seed, gotKeep, wantKeep)
		}
		// The floor, computed independently.
		var floor pipeline.LSN
		lower := func(l pipeline.LSN) {
			if floor == 0 || l < floor {
				floor = l
			}
		}
		for _, b := range complete {
			if wantKeep[b.ID] {
				lower(b.Catalog.StartLSN)
			}
		}
		for _, l := range w.foreign {
			lower(l)
		}
		for _, b := range st.Backups {
			if !b.Complete && b.Started != nil && w.now.Sub(b.StartedAt) <= pol.IncompleteAfter {
				lower(b.Started.StartLSN)
			}
		}
		if len(wantKeep) == 0 {
			floor = 0
		}
		floor = testSeg.Start(floor)
		windows := map[string]Window{}
		for _, b := range plan.Keep {
			windows[b.ID] = *b.Window
		}
		if _, err := Execute(ctx, w.sink, st, plan); err != nil {
			t.Fatalf("seed %d: execute: %v", seed, err)
		}
		for key, seg := range w.walKeys {
			gone := !w.exists(t, key)
			want := floor != 0 && seg.EndLSN(testSeg) <= floor
			if gone != want {
				t.Fatalf("seed %d: %s (segment %s, floor %s): deleted %v, want %v", seed, key, seg.Name(testSeg), floor, gone, want)
			}
		}
		for _, key := range w.keep {
			if !w.exists(t, key) {
				t.Fatalf("seed %d: %s deleted", seed, key)
			}
		}
		prefix := w.layout.BackupPrefix()
		for _, b := range st.Backups {
			keepIt := wantKeep[b.ID] || !b.Complete && w.now.Sub(b.StartedAt) <= pol.IncompleteAfter
			for _, o := range b.Objects {
				if w.exists(t, o.Key) != keepIt {
					t.Fatalf("seed %d: backup %s object %s: exists %v, want %v", seed, b.ID, o.Key, !keepIt, keepIt)
				}
			}
			if keepIt {
				continue
			}
			var mine []string
			for _, k := range w.sink.deleted {
				if strings.HasPrefix(k, prefix+b.ID+"/") {
					mine = append(mine, k)
				}
			}
			// A complete backup: its catalogue first, its marker last. An
			// incomplete one: its marker first (a backup still running
			// fails when it finds it gone).
			if b.Complete && mine[0] != backup.CatalogKey(prefix, b.ID) {
				t.Fatalf("seed %d: backup %s: first deleted %s, want its catalogue", seed, b.ID, mine[0])
			}
			if b.Complete && mine[len(mine)-1] != backup.StartedKey(prefix, b.ID) {
				t.Fatalf("seed %d: backup %s: last deleted %s, want its start marker", seed, b.ID, mine[len(mine)-1])
			}
			if !b.Complete && b.Started != nil && mine[0] != backup.StartedKey(prefix, b.ID) {
				t.Fatalf("seed %d: incomplete backup %s: first deleted %s, want its start marker", seed, b.ID, mine[0])
			}
		}
		// Every kept backup recovers exactly as far as before.
		after, err := Scan(ctx, w.sink, w.layout, Options{})
		if err != nil {
			t.Fatal(err)
		}
		for _, b := range after.Backups {
			if want, ok := windows[b.ID]; ok && !reflect.DeepEqual(*b.Window, want) {
				t.Fatalf("seed %d: backup %s window %+v after prune, %+v before", seed, b.ID, *b.Window, want)
			}
		}
	}
}
