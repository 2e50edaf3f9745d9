package main

import (
	"flag"
	"fmt"
	"strings"

	"filippo.io/age"

	"github.com/walship/walship/crypt"
)

// cryptConfig holds the client-side encryption settings: recipients for
// the archivers (run, archive, check), an identity file for restore
// (fetch, verify, ls).
type cryptConfig struct {
	EncryptRecipients     recipientList
	EncryptRecipientsFile string
	DecryptIdentity       string
}

// recipientList is a repeatable flag. One value may also hold several
// recipients separated by commas or white space, which is how
// WALSHIP_ENCRYPT_RECIPIENT gives more than one (age public keys hold
// neither).
type recipientList []string

func (l *recipientList) String() string { return strings.Join(*l, ",") }

func (l *recipientList) Set(v string) error {
	for _, r := range strings.FieldsFunc(v, func(r rune) bool { return r == ',' || r == ' ' || r == '\t' || r == '\n' }) {
		*l = append(*l, r)
	}
	return nil
}

// addEncryptFlags registers the archivers' encryption flags.
func addEncryptFlags(fs *flag.FlagSet, c *cryptConfig) {
	fs.Var(&c.EncryptRecipients, "encrypt-recipient", "encrypt archived WAL after compression for this age public key (age1...); repeatable")
	fs.StringVar(&c.EncryptRecipientsFile, "encrypt-recipients-file", "", "file of age public keys, one per line (# comments), to encrypt archived WAL for")
}

// addDecryptFlag registers restore's identity flag.
func addDecryptFlag(fs *flag.FlagSet, c *cryptConfig) {
	fs.StringVar(&c.DecryptIdentity, "decrypt-identity", "", "age identity file (AGE-SECRET-KEY-1... per line; keep old keys after a rotation) to decrypt encrypted WAL")
}

// recipients parses the encryption flags: nil when encryption is off.
func (c *cryptConfig) recipients() ([]age.Recipient, error) {
	rs, err := crypt.ParseRecipients(c.EncryptRecipients, c.EncryptRecipientsFile)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", errUsage, err)
	}
	return rs, nil
}

// identities reads --decrypt-identity: nil when none is given.
func (c *cryptConfig) identities() ([]age.Identity, error) {
	ids, err := crypt.LoadIdentities(c.DecryptIdentity)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", errUsage, err)
	}
	return ids, nil
}

// checkEncryption is check's line for the encryption flags, when given.
func checkEncryption(c *config, add func(string, error, string)) {
	if len(c.EncryptRecipients) == 0 && c.EncryptRecipientsFile == "" {
		return
	}
	rs, err := crypt.ParseRecipients(c.EncryptRecipients, c.EncryptRecipientsFile)
	add("encryption", err, fmt.Sprintf("%d age recipient(s): archived WAL is encrypted after compression", len(rs)))
}
