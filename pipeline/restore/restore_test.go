package restore

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"testing"

	"github.com/walship/walship/compress"
	"github.com/walship/walship/pipeline"
	"github.com/walship/walship/sinks"
	"github.com/walship/walship/sinks/file"
)

func TestParseHistory(t *testing.T) {
	h, err := ParseHistory([]byte("1\t0/5000000\tno recovery target specified\n\n2\t0/9000A28\tbefore 2026-01-01\n"))
	if err != nil || len(h) != 2 || h[1].Parent != 2 || h[1].Switch != 0x9000A28 || h[0].Reason != "no recovery target specified" {
		t.Fatalf("%+v %v", h, err)
	}
	if _, err := ParseHistory([]byte("x\t0/1\n")); err == nil {
		t.Error("bad timeline accepted")
	}
}

// An archive on the file sink with one gap, one corrupt object (bytes that
// do not match the SHA-256 in the metadata) and a history file whose
// parent's switch segment is missing.
func TestVerifyAndFetch(t *testing.T) {
	ctx := context.Background()
	const size = pipeline.SegmentSize(1 << 20)
	root := t.TempDir()
	sink, err := file.New(root)
	if err != nil {
		t.Fatal(err)
	}
	layout := sinks.BarmanCloud{Prefix: "p", Server: "s"}
	enc, _ := compress.NewEncoder(compress.Zstd, 0)
	a := &archive{t: t, sink: sink, layout: layout, enc: enc}
	a.identity(testSysID, size)
	put := func(name string, raw []byte, seg pipeline.Segment) {
		m := segMeta(seg, size, raw, 0)
		if seg.No == 0 {
			m.StartLSN, m.EndLSN = "", ""
		}
		a.put(name, raw, m)
	}
	for _, no := range []uint64{3, 4, 5, 7, 8} {
		seg := pipeline.Segment{Timeline: 1, No: no}
		put(seg.Name(size), fakeSegment(seg, size), seg)
	}
	put("00000002.history", []byte("1\t0/A00000\tpromoted\n"), pipeline.Segment{Timeline: 2})

	rep, err := Verify(context.Background(), sink, layout, VerifyOptions{Metadata: true, Deep: true, Parallel: 4})
	if err != nil {
		t.Fatal(err)
	}
	if rep.SegmentSize != uint64(size) || len(rep.Timelines) != 2 {
		t.Fatalf("report %+v", rep)
	}
	tl := rep.Timelines[0]
	if tl.First != "000000010000000000000003" || tl.Last != "000000010000000000000008" || len(tl.Gaps) != 1 ||
		tl.Gaps[0].From != "000000010000000000000006" || tl.Gaps[0].To != "000000010000000000000006" {
		t.Errorf("timeline 1: %+v", tl)
	}
	// History says timeline 1 ended in segment 9 (0/A00000 - 1): not archived.
	if len(rep.Problems) != 1 || rep.Problems[0].Key != "p/s/wals/00000002.history.zst" {
		t.Errorf("problems %+v", rep.Problems)
	}
	if rep.Checked != 5 {
		t.Errorf("checked %d objects, want 5", rep.Checked)
	}

	// Corrupt segment 4's stored bytes with a valid zstd stream of other bytes.
	seg4 := pipeline.Segment{Timeline: 1, No: 4}
	other, _ := enc.Encode(fakeSegment(pipeline.Segment{Timeline: 1, No: 5}, size))
	if err := os.WriteFile(filepath.Join(root, layout.Key(seg4.Name(size), ".zst")), other, 0o644); err != nil {
		t.Fatal(err)
	}
	f := a.fetcher()
	dest := filepath.Join(t.TempDir(), "RECOVERYXLOG")
	if err := f.Fetch(ctx, seg4.Name(size), dest); !errors.Is(err, ErrCorrupt) {
		t.Errorf("fetch of corrupt segment: %v, want ErrCorrupt", err)
	}
	if _, err := os.Stat(dest); err == nil {
		t.Error("corrupt segment written")
	}
	if err := f.Fetch(ctx, "000000010000000000000006", dest); !errors.Is(err, ErrNotFound) {
		t.Errorf("fetch of missing segment: %v, want ErrNotFound", err)
	}
	if err := f.Fetch(ctx, "000000010000000000000007", dest); err != nil {
		t.Fatalf("fetch: %v", err)
	}
	got, _ := os.ReadFile(dest)
	if string(got) != string(fakeSegment(pipeline.Segment{Timeline: 1, No: 7}, size)) {
		t.Error("fetched bytes differ")
	}
	rep, _ = Verify(ctx, sink, layout, VerifyOptions{Deep: true, Parallel: 2})
	found := false
	for _, p := range rep.Problems {
		if p.Key == layout.Key(seg4.Name(size), ".zst") {
			found = true
		}
	}
	if !found {
		t.Errorf("verify --deep did not name the corrupt object: %+v", rep.Problems)
	}
}
