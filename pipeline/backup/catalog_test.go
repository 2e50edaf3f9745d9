package backup

import (
	"testing"

	"github.com/walship/walship/pipeline"
)

func TestChunkNames(t *testing.T) {
	for _, seq := range []int{0, 7, 999_999, 1_000_000, 123_456_789} {
		name := ChunkName("20261129T210000Z", "16384", seq)
		if !pipeline.ValidBackupChunk(name) {
			t.Fatalf("%s: not a valid chunk name", name)
		}
		id, archive, got, err := ParseChunkName(name)
		if err != nil || id != "20261129T210000Z" || archive != "16384" || got != seq {
			t.Fatalf("%s: parsed %q %q %d %v", name, id, archive, got, err)
		}
	}
	for _, bad := range []string{
		"20261129T210000Z/base/00001",      // five digits
		"20261129T210000Z/base/0000001",    // a leading zero past six digits: two names for one chunk
		"20261129T210000Z/base/1234567890", // ten digits
		"20261129T210000Z/0/000001",        // OID 0
		"2026-11-29/base/000001",           // not an ID
		"20261129T210000Z/base/000001/x",
	} {
		if pipeline.ValidBackupChunk(bad) {
			t.Errorf("%s: accepted", bad)
		}
		if _, _, _, err := ParseChunkName(bad); err == nil {
			t.Errorf("%s: parsed", bad)
		}
	}
}

func TestParseID(t *testing.T) {
	if _, err := ParseID("20261129T210000Z"); err != nil {
		t.Fatal(err)
	}
	for _, bad := range []string{"", "20261129T210000", "20261329T210000Z", "20261129T210000Z-keep"} {
		if _, err := ParseID(bad); err == nil {
			t.Errorf("%q: accepted", bad)
		}
	}
}
