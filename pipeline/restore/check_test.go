package restore

import (
	"bytes"
	"context"
	"errors"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/walship/walship/compress"
	"github.com/walship/walship/pipeline"
	"github.com/walship/walship/sinks"
	"github.com/walship/walship/sinks/file"
)

const size1M = pipeline.SegmentSize(1 << 20)

var seg5 = pipeline.Segment{Timeline: 1, No: 5}

// switched is segment 5 with a few records, an XLOG_SWITCH, and zero
// pages after it, as pg_switch_wal leaves it (PostgreSQL 14+).
func switched() []byte {
	b := newWAL(seg5, size1M, testSysID)
	for i := 0; i < 300; i++ {
		b.record(200+i, 10, 0)
	}
	b.record(recordHdr, rmXLOG, xlogSwitchInfo)
	return b.data
}

// truncated is a complete segment 5 whose pages from the 40th on are zero:
// every page header that is there is valid.
func truncated() []byte {
	raw := fakeSegment(seg5, size1M)
	clear(raw[40*walPageSize:])
	return raw
}

// partialAt is segment 5's WAL up to a record boundary near off, zero after.
func partialAt(off int) ([]byte, pipeline.LSN) { return partialOf(seg5, off) }

func partialOf(seg pipeline.Segment, off int) ([]byte, pipeline.LSN) {
	b := newWAL(seg, size1M, testSysID)
	for b.p < off {
		b.record(300, 10, 0)
	}
	return b.data, seg.StartLSN(size1M) + pipeline.LSN(b.p)
}

func TestCheck(t *testing.T) {
	id := strconv.FormatUint(testSysID, 10)
	want := Expect{SystemID: id}
	good := fakeSegment(seg5, size1M)
	part, partEnd := partialAt(100_000)
	dirty := bytes.Clone(part)
	dirty[int(partEnd-seg5.StartLSN(size1M))+5000] = 1
	other := newWAL(seg5, size1M, testSysID+1).fill()
	hist := []byte("1\t0/5000000\tno recovery target specified\n")
	otherSys := func(m *sinks.Metadata) { m.SystemID = strconv.FormatUint(testSysID+1, 10) }

	type tc struct {
		name string
		file string
		raw  []byte
		meta func(m *sinks.Metadata)
		want Expect
		err  string // "" means it passes
	}
	for _, c := range []tc{
		{name: "complete segment", file: seg5.Name(size1M), raw: good},
		{name: "switched segment", file: seg5.Name(size1M), raw: switched()},
		{name: "truncated at a page boundary", file: seg5.Name(size1M), raw: truncated(), err: "stops at 0/550000 without a WAL switch"},
		{name: "raw size negative", file: seg5.Name(size1M), raw: good, meta: func(m *sinks.Metadata) { m.RawSize = -1 }, err: "walship-raw-size -1"},
		{name: "raw size huge", file: seg5.Name(size1M), raw: good, meta: func(m *sinks.Metadata) { m.RawSize = 1 << 50 }, err: "walship-raw-size"},
		{name: "raw size wrong", file: seg5.Name(size1M), raw: good, meta: func(m *sinks.Metadata) { m.RawSize = 4096 }, err: "walship-raw-size says 4096"},
		{name: "no sha256", file: seg5.Name(size1M), raw: good, meta: func(m *sinks.Metadata) { m.SHA256 = "" }, err: "no walship-sha256"},
		{name: "start LSN", file: seg5.Name(size1M), raw: good, meta: func(m *sinks.Metadata) { m.StartLSN = "0/400000" }, err: "walship-start-lsn"},
		{name: "end LSN of a whole segment", file: seg5.Name(size1M), raw: good, meta: func(m *sinks.Metadata) { m.EndLSN = "0/580000" }, err: "a whole segment ends at 0/600000"},
		{name: "timeline", file: seg5.Name(size1M), raw: good, meta: func(m *sinks.Metadata) { m.Timeline = 2 }, err: "walship-timeline 2"},
		{name: "metadata names another system", file: seg5.Name(size1M), raw: good, meta: func(m *sinks.Metadata) { m.SystemID = "42" }, err: "walship-system-id says 42"},
		{name: "bytes and metadata of another system", file: seg5.Name(size1M), raw: other, meta: otherSys, want: want, err: "the archive belongs to another cluster"},
		{name: "another system, unknown expectation", file: seg5.Name(size1M), raw: other, meta: otherSys, want: Expect{}},
		{name: "segment size of the archive", file: seg5.Name(size1M), raw: good, want: Expect{SegmentSize: 16 << 20}, err: "the archive's is 16777216"},
		{name: "name of another segment", file: "000000010000000000000006", raw: good, err: "walship-start-lsn"},
		{name: "partial up to its end", file: seg5.Name(size1M) + ".partial", raw: part, meta: func(m *sinks.Metadata) { m.EndLSN = partEnd.String() }},
		{name: "partial shorter than a segment", file: seg5.Name(size1M) + ".partial", raw: part[:int(partEnd-seg5.StartLSN(size1M))], meta: func(m *sinks.Metadata) { m.EndLSN = partEnd.String() }},
		{name: "partial with bytes after its end", file: seg5.Name(size1M) + ".partial", raw: dirty, meta: func(m *sinks.Metadata) { m.EndLSN = partEnd.String() }, err: "after its end LSN"},
		{name: "partial whose WAL stops before its end", file: seg5.Name(size1M) + ".partial", raw: part, meta: func(m *sinks.Metadata) { m.EndLSN = (partEnd + 50000).String() }, err: "its WAL stops at"},
		{name: "partial with unknown end", file: seg5.Name(size1M) + ".partial", raw: part},
		{name: "partial served as a whole segment", file: seg5.Name(size1M), raw: part, meta: func(m *sinks.Metadata) { m.EndLSN = partEnd.String() }, err: "a whole segment ends at"},
		{name: "partial's pages", file: seg5.Name(size1M) + ".partial", raw: truncatedPages(part), meta: func(m *sinks.Metadata) { m.EndLSN = partEnd.String() }, err: "has address"},
		{name: "history", file: "00000002.history", raw: hist},
		{name: "history that does not parse", file: "00000002.history", raw: []byte("x\ty\n"), err: "bad timeline"},
		{name: "history of another system", file: "00000002.history", raw: hist, meta: func(m *sinks.Metadata) { m.SystemID = "42" }, want: want, err: "another cluster"},
	} {
		t.Run(c.name, func(t *testing.T) {
			m := segMeta(seg5, size1M, c.raw, 0)
			if c.meta != nil {
				c.meta(&m)
			}
			if c.raw == nil {
				t.Fatal("no bytes")
			}
			out, err := Check(c.file, c.raw, m, c.want)
			switch {
			case c.err == "" && err != nil:
				t.Fatalf("refused: %v", err)
			case c.err != "" && (err == nil || !errors.Is(err, ErrCorrupt) || !strings.Contains(err.Error(), c.err)):
				t.Fatalf("got %v, want ErrCorrupt with %q", err, c.err)
			case c.err == "" && strings.HasSuffix(c.file, ".partial") && len(out) != int(size1M):
				t.Fatalf("partial served as %d bytes, want a whole zero-padded segment", len(out))
			}
		})
	}
}

