package restore

import (
	"filippo.io/age"

	"github.com/walship/walship/compress"
	"github.com/walship/walship/sinks"
)

// Open turns a stored object's body back into its raw bytes exactly as
// fetch does for WAL: decrypt when meta names a scheme, then decompress
// with c. The caller checks the result against the SHA-256 it expects.
// Errors wrap ErrCannotDecrypt (no or wrong identity) or ErrCorrupt
// (damaged bytes), and name key.
func Open(key string, c compress.Codec, body []byte, meta sinks.Metadata, ids []age.Identity) ([]byte, error) {
	return open(key, c, body, meta, ids)
}
