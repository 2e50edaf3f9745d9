// Package backup holds the domain of walship's base backups: their IDs, the
// catalogue object that makes a backup complete, and the keys of its
// objects under a layout's BackupPrefix. It imports nothing from the
// project but package pipeline; taking, restoring and pruning backups are
// built on it elsewhere.
//
// A backup's objects, under <BackupPrefix><id>/:
//
//	started.json                  written first (Started): a backup in progress, or one that failed
//	<archive>/<seq><ext>          chunks of each archive's tar stream, archived like WAL
//	                              (compressed, maybe encrypted, put-if-absent, SHA-256 of the raw bytes)
//	manifest/<seq><ext>           chunks of the server's backup_manifest
//	backup.json                   the catalogue (Catalog), written last: only a backup
//	                              with a catalogue is complete
//
// <archive> is "base" (the data directory) or a tablespace's OID; <seq> is
// six decimal digits from 000000 (more past 999999).
package backup

import (
	"encoding/json"
	"errors"
	"fmt"
	"regexp"
	"strconv"
	"strings"
	"time"

	"github.com/walship/walship/pipeline"
)

// CatalogVersion is the catalogue encoding this build writes and reads.
const CatalogVersion = 1

// Archive names that are not tablespace OIDs.
const (
	ArchiveBase     = "base"     // the data directory's tar stream
	ArchiveManifest = "manifest" // the server's backup_manifest (JSON)
)

// Object names under <BackupPrefix><id>/.
const (
	CatalogFile = "backup.json"
	StartedFile = "started.json"
)

// IDLayout is the time layout of a backup ID: the backup's start in UTC.
const IDLayout = "20060102T150405Z"

var idRE = regexp.MustCompile(`^[0-9]{8}T[0-9]{6}Z$`)

// NewID is the ID of a backup started at t.
func NewID(t time.Time) string { return t.UTC().Format(IDLayout) }

// ParseID checks a backup ID and returns the time it names.
func ParseID(id string) (time.Time, error) {
	if !idRE.MatchString(id) {
		return time.Time{}, fmt.Errorf("backup id %q: want a UTC time like 20261129T210000Z", id)
	}
	t, err := time.Parse(IDLayout, id)
	if err != nil {
		return time.Time{}, fmt.Errorf("backup id %q: %v", id, err)
	}
	return t, nil
}

// ChunkName is a chunk's name relative to BackupPrefix, and the File of its
// pipeline.KindBackup event: <id>/<archive>/<seq>.
func ChunkName(id, archive string, seq int) string {
	return fmt.Sprintf("%s/%s/%06d", id, archive, seq)
}

// ParseChunkName splits a chunk name into its parts.
func ParseChunkName(name string) (id, archive string, seq int, err error) {
	if !pipeline.ValidBackupChunk(name) {
		return "", "", 0, fmt.Errorf("backup chunk %q: want <id>/<archive>/<seq>", name)
	}
	parts := strings.Split(name, "/")
	seq, _ = strconv.Atoi(parts[2])
	return parts[0], parts[1], seq, nil
}

// ChunkKey is a chunk's object key: prefix is the layout's BackupPrefix,
// ext the codec's extension.
func ChunkKey(prefix, id, archive string, seq int, ext string) string {
	return prefix + ChunkName(id, archive, seq) + ext
}

// CatalogKey is the key of a backup's catalogue.
func CatalogKey(prefix, id string) string { return prefix + id + "/" + CatalogFile }

// StartedKey is the key of a backup's start marker.
func StartedKey(prefix, id string) string { return prefix + id + "/" + StartedFile }

// Chunk is one stored piece of an archive.
type Chunk struct {
	Seq        int    `json:"seq"`
	Key        string `json:"key"`
	Size       int64  `json:"size"`        // raw bytes
	SHA256     string `json:"sha256"`      // of the raw bytes
	StoredSize int64  `json:"stored_size"` // bytes in the sink (compressed, maybe encrypted)
}

// Archive is one tar stream of the backup (the data directory or a
// tablespace) or the manifest, as the chunks that hold it in order.
type Archive struct {
	Name string `json:"name"` // ArchiveBase, ArchiveManifest or a tablespace OID
	// Location is a tablespace's directory on the server; empty for the
	// base archive and the manifest.
	Location string  `json:"location,omitempty"`
	Size     int64   `json:"size"`   // raw bytes of the whole stream
	SHA256   string  `json:"sha256"` // of the whole stream
	Chunks   []Chunk `json:"chunks"`
}

