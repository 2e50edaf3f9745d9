// Package retentiontest writes backups into a sink as `walship backup`
// leaves them — a start marker, a chunk of the base archive and of the
// manifest, and the catalogue last — without a PostgreSQL, for the tests
// of retention. The chunks hold placeholder bytes: nothing here restores.
package retentiontest

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"time"

	"github.com/walship/walship/pipeline"
	"github.com/walship/walship/pipeline/backup"
	"github.com/walship/walship/sinks"
)

// Spec is one backup to write.
type Spec struct {
	ID                    string // default: backup.NewID(StartTime)
	Server, SystemID      string
	SegSize               uint64
	Timeline, EndTimeline uint32 // EndTimeline 0: Timeline
	StartLSN, EndLSN      pipeline.LSN
	StartTime, EndTime    time.Time
	// Incomplete writes the marker and the chunks but no catalogue: a
	// backup that failed, or is in progress.
	Incomplete bool
}

// Write stores the backup under layout's BackupPrefix and returns its ID.
func Write(ctx context.Context, sink sinks.Sink, layout sinks.Layout, s Spec) (string, error) {
	id := s.ID
	if id == "" {
		id = backup.NewID(s.StartTime)
	}
	if s.EndTimeline == 0 {
		s.EndTimeline = s.Timeline
	}
	prefix := layout.BackupPrefix()
	put := func(key string, body []byte, meta sinks.Metadata) error {
		sum := sha256.Sum256(body)
		meta.SHA256, meta.RawSize = hex.EncodeToString(sum[:]), int64(len(body))
		return sink.Put(ctx, key, body, meta)
	}
	started, _ := json.Marshal(backup.Started{V: backup.CatalogVersion, ID: id, Server: s.Server, SystemID: s.SystemID,
		Timeline: s.Timeline, StartLSN: s.StartLSN, StartTime: s.StartTime})
	if err := put(backup.StartedKey(prefix, id), started, sinks.Metadata{}); err != nil {
		return "", err
	}
	archive := func(name string, body []byte) (backup.Archive, error) {
		sum := sha256.Sum256(body)
		key := backup.ChunkKey(prefix, id, name, 0, "")
		meta := sinks.Metadata{StartLSN: s.StartLSN.String(), EndLSN: s.StartLSN.String(), Timeline: s.Timeline, SystemID: s.SystemID, Codec: "none"}
		if err := put(key, body, meta); err != nil {
			return backup.Archive{}, err
		}
		h := hex.EncodeToString(sum[:])
		n := int64(len(body))
		return backup.Archive{Name: name, Size: n, SHA256: h,
			Chunks: []backup.Chunk{{Seq: 0, Key: key, Size: n, SHA256: h, StoredSize: n}}}, nil
	}
	base, err := archive(backup.ArchiveBase, []byte("base archive of "+id))
	if err != nil {
		return "", err
	}
	man, err := archive(backup.ArchiveManifest, []byte(`{"PostgreSQL-Backup-Manifest-Version": 1}`))
	if err != nil {
		return "", err
	}
	if s.Incomplete {
		return id, nil
	}
	c := backup.Catalog{V: backup.CatalogVersion, ID: id, Server: s.Server, SystemID: s.SystemID, PGVersion: 150000,
		SegSize: s.SegSize, Timeline: s.Timeline, StartLSN: s.StartLSN, EndLSN: s.EndLSN, EndTimeline: s.EndTimeline,
		StartTime: s.StartTime, EndTime: s.EndTime, Label: "test " + id, Codec: "none",
		Archives: []backup.Archive{base}, Manifest: man, ManifestChecksum: "0",
		Size: base.Size, StoredSize: base.Size + man.Size}
	if err := c.Validate(); err != nil {
		return "", err
	}
	body, err := c.Encode()
	if err != nil {
		return "", err
	}
	return id, put(backup.CatalogKey(prefix, id), body, sinks.Metadata{})
}
