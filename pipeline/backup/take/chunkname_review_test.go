package take

import (
	"testing"

	"github.com/walship/walship/pipeline"
	"github.com/walship/walship/pipeline/backup"
)

// REVIEW FINDING 7
// A chunk's <seq> is six digits in pipeline.ValidBackupChunk (and in
// backup.ParseChunkName), but nothing bounds the number of chunks of an
// archive: New accepts --chunk-size down to 64 KiB, and the chunker counts
// on. The 1,000,000th chunk of an archive (64 GB at 64 KiB chunks, 16 TiB
// at the default 16 MiB) gets the name <id>/base/1000000, its event fails
// Validate, and the backup fails after hours of work. Either bound the
// archive size / chunk count up front (refuse a chunk size that cannot
// hold the database, which BASE_BACKUP's tablespace sizes give with
// PROGRESS) or allow more digits.
func TestReviewChunkSeqOverflow(t *testing.T) {
	name := backup.ChunkName("20261129T210000Z", backup.ArchiveBase, 1_000_000)
	if !pipeline.ValidBackupChunk(name) {
		t.Fatalf("chunk %q (the millionth of an archive) is not a valid chunk name: the backup fails there", name)
	}
}
