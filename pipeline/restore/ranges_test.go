package restore

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"filippo.io/age"

	"github.com/walship/walship/compress"
	"github.com/walship/walship/crypt"
	"github.com/walship/walship/pipeline"
	"github.com/walship/walship/sinks"
	"github.com/walship/walship/sinks/file"
)

// hookSink is the file sink with hooks that play what other processes do
// between two requests of a fetch: an archiver that uploads the whole
// segment and deletes its ranges, a store whose listing fails.
type hookSink struct {
	*file.Sink
	listErr    error
	beforeList func()
	beforeGet  func(key string)
}

func (h *hookSink) List(ctx context.Context, prefix string, fn func(sinks.Object) error) error {
	if h.listErr != nil {
		return h.listErr
	}
	if h.beforeList != nil {
		h.beforeList()
	}
	return h.Sink.List(ctx, prefix, fn)
}

func (h *hookSink) Get(ctx context.Context, key string) (io.ReadCloser, sinks.Metadata, error) {
	if h.beforeGet != nil {
		h.beforeGet(key)
	}
	return h.Sink.Get(ctx, key)
}

// rangeArchive is an archive with whole segments 3 and 4 of timeline 1
// and, for segment 5 (being written), what a test puts.
type rangeArchive struct {
	*archive
	hs   *hookSink
	size pipeline.SegmentSize
	seg  pipeline.Segment
	raw  []byte // segment 5, whole
}

