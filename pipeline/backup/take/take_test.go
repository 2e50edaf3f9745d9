package take

import (
	"bytes"
	"context"
	"crypto/sha256"
	"math/rand/v2"
	"strings"
	"testing"
	"time"

	"github.com/walship/walship/pipeline"
)

func TestChunkerCutsAndHashes(t *testing.T) {
	for _, tc := range []struct {
		name  string
		total int
		size  int
		want  int // chunks
	}{
		{"empty", 0, 100, 1},
		{"short", 50, 100, 1},
		{"exact", 300, 100, 3},
		{"tail", 301, 100, 4},
	} {
		t.Run(tc.name, func(t *testing.T) {
			data := make([]byte, tc.total)
			r := rand.New(rand.NewPCG(1, 2))
			for i := range data {
				data[i] = byte(r.IntN(256))
			}
			var got []chunk
			c := newChunker("base", tc.size, func() []byte { return make([]byte, 0, tc.size) }, func(ch chunk) error {
				got = append(got, ch)
				return nil
			})
			// Writes of odd sizes, as CopyData messages come.
			for rest := data; len(rest) > 0; {
				n := min(len(rest), 1+r.IntN(137))
				if _, err := c.Write(rest[:n]); err != nil {
					t.Fatal(err)
				}
				rest = rest[n:]
			}
			if err := c.Close(); err != nil {
				t.Fatal(err)
			}
			if len(got) != tc.want {
				t.Fatalf("%d chunks, want %d", len(got), tc.want)
			}
			var cat []byte
			for i, ch := range got {
				if ch.seq != i || ch.archive != "base" || len(ch.data) > tc.size || i < len(got)-1 && len(ch.data) != tc.size {
					t.Fatalf("chunk %d: seq %d, %d bytes", i, ch.seq, len(ch.data))
				}
				sum := sha256.Sum256(ch.data)
				if ch.sha256 != pipeline.SHA256Hex(sum[:]) {
					t.Fatalf("chunk %d: sha256 mismatch", i)
				}
				cat = append(cat, ch.data...)
			}
			if !bytes.Equal(cat, data) {
				t.Fatal("chunks do not concatenate to the stream")
			}
			sum := sha256.Sum256(data)
			if c.Sum() != pipeline.SHA256Hex(sum[:]) || c.total != int64(tc.total) {
				t.Fatalf("stream sum or size wrong: %d", c.total)
			}
		})
	}
}

func chunkEvent(file, sha string) pipeline.SegmentEvent {
	return pipeline.SegmentEvent{V: 1, Server: "s", SystemID: "42", Timeline: 1, File: file, Kind: pipeline.KindBackup, Size: 3, SHA256: sha}
}

// The window holds at most n chunks; only a matching confirmation frees a
// place; republication hands out the bytes and they stay valid until
// released, even when the confirmation comes meanwhile.
func TestWindow(t *testing.T) {
	w := newWindow(2, 4, "s3://b/p")
	ctx := context.Background()
	now := time.Unix(1000, 0)
	for i, f := range []string{"20261129T210000Z/base/000000", "20261129T210000Z/base/000001"} {
		if err := w.acquire(ctx); err != nil {
			t.Fatal(err)
		}
		w.add(chunkEvent(f, strings.Repeat(string(rune('a'+i)), 64)), []byte("abc"), now)
	}
	short, cancel := context.WithTimeout(ctx, 50*time.Millisecond)
	defer cancel()
	if err := w.acquire(short); err == nil {
		t.Fatal("a third chunk got into a window of two")
	}
	ok := func(file, sha, dest string, kind pipeline.Kind) pipeline.ArchivedEvent {
		ev := chunkEvent(file, sha)
		ev.Kind = kind
		return pipeline.ArchivedEvent{SegmentEvent: ev, Key: "k", Dest: dest}
	}
	a64, b64 := strings.Repeat("a", 64), strings.Repeat("b", 64)
	for _, bad := range []pipeline.ArchivedEvent{
		ok("20261129T210000Z/base/000000", b64, "s3://b/p", pipeline.KindBackup),  // other bytes
		ok("20261129T210000Z/base/000000", a64, "s3://x/p", pipeline.KindBackup),  // other destination
		ok("20261129T210000Z/base/000000", a64, "s3://b/p", pipeline.KindSegment), // not a backup chunk
		ok("20261129T210000Z/base/000009", a64, "s3://b/p", pipeline.KindBackup),  // not in flight
	} {
		if w.confirm(bad) {
			t.Fatalf("confirmed by %+v", bad)
		}
	}
	if w.inFlight() != 2 {
		t.Fatal("a mismatching confirmation freed a place")
	}
	// The second chunk is due for republication; its confirmation comes
	// while it is being published again.
	due := w.due(now.Add(time.Minute), time.Minute)
	if len(due) != 2 || due[0].ev.Attempt != 1 {
		t.Fatalf("due %d", len(due))
	}
	if again := w.due(now.Add(time.Minute), time.Minute); len(again) != 0 {
		t.Fatal("a chunk being republished is due again")
	}
	if !w.confirm(ok("20261129T210000Z/base/000001", b64, "s3://b/p", pipeline.KindBackup)) {
		t.Fatal("matching confirmation refused")
	}
	var p *inflight
	for _, d := range due {
		if d.ev.File == "20261129T210000Z/base/000001" {
			p = d
		}
	}
	if string(p.data) != "abc" {
		t.Fatal("bytes of a chunk under republication were reused")
	}
	w.release(p.ev.File, p.data)
	short2, cancel2 := context.WithTimeout(ctx, time.Second)
	defer cancel2()
	if err := w.acquire(short2); err != nil {
		t.Fatal("a confirmation did not free a place in the window")
	}
	<-w.slots // give it back: nothing was added
	if !w.confirm(ok("20261129T210000Z/base/000000", a64, "s3://b/p", pipeline.KindBackup)) {
		t.Fatal("first chunk's confirmation refused")
	}
	w.release("20261129T210000Z/base/000000", nil)
	if n := w.inFlight(); n != 0 {
		t.Fatalf("%d in flight", n)
	}
	if _, ok := w.confirmed("20261129T210000Z/base/000001"); !ok {
		t.Fatal("confirmation not recorded")
	}
}

func TestOptionsCommand(t *testing.T) {
	o := Options{Label: "it's", Checkpoint: "fast", MaxRate: 1024, ManifestChecksums: "SHA256"}
	if err := o.Validate(); err != nil {
		t.Fatal(err)
	}
	want := "BASE_BACKUP (LABEL 'it''s', CHECKPOINT 'fast', WAIT false, TABLESPACE_MAP true, MANIFEST 'yes', MANIFEST_CHECKSUMS 'SHA256', MAX_RATE 1024)"
	if got := o.command(); got != want {
		t.Fatalf("command\n%s\nwant\n%s", got, want)
	}
	for _, bad := range []Options{{Checkpoint: "now"}, {Checkpoint: "fast", MaxRate: 10}, {Checkpoint: "fast", ManifestChecksums: "MD5"}} {
		if bad.Validate() == nil {
			t.Errorf("%+v accepted", bad)
		}
	}
}
