package restore

// Second adversarial review of the range (sub-segment upload) change: each
// test here demonstrates one finding of /tmp/review2-findings.txt and fails
// until it is fixed.

import (
	"bytes"
	"context"
	"crypto/sha256"
	"os"
	"path/filepath"
	"strconv"
	"testing"

	"github.com/walship/walship/pipeline"
	"github.com/walship/walship/sinks"
)

// Finding R2-1: a promoted server's first segment on its new timeline is
// served from the new timeline's own ranges only. The receiver's flush is
// at the switch point as soon as the old timeline's files hold the WAL
// below it (tracker.inherited), but the new timeline's first range is cut
// from offset 0 of whatever is fsynced when the timer fires and can end
// below the switch point (a slow catch-up, a 1 GB segment, a restarted
// receiver that knows nothing of the switch). fetch --allow-partial then
// serves 00000002…05 zero-padded from that short range, PostgreSQL takes
// it (it never asks for 00000001…05 once the newer file was found), and
// recovery ends below the flush the slot was given, though the bucket
// holds every byte up to the switch point (in 00000001…05.partial, or in
// timeline 1's ranges).
func TestReviewFetchNewTimelineShortOwnRanges(t *testing.T) {
	r := newRangeArchive(t)
	const sw = 0x6000 // timeline 2 begins at segment 5 + 0x6000
	at := r.seg.StartLSN(r.size) + sw
	// Timeline 1's last segment, archived as .partial up to the switch
	// point (its ranges are deleted then).
	r.put(r.seg.Name(r.size)+".partial", r.raw[:sw], segMeta(r.seg, r.size, r.raw[:sw], at))
	hist := []byte("1\t" + at.String() + "\tno recovery target specified\n")
	r.put(pipeline.HistoryFileName(2), hist, sinks.Metadata{SHA256: sha(hist), Timeline: 2,
		SystemID: strconv.FormatUint(testSysID, 10), Codec: "zstd", RawSize: int64(len(hist))})
	// Timeline 2's first range of segment 5: its file below the switch
	// point is a copy of timeline 1's WAL (page headers of timeline 1).
	seg2 := pipeline.Segment{Timeline: 2, No: r.seg.No}
	body := r.raw[:0x2000]
	z, err := r.enc.Encode(body)
	if err != nil {
		t.Fatal(err)
	}
	meta := r.rangeMeta(0, 0x2000, body)
	meta.Timeline = 2
	key := r.layout.RangeKey(seg2.Name(r.size), 0, 0x2000, ".zst")
	if err := r.sink.Put(context.Background(), key, append([]byte(nil), z...), meta); err != nil {
		t.Fatal(err)
	}

	f := r.fetcher()
	f.AllowPartial = true
	dest := filepath.Join(t.TempDir(), "RECOVERYXLOG")
	if err := f.Fetch(context.Background(), seg2.Name(r.size), dest); err != nil {
		t.Fatalf("fetch %s: %v", seg2.Name(r.size), err)
	}
	got, err := os.ReadFile(dest)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got[:sw], r.raw[:sw]) {
		n := 0
		for n < sw && got[n] == r.raw[n] {
			n++
		}
		t.Errorf("served %s with WAL to offset %#x only; the bucket holds it to the switch point %#x (%s), where the receiver's flush is: recovery ends %d bytes early",
			seg2.Name(r.size), n, sw, at, sw-n)
	}
}

func sha(b []byte) string {
	s := sha256.Sum256(b)
	return pipeline.SHA256Hex(s[:])
}

// Finding R2-3: ranges of an ended timeline's last segment are served past
// the timeline's end. A receiver streaming from a cascading standby cuts
// ranges of what the standby received; the standby is promoted at a
// point below that (a recovery target with recovery_target_action =
// promote stops replay before WAL it received; a plain promote leaves a
// torn record). Until the old timeline's .partial is archived (which
// deletes its ranges), fetch --allow-partial of 00000001…05 - what
// PostgreSQL asks for when timeline 2's file of segment 5 is not in the
// bucket yet - stitches the ranges to their end, past the switch point
// the bucket's own 00000002.history states: WAL that is on no timeline
// recovery follows, which it replays as timeline 2's.
func TestReviewFetchEndedTimelineRangesPastSwitch(t *testing.T) {
	r := newRangeArchive(t)
	const sw = 0x6000
	at := r.seg.StartLSN(r.size) + sw
	hist := []byte("1\t" + at.String() + "\tbefore transaction 1234\n")
	r.put(pipeline.HistoryFileName(2), hist, sinks.Metadata{SHA256: sha(hist), Timeline: 2,
		SystemID: strconv.FormatUint(testSysID, 10), Codec: "zstd", RawSize: int64(len(hist))})
	r.putRange(0, 0x4000, nil)
	r.putRange(0x4000, 0x8000, nil) // received by the standby, never replayed: past the switch
	got, err := r.fetch()
	if err != nil {
		t.Fatal(err)
	}
	for i := sw; i < len(got); i++ {
		if got[i] != 0 {
			t.Fatalf("served %s with WAL at offset %#x, past timeline 1's end %s (offset %#x) that 00000002.history states", r.seg.Name(r.size), i, at, sw)
		}
	}
}

// The parent timeline's copy below the switch point may itself be short
// (its ranges, its .partial not archived yet): a new timeline's segment
// is stitched over as much of it as the bucket holds, never aborted for
// the zeros after it.
func TestFetchNewTimelineParentShort(t *testing.T) {
	r := newRangeArchive(t)
	const sw = 0x6000
	at := r.seg.StartLSN(r.size) + sw
	r.putRange(0, 0x3000, nil) // timeline 1's ranges reach 0x3000 only
	hist := []byte("1\t" + at.String() + "\tno recovery target specified\n")
	r.put(pipeline.HistoryFileName(2), hist, sinks.Metadata{SHA256: sha(hist), Timeline: 2,
		SystemID: strconv.FormatUint(testSysID, 10), Codec: "zstd", RawSize: int64(len(hist))})
	seg2 := pipeline.Segment{Timeline: 2, No: r.seg.No}
	body := r.raw[:0x1000]
	z, err := r.enc.Encode(body)
	if err != nil {
		t.Fatal(err)
	}
	meta := r.rangeMeta(0, 0x1000, body)
	meta.Timeline = 2
	if err := r.sink.Put(context.Background(), r.layout.RangeKey(seg2.Name(r.size), 0, 0x1000, ".zst"), append([]byte(nil), z...), meta); err != nil {
		t.Fatal(err)
	}
	f := r.fetcher()
	f.AllowPartial = true
	got, err := f.Read(context.Background(), seg2.Name(r.size))
	if err != nil {
		t.Fatalf("fetch %s: %v", seg2.Name(r.size), err)
	}
	n := dataEnd(r.raw, 0x3000)
	if !bytes.Equal(got[:n], r.raw[:n]) || !allZero(got[0x3000:]) {
		t.Errorf("served %s: want timeline 1's WAL to %#x from its ranges, then zeros", seg2.Name(r.size), n)
	}
}
