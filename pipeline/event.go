package pipeline

import (
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"regexp"
	"strconv"
	"strings"
)

// EventVersion is the version of the event encoding this build writes and
// the only one it reads.
const EventVersion = 1

// Kind says what a WAL file is.
type Kind string

// The kinds of WAL file walship archives.
const (
	KindSegment Kind = "segment" // a complete WAL segment
	KindPartial Kind = "partial" // the last, incomplete segment of an ended timeline
	KindHistory Kind = "history" // a timeline history file
	// KindRange is WAL of the segment being written, uploaded before the
	// segment is complete (--partial-interval): bytes [StartLSN, EndLSN)
	// of segment File, only those. The name "partial" was taken first by
	// the ended timeline's last segment, which PostgreSQL calls .partial.
	KindRange Kind = "range"
	// KindBackup is one chunk of a base backup (see pipeline/backup): File
	// is <backup id>/<archive>/<seq>, the bytes are a piece of the
	// archive's tar stream (or of the backup manifest), and the archiver
	// stores them under the layout's BackupPrefix. StartLSN is the
	// backup's start; EndLSN equals it. A backup chunk is not WAL: no
	// receiver's watermark counts it.
	KindBackup Kind = "backup"
)

// SegmentEvent announces a WAL file that is durable in the receiver's spool
// and, when Object is set, staged in the JetStream object store. It is
// published on walship.<server>.segment and consumed once by the archiver
// pool.
type SegmentEvent struct {
	V        int    `json:"v"`
	Server   string `json:"server"`
	SystemID string `json:"system_id"` // decimal, as pg_control shows it
	Timeline uint32 `json:"timeline"`
	File     string `json:"file"`             // file name as archived: segment name, or NNNNNNNN.history
	Kind     Kind   `json:"kind"`             //
	StartLSN LSN    `json:"start_lsn"`        // first byte the file covers
	EndLSN   LSN    `json:"end_lsn"`          // just past its last byte
	Size     int64  `json:"size"`             // raw bytes
	SegSize  uint64 `json:"seg_size"`         // the cluster's wal segment size
	SHA256   string `json:"sha256"`           // hex SHA-256 of the raw bytes
	Object   string `json:"object,omitempty"` // object-store name; empty when only the local spool holds it
	Spool    string `json:"spool,omitempty"`  // path in the receiver's spool, for archivers in the same process
	// URL is where archivers on other hosts fetch the bytes from the
	// receiver's spool over authenticated HTTP (--stage http, a claim
	// check); empty when the receiver does not serve its spool. It never
	// carries a credential.
	URL string `json:"url,omitempty"`
	// Attempt counts how often the receiver published this file before:
	// 0 the first time; more after a restart or when no confirmation came.
	// An archiver looks in the sink first when it is not 0.
	Attempt int `json:"attempt,omitempty"`
	// Run names the receiver's run (one per start) that published the
	// event; with Attempt it makes each publication distinct, so a file
	// published again is never dropped as a duplicate of an earlier one.
	Run string `json:"run,omitempty"`
	// Ranges is set on a segment (or ended timeline's last segment) of
	// which the receiver may have uploaded ranges: once the file is
	// archived, the archiver deletes the segment's range objects.
	Ranges bool `json:"ranges,omitempty"`
}

// ArchivedEvent confirms that a WAL file is durably in the sink. It is
// published on walship.<server>.archived and read by the receiver's
// watermark, status and anyone else.
type ArchivedEvent struct {
	SegmentEvent
	Key            string  `json:"key"`             // object key in the sink
	Dest           string  `json:"dest"`            // the sink written to (sinks ID: s3://bucket/prefix or file:///path)
	Codec          string  `json:"codec"`           // compression codec name
	CompressedSize int64   `json:"compressed_size"` // bytes stored
	UploadSeconds  float64 `json:"upload_seconds"`  // time spent in the sink's Put
	Existed        bool    `json:"existed"`         // the sink already held identical bytes
}

