package main

import (
	"flag"
	"fmt"
	"os"
)

// s3Security is the TLS trust and the server-side encryption of the S3
// destination.
type s3Security struct {
	CABundle     string
	SSE          string
	SSEKMSKeyID  string
	StorageClass string
}

func addS3SecurityFlags(fs *flag.FlagSet, s *s3Security) {
	fs.StringVar(&s.CABundle, "s3-ca-bundle", "", "PEM file of the CA(s) that signed an HTTPS S3 endpoint's certificate (default: AWS_CA_BUNDLE, else the system's)")
	fs.StringVar(&s.SSE, "s3-sse", "", "server-side encryption on every PUT: AES256 or aws:kms (empty: the bucket's default)")
	fs.StringVar(&s.SSEKMSKeyID, "s3-sse-kms-key-id", "", "KMS key for --s3-sse aws:kms (empty: the account's aws/s3 key)")
	fs.StringVar(&s.StorageClass, "s3-storage-class", "", "storage class of every object, e.g. STANDARD_IA (empty: the bucket's default, STANDARD)")
}

// validate checks the flags before anything connects.
func (s *s3Security) validate() error {
	if s.CABundle != "" {
		if _, err := os.Stat(s.CABundle); err != nil {
			return fmt.Errorf("%w: --s3-ca-bundle %s: %v", errUsage, s.CABundle, fileReason(err))
		}
	}
	switch s.SSE {
	case "", "AES256", "aws:kms":
	default:
		return fmt.Errorf("%w: --s3-sse %q: use AES256 or aws:kms", errUsage, s.SSE)
	}
	if s.SSEKMSKeyID != "" && s.SSE != "aws:kms" {
		return fmt.Errorf("%w: --s3-sse-kms-key-id needs --s3-sse aws:kms", errUsage)
	}
	return nil
}