// truncatedPages breaks one page address before the partial's end.
func truncatedPages(raw []byte) []byte {
	raw = bytes.Clone(raw)
	raw[3*walPageSize+8] ^= 0x20
	return raw
}

// verify --deep applies fetch --allow-partial's checks to a .partial: both
// refuse the same bad object and accept the same good one.
func TestVerifyDeepAgreesWithFetchOnPartials(t *testing.T) {
	ctx := context.Background()
	sink, _ := file.New(t.TempDir())
	enc, _ := compress.NewEncoder(compress.Zstd, 0)
	a := &archive{t: t, sink: sink, layout: sinks.BarmanCloud{Prefix: "p", Server: "s"}, enc: enc}
	a.identity(testSysID, size1M)
	good, end := partialAt(200_000)
	meta := segMeta(seg5, size1M, good, end)
	a.put(seg5.Name(size1M)+".partial", good, meta)
	// Segment 6's WAL stops near 300 kB, its metadata says 400 kB.
	seg6 := pipeline.Segment{Timeline: 1, No: 6}
	bad, _ := partialOf(seg6, 300_000)
	m6 := segMeta(seg6, size1M, bad, seg6.StartLSN(size1M)+400_000)
	a.put(seg6.Name(size1M)+".partial", bad, m6)
	// Segment 7's partial has a broken page address before its end.
	seg7 := pipeline.Segment{Timeline: 1, No: 7}
	broken, end7 := partialOf(seg7, 300_000)
	broken[3*walPageSize+8] ^= 0x20
	a.put(seg7.Name(size1M)+".partial", broken, segMeta(seg7, size1M, broken, end7))

	f := a.fetcher()
	f.AllowPartial = true
	dest := filepath.Join(t.TempDir(), "RECOVERYXLOG")
	if err := f.Fetch(ctx, seg5.Name(size1M), dest); err != nil {
		t.Fatalf("fetch --allow-partial of a good partial: %v", err)
	}
	got, _ := os.ReadFile(dest)
	if !bytes.Equal(got, good) {
		t.Error("served partial differs")
	}
	if err := f.Fetch(ctx, seg6.Name(size1M), dest); !errors.Is(err, ErrCorrupt) {
		t.Errorf("fetch --allow-partial of a partial whose WAL stops early: %v", err)
	}
	if err := f.Fetch(ctx, seg7.Name(size1M), dest); !errors.Is(err, ErrCorrupt) {
		t.Errorf("fetch --allow-partial of a partial with a broken page: %v", err)
	}
	rep, err := Verify(ctx, sink, a.layout, VerifyOptions{Deep: true, Parallel: 2})
	if err != nil {
		t.Fatal(err)
	}
	var probs []string
	for _, p := range rep.Problems {
		probs = append(probs, p.Key+": "+p.Problem)
	}
	if len(probs) != 2 || !strings.Contains(probs[0], seg6.Name(size1M)+".partial") || !strings.Contains(probs[0], "its WAL stops at") ||
		!strings.Contains(probs[1], seg7.Name(size1M)+".partial") || !strings.Contains(probs[1], "has address") {
		t.Errorf("verify --deep problems %q, want the two fetch refused", probs)
	}
	if rep.Checked != 1 {
		t.Errorf("verify --deep checked %d objects, want 1", rep.Checked)
	}
}

