package unpack

import (
	"bytes"
	"crypto/sha256"
	"crypto/sha512"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"hash"
	"hash/crc32"
	"sort"
	"strings"
)

// ErrVerify marks a restored file that does not match the backup manifest,
// or a manifest that does not match its own checksum.
var ErrVerify = errors.New("does not match the backup manifest")

// Manifest is PostgreSQL's backup_manifest (versions 1 and 2), as far as
// verifying files needs it.
type Manifest struct {
	Version  int            `json:"PostgreSQL-Backup-Manifest-Version"`
	Files    []ManifestFile `json:"Files"`
	Checksum string         `json:"Manifest-Checksum"`
}

// ManifestFile is one file of the manifest. Paths that are not valid
// UTF-8 come hex-encoded as EncodedPath.
type ManifestFile struct {
	Path        string `json:"Path"`
	EncodedPath string `json:"Encoded-Path"`
	Size        int64  `json:"Size"`
	Algorithm   string `json:"Checksum-Algorithm"`
	Checksum    string `json:"Checksum"`
}

// ParseManifest checks a manifest's own checksum (the SHA-256 of every
// byte up to and including its second-to-last newline, as
// pg_verifybackup computes it) and parses it.
func ParseManifest(data []byte) (*Manifest, error) {
	var m Manifest
	if err := json.Unmarshal(data, &m); err != nil {
		return nil, fmt.Errorf("backup_manifest: %v", err)
	}
	if m.Version < 1 || m.Version > 2 {
		return nil, fmt.Errorf("backup_manifest: version %d, this build reads 1 and 2", m.Version)
	}
	end := bytes.LastIndexByte(bytes.TrimRight(data, "\n"), '\n')
	if end < 0 || m.Checksum == "" {
		return nil, fmt.Errorf("backup_manifest: %w: it has no Manifest-Checksum", ErrVerify)
	}
	sum := sha256.Sum256(data[:end+1])
	if hex.EncodeToString(sum[:]) != strings.ToLower(m.Checksum) {
		return nil, fmt.Errorf("backup_manifest: %w: its Manifest-Checksum %s is not the SHA-256 of its contents", ErrVerify, m.Checksum)
	}
	for i := range m.Files {
		f := &m.Files[i]
		if f.Path == "" && f.EncodedPath != "" {
			p, err := hex.DecodeString(f.EncodedPath)
			if err != nil {
				return nil, fmt.Errorf("backup_manifest: Encoded-Path %q: %v", f.EncodedPath, err)
			}
			f.Path = string(p)
		}
		if _, err := newChecksum(f.Algorithm); err != nil {
			return nil, fmt.Errorf("backup_manifest: %s: %v", f.Path, err)
		}
	}
	return &m, nil
}

// checksum is a file checksum as the manifest encodes it.
type checksum struct {
	hash.Hash
	crc32c bool // PostgreSQL stores a CRC-32C in the machine's byte order
}

func (c checksum) hex() string {
	if c.crc32c {
		var b [4]byte
		binary.LittleEndian.PutUint32(b[:], c.Hash.(hash.Hash32).Sum32())
		return hex.EncodeToString(b[:])
	}
	return hex.EncodeToString(c.Sum(nil))
}

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// newChecksum returns the hash of a manifest algorithm; nil for NONE.
func newChecksum(alg string) (*checksum, error) {
	switch strings.ToUpper(alg) {
	case "", "NONE":
		return nil, nil
	case "CRC32C":
		return &checksum{Hash: crc32.New(castagnoli), crc32c: true}, nil
	case "SHA224":
		return &checksum{Hash: sha256.New224()}, nil
	case "SHA256":
		return &checksum{Hash: sha256.New()}, nil
	case "SHA384":
		return &checksum{Hash: sha512.New384()}, nil
	case "SHA512":
		return &checksum{Hash: sha512.New()}, nil
	}
	return nil, fmt.Errorf("checksum algorithm %q: want CRC32C, SHA224, SHA256, SHA384, SHA512 or NONE", alg)
}

// verifier checks the files of the restored tar streams against the
// manifest, as pg_verifybackup checks a data directory: every file the
// manifest lists is present with its size and checksum, and no file is
// present that it does not list (pg_wal and the files a restore writes
// itself excepted).
type verifier struct {
	files    map[string]*ManifestFile
	seen     map[string]bool
	problems []string
}

func newVerifier(m *Manifest) *verifier {
	v := &verifier{files: make(map[string]*ManifestFile, len(m.Files)), seen: map[string]bool{}}
	for i := range m.Files {
		v.files[m.Files[i].Path] = &m.Files[i]
	}
	return v
}

// ignored are files pg_verifybackup does not expect in the manifest.
func ignored(path string) bool {
	switch path {
	case "backup_manifest", "postgresql.auto.conf", "recovery.signal", "standby.signal":
		return true
	}
	return path == "pg_wal" || strings.HasPrefix(path, "pg_wal/")
}

// begin returns the checksum to compute for a file about to be written
// (nil: none to compute).
func (v *verifier) begin(path string) *checksum {
	f, ok := v.files[path]
	if !ok {
		return nil
	}
	c, _ := newChecksum(f.Algorithm)
	return c
}

// end records a written file's size and checksum.
func (v *verifier) end(path string, size int64, c *checksum) {
	f, ok := v.files[path]
	if !ok {
		if !ignored(path) {
			v.problems = append(v.problems, fmt.Sprintf("%s is in the backup but not in the manifest", path))
		}
		return
	}
	if v.seen[path] {
		v.problems = append(v.problems, fmt.Sprintf("%s is in the backup twice", path))
		return
	}
	v.seen[path] = true
	if size != f.Size {
		v.problems = append(v.problems, fmt.Sprintf("%s has size %d, the manifest says %d", path, size, f.Size))
		return
	}
	if c != nil && !strings.EqualFold(c.hex(), f.Checksum) {
		v.problems = append(v.problems, fmt.Sprintf("%s has checksum %s %s, the manifest says %s", path, f.Algorithm, c.hex(), f.Checksum))
	}
}

// finish reports every problem found, and every manifest file that was
// not restored.
func (v *verifier) finish() error {
	var missing []string
	for p := range v.files {
		if !v.seen[p] {
			missing = append(missing, p+" is in the manifest but not in the backup")
		}
	}
	sort.Strings(missing)
	all := append(v.problems, missing...)
	if len(all) == 0 {
		return nil
	}
	more := ""
	if len(all) > 10 {
		more = fmt.Sprintf(" (and %d more)", len(all)-10)
		all = all[:10]
	}
	return fmt.Errorf("%w: %s%s", ErrVerify, strings.Join(all, "; "), more)
}
