package sinks

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
)

// Identity is the small object (walship.identity.json, at
// Layout.IdentityKey) that ties an archive to one PostgreSQL cluster. The
// archiver writes it before the first WAL file; archiving, fetching and
// verifying refuse an archive whose identity names another system.
type Identity struct {
	SystemID    string `json:"system_id"`        // decimal, as pg_controldata shows it
	SegmentSize uint64 `json:"wal_segment_size"` // bytes
	Server      string `json:"server"`
}

// ErrNoIdentity is returned by ReadIdentity when the archive has no
// identity object: nothing was ever archived there, or the destination,
// server name or layout is wrong.
var ErrNoIdentity = errors.New("no walship archive here (no identity object)")

// ErrBadIdentity is returned by ReadIdentity when the object at the
// identity key is not a walship identity: something else lives there.
var ErrBadIdentity = errors.New("not a walship identity object")

// ReadIdentity reads the identity object under layout. A missing object is
// ErrNoIdentity (which also wraps os.ErrNotExist); an unreadable or
// malformed one is another error.
func ReadIdentity(ctx context.Context, s Sink, layout Layout) (Identity, error) {
	key := layout.IdentityKey()
	rc, _, err := s.Get(ctx, key)
	if errors.Is(err, os.ErrNotExist) {
		return Identity{}, fmt.Errorf("%s: %w", key, errors.Join(ErrNoIdentity, os.ErrNotExist))
	}
	if err != nil {
		return Identity{}, err
	}
	defer rc.Close()
	data, err := io.ReadAll(io.LimitReader(rc, 1<<16))
	if err != nil {
		return Identity{}, fmt.Errorf("read %s: %w", key, err)
	}
	return ParseIdentity(key, data)
}

// ParseIdentity decodes an identity object's body; key names it in errors.
func ParseIdentity(key string, data []byte) (Identity, error) {
	var id Identity
	if err := json.Unmarshal(data, &id); err != nil || id.SystemID == "" {
		return Identity{}, fmt.Errorf("%s: %w", key, ErrBadIdentity)
	}
	return id, nil
}

// Body is the identity object's encoding.
func (id Identity) Body() []byte {
	b, _ := json.Marshal(id)
	return b
}
