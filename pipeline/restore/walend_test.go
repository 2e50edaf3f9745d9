package restore

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"testing"

	"github.com/walship/walship/internal/testenv"
	"github.com/walship/walship/pipeline"
)

// The record walk on PostgreSQL's own WAL: every finished segment is
// complete or switched (the ones pg_switch_wal ended are switched), and a
// finished segment cut at a page boundary is caught.
func TestWALEndOnRealWAL(t *testing.T) {
	pg := testenv.StartPostgres(t, testenv.PGOptions{})
	if err := pg.Pgbench(context.Background(), "-i", "-s", "1", "-q"); err != nil {
		t.Fatal(err)
	}
	// Large rows: records that span pages; a checkpoint: full-page images.
	pg.Exec(`CREATE TABLE big (id int, payload text); ALTER TABLE big ALTER payload SET STORAGE EXTERNAL`)
	pg.Exec(`INSERT INTO big SELECT g, repeat(md5(g::text), 600) FROM generate_series(1, 300) g`)
	sw1, _ := pipeline.ParseLSN(pg.QueryString(`SELECT pg_switch_wal()::text`))
	pg.Exec(`CHECKPOINT`)
	pg.Exec(`UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid % 7 = 0`)
	sw2, _ := pipeline.ParseLSN(pg.QueryString(`SELECT pg_switch_wal()::text`))
	pg.Exec(`INSERT INTO big SELECT g, 'x' FROM generate_series(1, 10) g`)
	cur, _ := pipeline.ParseLSN(pg.QueryString(`SELECT pg_current_wal_insert_lsn()::text`))
	const size = pipeline.SegmentSize(1 << 20)
	curSeg := pipeline.SegmentOf(1, cur, size)
	wantSwitched := map[uint64]bool{pipeline.SegmentOf(1, sw1, size).No: true, pipeline.SegmentOf(1, sw2, size).No: true}

	entries, err := os.ReadDir(pg.WALDir())
	if err != nil {
		t.Fatal(err)
	}
	complete, switches := 0, 0
	var sample []byte
	for _, e := range entries {
		seg, err := pipeline.ParseSegmentName(e.Name(), size)
		if err != nil || seg.No >= curSeg.No {
			continue
		}
		raw, err := os.ReadFile(filepath.Join(pg.WALDir(), e.Name()))
		if err != nil {
			t.Fatal(err)
		}
		if err := pipeline.CheckSegmentPages(raw, seg, size); err != nil {
			t.Fatalf("%s: %v", e.Name(), err)
		}
		stop, err := walEnd(raw)
		switch {
		case err != nil:
			t.Errorf("%s: %v", e.Name(), err)
		case stop.Switched:
			switches++
		case stop.Off != len(raw):
			t.Errorf("%s: WAL stops at offset %#x without a switch", e.Name(), stop.Off)
		default:
			complete++
			if sample == nil {
				sample = raw
			}
		}
		if wantSwitched[seg.No] && !stop.Switched {
			t.Errorf("%s was ended by pg_switch_wal but the walk found no XLOG_SWITCH", e.Name())
		}
	}
	t.Logf("%d complete and %d switched segments", complete, switches)
	if complete < 5 || switches < 2 || sample == nil {
		t.Fatalf("too few segments to prove anything: %d complete, %d switched", complete, switches)
	}
	clear(sample[len(sample)/2:])
	if stop, err := walEnd(sample); err != nil || stop.Switched || stop.Off != len(sample)/2 {
		t.Errorf("a segment cut in half: %+v %v, want the WAL to stop at %#x", stop, err, len(sample)/2)
	}
}

// The walk never panics, never loops and never reads past the segment:
// fuzzed bytes are written over a complete or a switched segment.
func FuzzWALEnd(f *testing.F) {
	seg := pipeline.Segment{Timeline: 1, No: 5}
	const size = pipeline.SegmentSize(1 << 20)
	templates := [][]byte{fakeSegment(seg, size)[:4*walPageSize], switched()[:4*walPageSize]}
	f.Add(uint8(0), uint16(40), []byte{0xff, 0xff, 0, 0})
	f.Add(uint8(1), uint16(walPageSize+16), []byte{1, 0, 0, 0})
	f.Add(uint8(0), uint16(2), []byte{1, 0})
	f.Fuzz(func(t *testing.T, which uint8, off uint16, patch []byte) {
		data := bytes.Clone(templates[int(which)%len(templates)])
		copy(data[int(off)%len(data):], patch)
		if stop, err := walEnd(data); err == nil && (stop.Off < 0 || stop.Off > len(data)) {
			t.Fatalf("stop offset %d outside the segment", stop.Off)
		}
	})
}