// Started marks a backup that began; a catalogue beside it marks it
// complete.
type Started struct {
	V         int          `json:"v"`
	ID        string       `json:"id"`
	Server    string       `json:"server"`
	SystemID  string       `json:"system_id"`
	Timeline  uint32       `json:"timeline"`
	StartLSN  pipeline.LSN `json:"start_lsn"`
	StartTime time.Time    `json:"start_time"`
	Host      string       `json:"host,omitempty"`
}

// Catalog describes a complete backup: everything restore needs to find,
// verify and recover it. It is written only when every chunk and the WAL
// from StartLSN to EndLSN are durable in the sink.
type Catalog struct {
	V         int          `json:"v"`
	ID        string       `json:"id"`
	Server    string       `json:"server"`
	SystemID  string       `json:"system_id"`
	PGVersion int          `json:"pg_version"` // server_version_num
	SegSize   uint64       `json:"seg_size"`
	Timeline  uint32       `json:"timeline"` // the timeline the backup started on
	StartLSN  pipeline.LSN `json:"start_lsn"`
	EndLSN    pipeline.LSN `json:"end_lsn"`
	// EndTimeline is the timeline the backup ended on (a standby may be
	// promoted meanwhile); recovery needs WAL up to EndLSN on it.
	EndTimeline uint32    `json:"end_timeline"`
	StartTime   time.Time `json:"start_time"`
	EndTime     time.Time `json:"end_time"`
	Label       string    `json:"label"`
	// Codec and Encryption are how the chunks are stored.
	Codec      string `json:"codec"`
	Encryption string `json:"encryption,omitempty"`
	// Archives are the tar streams, base first, then tablespaces.
	Archives []Archive `json:"archives"`
	Manifest Archive   `json:"manifest"`
	// ManifestChecksum is the backup manifest's own checksum (its
	// "Manifest-Checksum" field).
	ManifestChecksum string `json:"manifest_checksum"`
	Size             int64  `json:"size"`        // raw bytes of every archive
	StoredSize       int64  `json:"stored_size"` // bytes in the sink, chunks of archives and manifest
}

// Validate checks that the catalogue is complete and consistent.
func (c *Catalog) Validate() error {
	bad := func(format string, args ...any) error {
		return fmt.Errorf("backup catalogue %s: %s", c.ID, fmt.Sprintf(format, args...))
	}
	if c.V != CatalogVersion {
		return bad("version %d, this build reads %d", c.V, CatalogVersion)
	}
	if _, err := ParseID(c.ID); err != nil {
		return err
	}
	if err := pipeline.ValidServerName(c.Server); err != nil {
		return bad("%v", err)
	}
	if c.Timeline == 0 || c.EndTimeline < c.Timeline || c.StartLSN == 0 || c.EndLSN < c.StartLSN {
		return bad("timeline %d-%d, lsn %s-%s", c.Timeline, c.EndTimeline, c.StartLSN, c.EndLSN)
	}
	if err := pipeline.SegmentSize(c.SegSize).ValidateEvent(); err != nil { // walship wrote it from a size the server gave; the event bound lets the simulation use small segments
		return bad("%v", err)
	}
	if len(c.Archives) == 0 || c.Archives[0].Name != ArchiveBase {
		return bad("the first archive must be %q", ArchiveBase)
	}
	all := append(append([]Archive(nil), c.Archives...), c.Manifest)
	for i, a := range all {
		if a.Name == ArchiveManifest && i != len(all)-1 || i == len(all)-1 && a.Name != ArchiveManifest {
			return bad("archive %q out of place", a.Name)
		}
		var sum int64
		for j, ch := range a.Chunks {
			if ch.Seq != j || ch.Size < 0 || ch.Key == "" {
				return bad("archive %s chunk %d: seq %d, size %d, key %q", a.Name, j, ch.Seq, ch.Size, ch.Key)
			}
			sum += ch.Size
		}
		if sum != a.Size || len(a.Chunks) == 0 {
			return bad("archive %s: %d chunks hold %d bytes, it has %d", a.Name, len(a.Chunks), sum, a.Size)
		}
	}
	return nil
}

// ErrNotBackup marks an object that is not a catalogue this build reads.
var ErrNotBackup = errors.New("not a walship backup catalogue")

// DecodeCatalog parses and validates a catalogue.
func DecodeCatalog(data []byte) (Catalog, error) {
	var c Catalog
	if err := json.Unmarshal(data, &c); err != nil {
		return c, fmt.Errorf("%w: %v", ErrNotBackup, err)
	}
	return c, c.Validate()
}

// Encode writes the catalogue as indented JSON.
func (c *Catalog) Encode() ([]byte, error) { return json.MarshalIndent(c, "", "  ") }