func newRangeArchive(t *testing.T) *rangeArchive {
	const size = pipeline.SegmentSize(1 << 20)
	fs, err := file.New(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	hs := &hookSink{Sink: fs}
	enc, _ := compress.NewEncoder(compress.Zstd, 0)
	a := &archive{t: t, sink: hs, layout: sinks.BarmanCloud{Prefix: "p", Server: "s"}, enc: enc}
	a.identity(testSysID, size)
	for no := uint64(3); no <= 4; no++ {
		seg := pipeline.Segment{Timeline: 1, No: no}
		raw := fakeSegment(seg, size)
		a.put(seg.Name(size), raw, segMeta(seg, size, raw, 0))
	}
	seg := pipeline.Segment{Timeline: 1, No: 5}
	return &rangeArchive{archive: a, hs: hs, size: size, seg: seg, raw: fakeSegment(seg, size)}
}

// rangeMeta is the metadata the archiver writes for bytes [from, to).
func (r *rangeArchive) rangeMeta(from, to uint64, raw []byte) sinks.Metadata {
	sum := sha256.Sum256(raw)
	start := r.seg.StartLSN(r.size)
	return sinks.Metadata{SHA256: pipeline.SHA256Hex(sum[:]), StartLSN: (start + pipeline.LSN(from)).String(),
		EndLSN: (start + pipeline.LSN(to)).String(), Timeline: 1, SystemID: strconv.FormatUint(testSysID, 10),
		Codec: "zstd", RawSize: int64(len(raw))}
}

// putRange stores bytes [from, to) of segment 5 (or body, when given, as
// those bytes) as a range object.
func (r *rangeArchive) putRange(from, to uint64, body []byte) {
	r.t.Helper()
	if body == nil {
		body = r.raw[from:to]
	}
	z, err := r.enc.Encode(body)
	if err != nil {
		r.t.Fatal(err)
	}
	key := r.layout.RangeKey(r.seg.Name(r.size), from, to, ".zst")
	if err := r.sink.Put(context.Background(), key, append([]byte(nil), z...), r.rangeMeta(from, to, body)); err != nil {
		r.t.Fatal(err)
	}
}

// putWhole archives segment 5 whole and deletes its ranges, as an
// archiver does.
func (r *rangeArchive) putWhole() {
	r.t.Helper()
	r.put(r.seg.Name(r.size), r.raw, segMeta(r.seg, r.size, r.raw, 0))
	r.hs.Sink.List(context.Background(), r.layout.RangePrefix(r.seg.Name(r.size)), func(ob sinks.Object) error {
		return r.hs.Sink.Delete(context.Background(), ob.Key)
	})
}

// fetch runs a fetch of segment 5 with --allow-partial.
func (r *rangeArchive) fetch(ids ...age.Identity) ([]byte, error) {
	f := r.fetcher()
	f.AllowPartial, f.Identities = true, ids
	dest := filepath.Join(r.t.TempDir(), "RECOVERYXLOG")
	if err := f.Fetch(context.Background(), r.seg.Name(r.size), dest); err != nil {
		if _, serr := os.Stat(dest); serr == nil {
			r.t.Errorf("%s written although the fetch failed", dest)
		}
		return nil, err
	}
	return os.ReadFile(dest)
}

// want is segment 5's first n bytes, zero-padded to a segment.
func (r *rangeArchive) want(n uint64) []byte {
	out := make([]byte, r.size)
	copy(out, r.raw[:n])
	return out
}

func TestFetchStitchesRanges(t *testing.T) {
	for _, c := range []struct {
		name   string
		ranges [][2]uint64
		end    uint64 // 0: not found
	}{
		{"one", [][2]uint64{{0, 0x6000}}, 0x6000},
		// Two receiver runs: the second cut again from offset 0; stored
		// out of order, one range inside another.
		{"overlaps", [][2]uint64{{0x8000, 0xA000}, {0, 0x2000}, {0x2000, 0x8000}, {0, 0x5000}, {0x3000, 0x4000}, {0x5000, 0x9000}}, 0xA000},
		{"hole", [][2]uint64{{0, 0x4000}, {0x6000, 0x8000}}, 0x4000},
		{"not at 0", [][2]uint64{{0x2000, 0x4000}, {0x4000, 0x6000}}, 0},
		{"none", nil, 0},
		{"to the end", [][2]uint64{{0, 0x80000}, {0x80000, 1 << 20}}, 1 << 20},
	} {
		t.Run(c.name, func(t *testing.T) {
			r := newRangeArchive(t)
			for _, rg := range c.ranges {
				r.putRange(rg[0], rg[1], nil)
			}
			got, err := r.fetch()
			if c.end == 0 {
				if !errors.Is(err, ErrNotFound) {
					t.Fatalf("fetch: %v, want not found", err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if len(got) != int(r.size) {
				t.Fatalf("served %d bytes, want a whole segment (%d)", len(got), r.size)
			}
			if !bytes.Equal(got, r.want(c.end)) {
				t.Errorf("served bytes are not the segment's first %#x bytes and zeros", c.end)
			}
		})
	}
}

func TestFetchRangesOnlyWithAllowPartial(t *testing.T) {
	r := newRangeArchive(t)
	r.putRange(0, 0x4000, nil)
	f := r.fetcher()
	err := f.Fetch(context.Background(), r.seg.Name(r.size), filepath.Join(t.TempDir(), "x"))
	if !errors.Is(err, ErrNotFound) {
		t.Errorf("without --allow-partial: %v, want not found", err)
	}
}

// Whole first, then .partial, then ranges.
func TestFetchPrefersWholeThenPartial(t *testing.T) {
	r := newRangeArchive(t)
	r.putRange(0, 0x4000, nil)
	pend := r.seg.StartLSN(r.size) + 0x6000
	r.put(r.seg.Name(r.size)+".partial", r.raw[:0x6000], segMeta(r.seg, r.size, r.raw[:0x6000], pend))
	if got, err := r.fetch(); err != nil || !bytes.Equal(got, r.want(0x6000)) {
		t.Errorf("with a .partial and ranges: %v, want the .partial served", err)
	}
	r.put(r.seg.Name(r.size), r.raw, segMeta(r.seg, r.size, r.raw, 0))
	if got, err := r.fetch(); err != nil || !bytes.Equal(got, r.raw) {
		t.Errorf("with the whole segment: %v, want it served", err)
	}
}

func TestFetchRangesDisagree(t *testing.T) {
	r := newRangeArchive(t)
	r.putRange(0, 0x4000, nil)
	other := append([]byte(nil), r.raw[0x2000:0x6000]...)
	other[0x1800] ^= 0x01 // offset 0x3800 of the segment
	r.putRange(0x2000, 0x6000, other)
	_, err := r.fetch()
	if !errors.Is(err, ErrCorrupt) || !strings.Contains(err.Error(), "0x3800") {
		t.Fatalf("overlapping ranges that differ: %v, want ErrCorrupt naming offset 0x3800", err)
	}
}

func TestFetchRangeCorrupt(t *testing.T) {
	r := newRangeArchive(t)
	r.putRange(0, 0x4000, nil)
	// A range whose bytes do not match its metadata's SHA-256.
	z, _ := r.enc.Encode(r.want(0x4000)[0x4000:0x6000])
	key := r.layout.RangeKey(r.seg.Name(r.size), 0x4000, 0x6000, ".zst")
	r.sink.Put(context.Background(), key, append([]byte(nil), z...), r.rangeMeta(0x4000, 0x6000, r.raw[0x4000:0x6000]))
	if _, err := r.fetch(); !errors.Is(err, ErrCorrupt) {
		t.Errorf("a range that fails its SHA-256: %v, want ErrCorrupt", err)
	}
}

// A listing that fails is never "not found": the fetch must retry, then
// abort.
func TestFetchRangesListError(t *testing.T) {
	r := newRangeArchive(t)
	r.putRange(0, 0x4000, nil)
	r.hs.listErr = errors.New("503 slow down")
	_, err := r.fetch()
	if err == nil || errors.Is(err, ErrNotFound) || Permanent(err) {
		t.Errorf("listing error: %v, want a transient error (retried, then abort), never not found", err)
	}
}

// An archiver uploads the whole segment and deletes its ranges while a
// fetch reads them: the fetch serves the whole segment.
func TestFetchRangesVanish(t *testing.T) {
	t.Run("before the listing", func(t *testing.T) {
		r := newRangeArchive(t)
		r.putRange(0, 0x4000, nil)
		r.hs.beforeList = func() { r.hs.beforeList = nil; r.putWhole() }
		if got, err := r.fetch(); err != nil || !bytes.Equal(got, r.raw) {
			t.Errorf("%v, want the whole segment served", err)
		}
	})
	t.Run("between listing and GET", func(t *testing.T) {
		r := newRangeArchive(t)
		r.putRange(0, 0x4000, nil)
		r.putRange(0x4000, 0x8000, nil)
		r.hs.beforeGet = func(key string) {
			if strings.Contains(key, "walship-partial") && strings.HasSuffix(key, "00004000-00008000.zst") {
				r.hs.beforeGet = nil
				r.putWhole()
			}
		}
		if got, err := r.fetch(); err != nil || !bytes.Equal(got, r.raw) {
			t.Errorf("%v, want the whole segment served", err)
		}
	})
	t.Run("gone, nothing replaced it", func(t *testing.T) {
		r := newRangeArchive(t)
		r.putRange(0, 0x4000, nil)
		r.hs.beforeGet = func(key string) {
			if strings.Contains(key, "walship-partial") {
				r.hs.Sink.Delete(context.Background(), key)
			}
		}
		if _, err := r.fetch(); err == nil || Permanent(err) {
			t.Errorf("%v, want a transient error: the fetch looks again", err)
		}
	})
}

func TestFetchEncryptedRanges(t *testing.T) {
	r := newRangeArchive(t)
	key := genIdentity(t)
	for _, rg := range [][2]uint64{{0, 0x5000}, {0x4000, 0x9000}} {
		body := r.raw[rg[0]:rg[1]]
		z, _ := r.enc.Encode(body)
		enc, err := crypt.NewEncrypter([]age.Recipient{key.Recipient()}).Encrypt(z)
		if err != nil {
			t.Fatal(err)
		}
		meta := r.rangeMeta(rg[0], rg[1], body)
		meta.Encryption = crypt.Scheme
		if err := r.sink.Put(context.Background(), r.layout.RangeKey(r.seg.Name(r.size), rg[0], rg[1], ".zst"), enc, meta); err != nil {
			t.Fatal(err)
		}
	}
	if got, err := r.fetch(key); err != nil || !bytes.Equal(got, r.want(0x9000)) {
		t.Errorf("with the identity: %v", err)
	}
	if _, err := r.fetch(); !errors.Is(err, ErrCannotDecrypt) {
		t.Errorf("without an identity: %v, want ErrCannotDecrypt", err)
	}
	if _, err := r.fetch(genIdentity(t)); !errors.Is(err, ErrCannotDecrypt) {
		t.Errorf("with another identity: %v, want ErrCannotDecrypt", err)
	}
}

// Ranges of another system are refused, never served.
func TestFetchRangesOtherSystem(t *testing.T) {
	r := newRangeArchive(t)
	m := r.rangeMeta(0, 0x4000, r.raw[:0x4000])
	m.SystemID = "42"
	z, _ := r.enc.Encode(r.raw[:0x4000])
	r.sink.Put(context.Background(), r.layout.RangeKey(r.seg.Name(r.size), 0, 0x4000, ".zst"), append([]byte(nil), z...), m)
	if _, err := r.fetch(); !errors.Is(err, ErrCorrupt) {
		t.Errorf("%v, want ErrCorrupt", err)
	}
}

// The prefetcher never fetches ranges: with segments 3-4 whole and 5 only
// in ranges, it stores 4, records 5 as the archive's end, and serves
// nothing for 5; a fetch with --allow-partial then stitches 5 itself.
func TestPrefetchNeverServesRanges(t *testing.T) {
	r := newRangeArchive(t)
	r.putRange(0, 0x6000, nil)
	f := r.fetcher()
	f.AllowPartial = true
	name := func(no uint64) string { return pipeline.Segment{Timeline: 1, No: no}.Name(r.size) }
	pf := &Prefetch{Fetcher: f, Manifest: Manifest{Dest: "file:///x", Server: "s", SystemID: f.SystemID, AllowPartial: true},
		Dir: filepath.Join(t.TempDir(), ".walship-prefetch"), Count: 3, IdleExit: 500 * time.Millisecond}
	pf.Want(name(3))
	done := make(chan error, 1)
	go func() { done <- pf.Run(context.Background(), r.size) }()
	waitFile(t, filepath.Join(pf.Dir, endFile))
	if end := pf.read(endFile); end != name(5) {
		t.Errorf("prefetcher's end %q, want %s", end, name(5))
	}
	waitFile(t, filepath.Join(pf.Dir, name(4)))
	if pf.Await(name(5), 2*time.Second) {
		t.Error("segment 5 is in the prefetch directory, but it is only in ranges")
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if ok, err := pf.Serve(name(5), filepath.Join(t.TempDir(), "x")); ok || err != nil {
		t.Errorf("prefetch served segment 5 from ranges: %v %v", ok, err)
	}
	entries, _ := os.ReadDir(pf.Dir)
	for _, e := range entries {
		if strings.HasPrefix(e.Name(), name(5)) {
			t.Errorf("prefetch directory holds %s", e.Name())
		}
	}
	if got, err := r.fetch(); err != nil || !bytes.Equal(got, r.want(0x6000)) {
		t.Errorf("fetch of segment 5: %v", err)
	}
}

// verify: the segment after the last whole one, in ranges only, is the
// archive's end (not a gap), its ranges checked byte for byte; ranges of
// a segment archived whole are leftovers, counted; a range that fails its
// SHA-256 and ranges past the end are problems.
func TestVerifyRanges(t *testing.T) {
	ctx := context.Background()
	r := newRangeArchive(t)
	r.putRange(0, 0x4000, nil)
	r.putRange(0x2000, 0x8000, nil)
	r.putRange(0xA000, 0xC000, nil) // after a hole: listed, not served
	seg4 := pipeline.Segment{Timeline: 1, No: 4}
	raw4 := fakeSegment(seg4, r.size)
	for _, rg := range [][2]uint64{{0, 0x1000}, {0x1000, 0x3000}} {
		z, _ := r.enc.Encode(raw4[rg[0]:rg[1]])
		m := r.rangeMeta(rg[0], rg[1], raw4[rg[0]:rg[1]])
		m.StartLSN = (seg4.StartLSN(r.size) + pipeline.LSN(rg[0])).String()
		m.EndLSN = (seg4.StartLSN(r.size) + pipeline.LSN(rg[1])).String()
		r.sink.Put(ctx, r.layout.RangeKey(seg4.Name(r.size), rg[0], rg[1], ".zst"), append([]byte(nil), z...), m)
	}
	rep, err := Verify(ctx, r.sink, r.layout, VerifyOptions{Metadata: true, Deep: true, Parallel: 2})
	if err != nil {
		t.Fatal(err)
	}
	if !rep.OK() || len(rep.Timelines) != 1 {
		t.Fatalf("report %+v", rep)
	}
	tl := rep.Timelines[0]
	want := RangeEnd{Segment: r.seg.Name(r.size), End: r.seg.StartLSN(r.size) + 0x8000, Objects: 3}
	if tl.Last != "000000010000000000000004" || len(tl.Gaps) != 0 || tl.RangeEnd == nil || *tl.RangeEnd != want {
		t.Errorf("timeline %+v, range end %+v, want %+v", tl, tl.RangeEnd, want)
	}
	if rep.RangeObjects != 5 || rep.LeftoverRanges != 2 || rep.Checked != 2+3 {
		t.Errorf("range objects %d, leftovers %d, checked %d; want 5, 2, 5", rep.RangeObjects, rep.LeftoverRanges, rep.Checked)
	}

	// A range whose bytes fail its SHA-256: verify --deep names it.
	bad := r.layout.RangeKey(r.seg.Name(r.size), 0x2000, 0x8000, ".zst")
	z, _ := r.enc.Encode(make([]byte, 0x6000))
	r.hs.Sink.Delete(ctx, bad)
	r.sink.Put(ctx, bad, append([]byte(nil), z...), r.rangeMeta(0x2000, 0x8000, r.raw[0x2000:0x8000]))
	// Ranges of segment 7 while 6 is missing.
	seg7 := pipeline.Segment{Timeline: 1, No: 7}
	raw7 := fakeSegment(seg7, r.size)
	m := r.rangeMeta(0, 0x2000, raw7[:0x2000])
	m.StartLSN, m.EndLSN = seg7.StartLSN(r.size).String(), (seg7.StartLSN(r.size) + 0x2000).String()
	z, _ = r.enc.Encode(raw7[:0x2000])
	r.sink.Put(ctx, r.layout.RangeKey(seg7.Name(r.size), 0, 0x2000, ".zst"), append([]byte(nil), z...), m)
	rep, err = Verify(ctx, r.sink, r.layout, VerifyOptions{Metadata: true, Deep: true, Parallel: 2})
	if err != nil {
		t.Fatal(err)
	}
	var keys []string
	for _, p := range rep.Problems {
		keys = append(keys, p.Key)
	}
	if rep.OK() || len(keys) != 2 || keys[0] != bad || keys[1] != r.layout.RangePrefix(seg7.Name(r.size)) {
		t.Errorf("problems %+v, want %s and segment 7's ranges", rep.Problems, bad)
	}
	if len(rep.Timelines[0].Gaps) != 0 {
		t.Errorf("gaps %+v: ranges are never a gap", rep.Timelines[0].Gaps)
	}
}

// verify: trailing ranges that do not start at offset 0 cannot be served.
func TestVerifyRangesNotAtZero(t *testing.T) {
	r := newRangeArchive(t)
	r.putRange(0x2000, 0x4000, nil)
	rep, err := Verify(context.Background(), r.sink, r.layout, VerifyOptions{Metadata: true})
	if err != nil {
		t.Fatal(err)
	}
	if rep.OK() || len(rep.Problems) != 1 || !strings.Contains(rep.Problems[0].Problem, "offset 0") || rep.Timelines[0].RangeEnd != nil {
		t.Errorf("report %+v", rep)
	}
}