// MsgID names the WAL file: one per system, file and kind. The receiver
// matches confirmations with its pending files by it.
func (e *SegmentEvent) MsgID() string {
	if e.Kind == KindRange {
		return e.SystemID + "/" + e.RangeName() + "/" + string(e.Kind)
	}
	return e.SystemID + "/" + e.File + "/" + string(e.Kind)
}

// RangeOffsets are a range's first and end offsets within its segment.
func (e *SegmentEvent) RangeOffsets() (from, to uint64) {
	size := SegmentSize(e.SegSize)
	from = uint64(size.Offset(e.StartLSN))
	return from, from + uint64(e.EndLSN-e.StartLSN)
}

// RangeName names a range event's WAL: <segment>.<from>-<to>, the offsets
// within the segment as 8 hex digits (see RangeName).
func (e *SegmentEvent) RangeName() string {
	from, to := e.RangeOffsets()
	return RangeName(e.File, from, to)
}

// RangeName is the name of bytes [from, to) of a segment:
// <segment>.<from>-<to>, offsets as 8 upper-case hex digits.
func RangeName(segment string, from, to uint64) string {
	return fmt.Sprintf("%s.%08X-%08X", segment, from, to)
}

// ParseRangeSuffix parses the <from>-<to> of a range name (what follows
// "<segment>."), with any extension after it already removed.
func ParseRangeSuffix(s string) (from, to uint64, ok bool) {
	if len(s) != 17 || s[8] != '-' {
		return 0, 0, false
	}
	f, err1 := strconv.ParseUint(s[:8], 16, 64)
	t, err2 := strconv.ParseUint(s[9:], 16, 64)
	if err1 != nil || err2 != nil || f >= t || strings.ToUpper(s) != s {
		return 0, 0, false
	}
	return f, t, true
}

// PublishID is the Nats-Msg-Id of one publication of the file: retries of
// the same publication (a lost acknowledgement) are deduplicated by it; a
// new publication (another attempt, or another run of the receiver) is
// not.
func (e *SegmentEvent) PublishID() string {
	return e.MsgID() + "/" + e.Run + "/" + strconv.Itoa(e.Attempt)
}

var (
	serverNameRE = regexp.MustCompile(`^[A-Za-z0-9_-]{1,64}$`)
	historyRE    = regexp.MustCompile(`^[0-9A-F]{8}\.history$`)
	sha256RE     = regexp.MustCompile(`^[0-9a-f]{64}$`)
	// backupChunkRE is a backup chunk's File: <id>/<archive>/<seq>, the id
	// a UTC time (20061102T150405Z), the archive "base", "manifest" or a
	// tablespace OID, the sequence at least six decimal digits from
	// 000000 (up to nine: an archive of more than a million chunks, 16 TiB
	// at the default chunk size, still has names).
	backupChunkRE = regexp.MustCompile(`^[0-9]{8}T[0-9]{6}Z/(base|manifest|[1-9][0-9]{0,9})/(0[0-9]{5}|[1-9][0-9]{5,8})$`)
)

// ValidBackupChunk reports whether name is a backup chunk's name,
// <id>/<archive>/<seq> (see KindBackup).
func ValidBackupChunk(name string) bool { return backupChunkRE.MatchString(name) }

// ValidServerName reports whether s can be a server name: it is used in NATS
// subjects and object keys, so only letters, digits, '-' and '_'.
func ValidServerName(s string) error {
	if !serverNameRE.MatchString(s) {
		return fmt.Errorf("server name %q: use 1-64 letters, digits, '-' or '_'", s)
	}
	return nil
}

// ErrMalformed marks an event that can never be processed; the archiver
// terminates it instead of retrying.
var ErrMalformed = errors.New("malformed event")