// vanishing fails the first n GETs with not-found while HEAD still finds
// the object.
type vanishing struct {
	sinks.Sink
	n int
}

func (v *vanishing) Get(ctx context.Context, key string) (io.ReadCloser, sinks.Metadata, error) {
	if v.n > 0 {
		v.n--
		return nil, sinks.Metadata{}, os.ErrNotExist
	}
	return v.Sink.Get(ctx, key)
}

// A GET that finds nothing after the HEAD found the object is transient,
// not "not in the archive".
func TestGetAfterHeadVanishes(t *testing.T) {
	ctx := context.Background()
	root := t.TempDir()
	sink, _ := file.New(root)
	enc, _ := compress.NewEncoder(compress.Zstd, 0)
	a := &archive{t: t, sink: sink, layout: sinks.BarmanCloud{Prefix: "p", Server: "s"}, enc: enc}
	a.identity(testSysID, size1M)
	raw := fakeSegment(seg5, size1M)
	a.put(seg5.Name(size1M), raw, segMeta(seg5, size1M, raw, 0))
	f := a.fetcher()
	f.Sink = &vanishing{Sink: sink, n: 1}
	dest := filepath.Join(t.TempDir(), "RECOVERYXLOG")
	err := f.Fetch(ctx, seg5.Name(size1M), dest)
	if err == nil || Permanent(err) {
		t.Fatalf("first fetch: %v, want a transient error", err)
	}
	if err := f.Fetch(ctx, seg5.Name(size1M), dest); err != nil {
		t.Fatalf("retry: %v", err)
	}
	// Gone for good: HEAD agrees, and the answer is "not found".
	os.Remove(filepath.Join(root, a.layout.Key(seg5.Name(size1M), ".zst")))
	if err := f.Fetch(ctx, seg5.Name(size1M), dest); !errors.Is(err, ErrNotFound) {
		t.Errorf("fetch of a deleted segment: %v, want ErrNotFound", err)
	}
}

// Bytes from another cluster are refused though the name exists; a miss in
// an archive without identity, or another cluster's, is not "not found".
func TestFetchRefusesAnotherCluster(t *testing.T) {
	ctx := context.Background()
	dest := filepath.Join(t.TempDir(), "RECOVERYXLOG")
	for _, c := range []struct {
		name     string
		identity uint64 // 0: none
		segSys   uint64
		file     string
		want     error
	}{
		{"segment from another system", testSysID, testSysID + 1, seg5.Name(size1M), ErrCorrupt},
		{"miss without identity", 0, testSysID, "000000010000000000000009", ErrWrongArchive},
		{"miss in another cluster's archive", testSysID + 1, testSysID, "000000010000000000000009", ErrWrongArchive},
		{"hit in another cluster's archive", testSysID + 1, testSysID + 1, seg5.Name(size1M), ErrCorrupt},
		{"miss in this cluster's archive", testSysID, testSysID, "000000010000000000000009", ErrNotFound},
	} {
		t.Run(c.name, func(t *testing.T) {
			sink, _ := file.New(t.TempDir())
			enc, _ := compress.NewEncoder(compress.Zstd, 0)
			a := &archive{t: t, sink: sink, layout: sinks.BarmanCloud{Prefix: "p", Server: "s"}, enc: enc}
			if c.identity != 0 {
				a.identity(c.identity, size1M)
			}
			raw := newWAL(seg5, size1M, c.segSys).fill()
			m := segMeta(seg5, size1M, raw, 0)
			m.SystemID = strconv.FormatUint(c.segSys, 10)
			a.put(seg5.Name(size1M), raw, m)
			err := a.fetcher().Fetch(ctx, c.file, dest)
			if !errors.Is(err, c.want) {
				t.Errorf("got %v, want %v", err, c.want)
			}
		})
	}
}
