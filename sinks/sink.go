// Package sinks defines where archived WAL goes: the Sink interface that
// every backend implements, the metadata each object carries, and the key
// layouts that let existing restore tools read walship's bucket. Backends
// live in subpackages (s3, file); sinktest is the conformance suite they
// all pass.
package sinks

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strconv"
	"strings"
	"time"
)

// ErrExists is returned by Put when an object already exists at the key.
// The caller decides whether the existing object is the same (an idempotent
// retry) or a conflict.
var ErrExists = errors.New("object already exists")

// Sink stores archived WAL files. Implementations must be safe for
// concurrent use. Not-found is reported as an error wrapping os.ErrNotExist.
type Sink interface {
	// Put stores body under key with meta, only if nothing is stored there
	// yet; otherwise it returns an error wrapping ErrExists. When Put returns
	// nil the object is durable: a later Get returns exactly body.
	Put(ctx context.Context, key string, body []byte, meta Metadata) error
	// Head returns the metadata of the object at key.
	Head(ctx context.Context, key string) (Metadata, error)
	// Get opens the object at key; the caller closes the reader.
	Get(ctx context.Context, key string) (io.ReadCloser, Metadata, error)
}

// Deleter is an optional capability: removing an object, used by `check`
// to clean up its write probe.
type Deleter interface {
	Delete(ctx context.Context, key string) error
}

// Syncer is an optional capability: making an object found in the sink
// durable before it is confirmed. A sink whose Put can return before its
// directory entries are durable (the file sink, when a writer crashed
// between linking the object and fsyncing its directory) implements it;
// for S3, an object that exists is durable.
type Syncer interface {
	Sync(ctx context.Context, key string) error
}

// Object is one entry of a listing.
type Object struct {
	Key  string
	Size int64
	// Modified is when the object was stored (S3 LastModified, the file's
	// modification time); zero when the sink cannot tell.
	Modified time.Time
}

// Lister is an optional capability: listing the keys under a prefix, for
// `verify` and `ls`. Keys come in lexical order.
type Lister interface {
	List(ctx context.Context, prefix string, fn func(Object) error) error
}

// Metadata is what walship records beside every object so that any reader
// can verify it without walship's events: user metadata on S3, a sidecar
// file on the file sink.
type Metadata struct {
	SHA256   string // hex SHA-256 of the raw (uncompressed) bytes
	StartLSN string // PostgreSQL notation
	EndLSN   string
	Timeline uint32
	SystemID string
	Codec    string
	RawSize  int64
	// Encryption is the client-side encryption scheme of the body ("" for
	// none, "age"): the body is the compressed bytes encrypted. It names
	// the scheme only, never a key.
	Encryption string
}

// Metadata keys, as S3 user metadata (x-amz-meta-<key>).
const (
	metaSHA256   = "walship-sha256"
	metaStart    = "walship-start-lsn"
	metaEnd      = "walship-end-lsn"
	metaTimeline = "walship-timeline"
	metaSystemID = "walship-system-id"
	metaCodec    = "walship-codec"
	metaRawSize  = "walship-raw-size"
	metaEncrypt  = "walship-encryption"
)

// Map encodes m as string key-values.
func (m Metadata) Map() map[string]string {
	out := map[string]string{
		metaSHA256:   m.SHA256,
		metaStart:    m.StartLSN,
		metaEnd:      m.EndLSN,
		metaTimeline: strconv.FormatUint(uint64(m.Timeline), 10),
		metaSystemID: m.SystemID,
		metaCodec:    m.Codec,
		metaRawSize:  strconv.FormatInt(m.RawSize, 10),
	}
	if m.Encryption != "" {
		out[metaEncrypt] = m.Encryption
	}
	return out
}

// MetadataFromMap decodes what Map wrote. Keys are matched without regard
// to case, as HTTP headers are; missing keys leave zero values.
func MetadataFromMap(in map[string]string) Metadata {
	get := func(k string) string {
		for kk, v := range in {
			if strings.EqualFold(kk, k) {
				return v
			}
		}
		return ""
	}
	tli, _ := strconv.ParseUint(get(metaTimeline), 10, 32)
	size, _ := strconv.ParseInt(get(metaRawSize), 10, 64)
	return Metadata{
		SHA256:   get(metaSHA256),
		StartLSN: get(metaStart),
		EndLSN:   get(metaEnd),
		Timeline: uint32(tli),
		SystemID: get(metaSystemID),
		Codec:    get(metaCodec),
		RawSize:  size,

		Encryption: get(metaEncrypt),
	}
}