// Validate checks that the event is internally consistent.
func (e *SegmentEvent) Validate() error {
	bad := func(format string, args ...any) error {
		return fmt.Errorf("%w: %s", ErrMalformed, fmt.Sprintf(format, args...))
	}
	if e.V != EventVersion {
		return bad("version %d, this build reads %d", e.V, EventVersion)
	}
	if err := ValidServerName(e.Server); err != nil {
		return bad("%v", err)
	}
	if _, err := strconv.ParseUint(e.SystemID, 10, 64); err != nil {
		return bad("system id %q is not a number", e.SystemID)
	}
	if e.Timeline == 0 {
		return bad("timeline 0")
	}
	if !sha256RE.MatchString(e.SHA256) {
		return bad("sha256 %q is not 64 lower-case hex digits", e.SHA256)
	}
	if e.Attempt < 0 {
		return bad("attempt %d", e.Attempt)
	}
	if e.Size < 0 || e.EndLSN < e.StartLSN {
		return bad("size %d, lsn %s-%s", e.Size, e.StartLSN, e.EndLSN)
	}
	switch e.Kind {
	case KindSegment, KindPartial:
		size := SegmentSize(e.SegSize)
		if err := size.ValidateEvent(); err != nil {
			return bad("%v", err)
		}
		seg, err := ParseSegmentName(e.File, size)
		if err != nil {
			return bad("%v", err)
		}
		if seg.Timeline != e.Timeline || seg.StartLSN(size) != e.StartLSN {
			return bad("file %s does not match timeline %d, start %s", e.File, e.Timeline, e.StartLSN)
		}
		if uint64(e.Size) != e.SegSize {
			return bad("%s %s has size %d, segment size %d", e.Kind, e.File, e.Size, e.SegSize)
		}
		if e.Kind == KindSegment && e.EndLSN != seg.EndLSN(size) || e.EndLSN > seg.EndLSN(size) {
			return bad("%s %s ends at %s", e.Kind, e.File, e.EndLSN)
		}
	case KindRange:
		size := SegmentSize(e.SegSize)
		if err := size.ValidateEvent(); err != nil {
			return bad("%v", err)
		}
		seg, err := ParseSegmentName(e.File, size)
		if err != nil {
			return bad("%v", err)
		}
		if seg.Timeline != e.Timeline || e.StartLSN < seg.StartLSN(size) || e.EndLSN <= e.StartLSN || e.EndLSN > seg.EndLSN(size) {
			return bad("range %s-%s is not inside segment %s", e.StartLSN, e.EndLSN, e.File)
		}
		if e.Size != int64(e.EndLSN-e.StartLSN) {
			return bad("range %s-%s has size %d", e.StartLSN, e.EndLSN, e.Size)
		}
	case KindBackup:
		if !backupChunkRE.MatchString(e.File) {
			return bad("backup chunk %q: want <id>/<archive>/<seq>", e.File)
		}
		if e.EndLSN != e.StartLSN {
			return bad("backup chunk %s has lsn %s-%s", e.File, e.StartLSN, e.EndLSN)
		}
	case KindHistory:
		if !historyRE.MatchString(e.File) || e.File != HistoryFileName(e.Timeline) {
			return bad("history file %q for timeline %d", e.File, e.Timeline)
		}
	default:
		return bad("kind %q", e.Kind)
	}
	if e.URL != "" && !strings.HasPrefix(e.URL, "http://") && !strings.HasPrefix(e.URL, "https://") {
		return bad("url %q: want http:// or https://", e.URL)
	}
	return nil
}

// DecodeSegmentEvent parses and validates a segment event.
func DecodeSegmentEvent(data []byte) (SegmentEvent, error) {
	var e SegmentEvent
	if err := json.Unmarshal(data, &e); err != nil {
		return e, fmt.Errorf("%w: %v", ErrMalformed, err)
	}
	return e, e.Validate()
}

// DecodeArchivedEvent parses and validates an archived event.
func DecodeArchivedEvent(data []byte) (ArchivedEvent, error) {
	var e ArchivedEvent
	if err := json.Unmarshal(data, &e); err != nil {
		return e, fmt.Errorf("%w: %v", ErrMalformed, err)
	}
	if err := e.SegmentEvent.Validate(); err != nil {
		return e, err
	}
	if e.Key == "" {
		return e, fmt.Errorf("%w: archived event without key", ErrMalformed)
	}
	return e, nil
}

// SHA256Hex formats a digest as the events carry it.
func SHA256Hex(sum []byte) string { return hex.EncodeToString(sum) }
