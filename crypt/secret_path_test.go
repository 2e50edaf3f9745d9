package crypt

import (
	"strings"
	"testing"
)

// Found by review: an operator who sets WALSHIP_DECRYPT_IDENTITY (or
// --decrypt-identity) to the key itself rather than to a file — as SOPS_AGE_KEY
// and similar variables take it — gets an error that prints the secret key:
// os.Open's *PathError names the "path". fetch writes it to stderr, which
// PostgreSQL copies into its server log for restore_command.
func TestKeyGivenAsPathIsNotShown(t *testing.T) {
	secret := genID(t).String()
	_, err := LoadIdentities(secret)
	if err == nil {
		t.Fatal("a key given as a path was accepted")
	}
	if strings.Contains(err.Error(), secret) || strings.Contains(err.Error(), secret[15:40]) {
		t.Errorf("error shows the secret key: %v", err)
	}
	// Same for a recipients "file" that is a private key pasted in place
	// of the path.
	_, err = ParseRecipients(nil, secret)
	if err == nil || strings.Contains(err.Error(), secret[15:40]) {
		t.Errorf("recipients file given as a key: error shows the secret key: %v", err)
	}
}