// Layout maps WAL file names to object keys.
type Layout interface {
	// Key is the object key for a WAL file (segment, NAME.partial or
	// TLI.history) compressed with extension ext.
	Key(file, ext string) string
	// IdentityKey is the key of the small object that ties the archive to
	// one PostgreSQL cluster.
	IdentityKey() string
	// WALPrefix is the prefix under which every WAL key lies, for listing.
	WALPrefix() string
	// RangeKey is the key of a range of a segment being written (see
	// pipeline.KindRange): bytes [from, to) of segment, as
	// RangePrefix(segment) + "<from>-<to>" + ext, offsets as 8 hex digits.
	// Ranges live outside WALPrefix, where other tools' restore and
	// listing never see them.
	RangeKey(segment string, from, to uint64, ext string) string
	// RangePrefix is the prefix of every range key of a segment; it ends
	// with "/".
	RangePrefix(segment string) string
	// BackupPrefix is the prefix under which walship's base backups live
	// (see pipeline/backup): <BackupPrefix><id>/... It ends with "/" and
	// lies outside WALPrefix.
	BackupPrefix() string
}

// rangeLeaf is a range key's last element without its extension.
func rangeLeaf(from, to uint64) string { return fmt.Sprintf("%08X-%08X", from, to) }

// BarmanCloud is barman-cloud's layout:
// <prefix>/<server>/wals/<first 16 hex digits>/<file><ext>, with history
// files directly under wals/.
type BarmanCloud struct {
	Prefix, Server string
}

func (l BarmanCloud) base() string { return joinKey(l.Prefix, l.Server) }

// Key implements Layout.
func (l BarmanCloud) Key(file, ext string) string {
	if strings.HasSuffix(file, ".history") || len(file) < 16 {
		return joinKey(l.base(), "wals", file+ext)
	}
	return joinKey(l.base(), "wals", file[:16], file+ext)
}

// WALPrefix implements Layout.
func (l BarmanCloud) WALPrefix() string { return joinKey(l.base(), "wals") + "/" }

// RangeKey implements Layout: <prefix>/<server>/walship-partial/<segment>/<from>-<to><ext>.
func (l BarmanCloud) RangeKey(segment string, from, to uint64, ext string) string {
	return l.RangePrefix(segment) + rangeLeaf(from, to) + ext
}

// RangePrefix implements Layout.
func (l BarmanCloud) RangePrefix(segment string) string {
	return joinKey(l.base(), "walship-partial", segment) + "/"
}

// BackupPrefix implements Layout: <prefix>/<server>/walship-backups/.
func (l BarmanCloud) BackupPrefix() string { return joinKey(l.base(), "walship-backups") + "/" }

// IdentityKey implements Layout.
func (l BarmanCloud) IdentityKey() string { return joinKey(l.base(), "walship.identity.json") }

// WalG is WAL-G's layout: <prefix>/wal_005/<file><ext>.
type WalG struct {
	Prefix string
}

// Key implements Layout.
func (l WalG) Key(file, ext string) string { return joinKey(l.Prefix, "wal_005", file+ext) }

// WALPrefix implements Layout.
func (l WalG) WALPrefix() string { return joinKey(l.Prefix, "wal_005") + "/" }

// RangeKey implements Layout: <prefix>/walship_partial/<segment>/<from>-<to><ext>.
func (l WalG) RangeKey(segment string, from, to uint64, ext string) string {
	return l.RangePrefix(segment) + rangeLeaf(from, to) + ext
}

// RangePrefix implements Layout.
func (l WalG) RangePrefix(segment string) string {
	return joinKey(l.Prefix, "walship_partial", segment) + "/"
}

// BackupPrefix implements Layout: <prefix>/walship_backups/.
func (l WalG) BackupPrefix() string { return joinKey(l.Prefix, "walship_backups") + "/" }

// IdentityKey implements Layout.
func (l WalG) IdentityKey() string { return joinKey(l.Prefix, "wal_005", "walship.identity.json") }

// NewLayout builds the named layout.
func NewLayout(name, prefix, server string) (Layout, error) {
	switch name {
	case "", "barman-cloud":
		return BarmanCloud{Prefix: prefix, Server: server}, nil
	case "wal-g":
		return WalG{Prefix: prefix}, nil
	}
	return nil, fmt.Errorf("layout %q: use barman-cloud or wal-g", name)
}

func joinKey(parts ...string) string {
	var out []string
	for _, p := range parts {
		if p = strings.Trim(p, "/"); p != "" {
			out = append(out, p)
		}
	}
	return strings.Join(out, "/")
}
