// Package crypt encrypts archived WAL client-side with age
// (filippo.io/age) before it leaves the archiver, and decrypts it on
// restore. It is one step of the archive path: raw WAL is compressed, then
// encrypted, then uploaded; restore decrypts, then decompresses, then
// verifies the SHA-256 of the raw WAL.
//
// Encryption is per object: each object has its own file key, wrapped for
// every recipient configured when it was written. A rotated recipient list
// applies to new objects only; old objects stay readable with the
// identities they were written for, so a restore keeps every identity that
// was ever in use in its identity file.
//
// Keys are never logged or recorded: object metadata names the scheme
// (Scheme) and nothing else. Errors name files and line numbers, never a
// key's text.
package crypt

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"

	"filippo.io/age"
)

// Scheme is the value of an encrypted object's walship-encryption metadata.
const Scheme = "age"

// ErrNoIdentity means an object is encrypted and no identity was given to
// decrypt it.
var ErrNoIdentity = errors.New("the object is encrypted (age) and no identity was given: pass --decrypt-identity FILE or set WALSHIP_DECRYPT_IDENTITY")

// ErrWrongKey means none of the given identities is a recipient of the
// object: the wrong identity file, or one without the key the object was
// written for (before a rotation).
var ErrWrongKey = errors.New("none of the identities can decrypt the object: it was encrypted for other recipients (keep every identity ever used in the --decrypt-identity file)")

// ErrUnknownScheme means the object names an encryption scheme this
// walship does not know.
var ErrUnknownScheme = errors.New("unknown encryption scheme")

// ParseRecipients builds the recipient list from --encrypt-recipient
// values and an --encrypt-recipients-file (either may be empty). Both use
// age's public key syntax (age1...); the file has one per line, with
// blank lines and # comments ignored. No recipients at all is nil, nil:
// encryption off.
func ParseRecipients(values []string, file string) ([]age.Recipient, error) {
	var out []age.Recipient
	for i, v := range values {
		v = strings.TrimSpace(v)
		if strings.HasPrefix(v, "AGE-SECRET-KEY-") {
			return nil, fmt.Errorf("--encrypt-recipient #%d is a private key (AGE-SECRET-KEY-...), not a public one: give the recipient (age1...), which age-keygen -y prints; keep the private key for restore", i+1)
		}
		rs, err := age.ParseRecipients(strings.NewReader(v))
		if err != nil {
			return nil, fmt.Errorf("--encrypt-recipient #%d: not an age public key (age1...): %v", i+1, err)
		}
		out = append(out, rs...)
	}
	if file != "" {
		if strings.Contains(file, "AGE-SECRET-KEY-") {
			return nil, errors.New("--encrypt-recipients-file takes a file's path, and holds a private key (AGE-SECRET-KEY-...): give a file of public keys (age1...), which age-keygen -y prints")
		}
		b, err := os.ReadFile(file)
		if err != nil {
			return nil, fmt.Errorf("--encrypt-recipients-file: %v", pathless(err))
		}
		if bytes.Contains(b, []byte("AGE-SECRET-KEY-")) {
			return nil, fmt.Errorf("--encrypt-recipients-file %s holds a private key (AGE-SECRET-KEY-...): the archiver needs only public keys (age1...), which age-keygen -y prints", file)
		}
		rs, err := age.ParseRecipients(bytes.NewReader(b))
		if err != nil {
			return nil, fmt.Errorf("--encrypt-recipients-file %s: %v (one age public key, age1..., per line)", file, err)
		}
		out = append(out, rs...)
	}
	return out, nil
}

// pathless is a file error without the path it names (the caller says
// which flag it was).
func pathless(err error) error {
	var pe *os.PathError
	if errors.As(err, &pe) {
		return pe.Err
	}
	return err
}

// LoadIdentities reads an age identity file: one private key
// (AGE-SECRET-KEY-1...) per line, blank lines and # comments ignored, as
// age-keygen writes it. Several identities may be given, so that objects
// written before and after a key rotation all decrypt. "" is no
// identities.
func LoadIdentities(path string) ([]age.Identity, error) {
	if path == "" {
		return nil, nil
	}
	if strings.Contains(path, "AGE-SECRET-KEY-") {
		return nil, errors.New("--decrypt-identity (or WALSHIP_DECRYPT_IDENTITY) takes the path of an identity file, not the key itself: write the key to a file readable only by the user that runs walship and give its path")
	}
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("--decrypt-identity %s: %v", path, pathless(err))
	}
	defer f.Close()
	ids, err := age.ParseIdentities(f)
	if err != nil {
		// age's errors name the line, never its content.
		return nil, fmt.Errorf("--decrypt-identity %s: %v (an age identity file: AGE-SECRET-KEY-1... per line, as age-keygen writes it)", path, err)
	}
	return ids, nil
}

// Encrypter encrypts whole buffers for a fixed list of recipients. It is
// not safe for concurrent use; give each worker its own.
type Encrypter struct {
	recipients []age.Recipient
	buf        bytes.Buffer
}

// NewEncrypter builds an encrypter; nil when there are no recipients
// (encryption off).
func NewEncrypter(recipients []age.Recipient) *Encrypter {
	if len(recipients) == 0 {
		return nil
	}
	return &Encrypter{recipients: recipients}
}

// Encrypt returns src encrypted with a fresh file key for every
// recipient. The result is valid until the next call.
func (e *Encrypter) Encrypt(src []byte) ([]byte, error) {
	e.buf.Reset()
	// age adds a header (~100 bytes per recipient) and 16 bytes per 64 KiB.
	e.buf.Grow(len(src) + len(src)/4096 + 200*len(e.recipients) + 256)
	w, err := age.Encrypt(&e.buf, e.recipients...)
	if err != nil {
		return nil, fmt.Errorf("encrypt: %w", err)
	}
	if _, err := w.Write(src); err != nil {
		return nil, fmt.Errorf("encrypt: %w", err)
	}
	if err := w.Close(); err != nil {
		return nil, fmt.Errorf("encrypt: %w", err)
	}
	return e.buf.Bytes(), nil
}

// Decrypt returns the plaintext of an object whose walship-encryption
// metadata is scheme ("" is plaintext: src is returned as is). No
// identities is ErrNoIdentity; no
// matching identity is ErrWrongKey; an unknown scheme is
// ErrUnknownScheme; any other error means the object's bytes are damaged
// (age authenticates every 64 KiB chunk).
func Decrypt(scheme string, src []byte, ids []age.Identity) ([]byte, error) {
	switch scheme {
	case "":
		return src, nil
	case Scheme:
	default:
		return nil, fmt.Errorf("%w %q: a newer walship wrote it?", ErrUnknownScheme, scheme)
	}
	if len(ids) == 0 {
		return nil, ErrNoIdentity
	}
	r, err := age.Decrypt(bytes.NewReader(src), ids...)
	var nm *age.NoIdentityMatchError
	if errors.As(err, &nm) {
		return nil, ErrWrongKey
	}
	if err != nil {
		return nil, fmt.Errorf("decrypt: %w", err)
	}
	var out bytes.Buffer
	out.Grow(len(src) + bytes.MinRead) // the plaintext is a little shorter
	if _, err := io.Copy(&out, r); err != nil {
		return nil, fmt.Errorf("decrypt: %w", err)
	}
	return out.Bytes(), nil
}

// Encrypted reports whether a body begins like an age file, for callers
// that look at bytes without metadata (tests, operators).
func Encrypted(body []byte) bool {
	return bytes.HasPrefix(body, []byte("age-encryption.org/v1\n"))
}
