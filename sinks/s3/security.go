package s3

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"strings"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/s3"
	"github.com/aws/aws-sdk-go-v2/service/s3/types"
)

// putOptions are the headers every PUT carries besides the object's own.
type putOptions struct {
	sse          types.ServerSideEncryption
	kmsKeyID     string
	storageClass types.StorageClass
}

// putOptions validates the server-side encryption and storage class.
func (o Options) putOptions() (putOptions, error) {
	var p putOptions
	switch o.SSE {
	case "":
		if o.SSEKMSKeyID != "" {
			return p, errors.New("--s3-sse-kms-key-id needs --s3-sse aws:kms")
		}
	case string(types.ServerSideEncryptionAes256):
		if o.SSEKMSKeyID != "" {
			return p, errors.New("--s3-sse-kms-key-id needs --s3-sse aws:kms, not AES256")
		}
		p.sse = types.ServerSideEncryptionAes256
	case string(types.ServerSideEncryptionAwsKms):
		p.sse, p.kmsKeyID = types.ServerSideEncryptionAwsKms, o.SSEKMSKeyID
	default:
		return p, fmt.Errorf("--s3-sse %q: use AES256 or aws:kms", o.SSE)
	}
	if o.StorageClass != "" {
		known := types.StorageClass("").Values()
		for _, c := range known {
			if string(c) == o.StorageClass {
				p.storageClass = c
				return p, nil
			}
		}
		names := make([]string, len(known))
		for i, c := range known {
			names[i] = string(c)
		}
		return p, fmt.Errorf("--s3-storage-class %q: use one of %s", o.StorageClass, strings.Join(names, ", "))
	}
	return p, nil
}

func (p putOptions) apply(in *s3.PutObjectInput) {
	in.ServerSideEncryption = p.sse
	if p.kmsKeyID != "" {
		in.SSEKMSKeyId = aws.String(p.kmsKeyID)
	}
	in.StorageClass = p.storageClass
}

// ErrTLS marks an endpoint whose certificate walship does not trust: a
// misconfiguration that no retry fixes.
var ErrTLS = errors.New("TLS")

// explainTLSError says which setting to fix when the endpoint's
// certificate is not trusted, or returns nil.
func explainTLSError(err error) error {
	var (
		unknown  x509.UnknownAuthorityError
		hostname x509.HostnameError
		verify   *tls.CertificateVerificationError
	)
	switch {
	case errors.As(err, &hostname):
		return fmt.Errorf("%w: the S3 endpoint's certificate is not valid for this host (%v): use a host name in --s3-endpoint that the certificate names", ErrTLS, hostname.Error())
	case errors.As(err, &unknown):
		return fmt.Errorf("%w: the S3 endpoint's certificate is signed by an authority walship does not trust: give that CA's certificate with --s3-ca-bundle or AWS_CA_BUNDLE", ErrTLS)
	case errors.As(err, &verify):
		return fmt.Errorf("%w: cannot verify the S3 endpoint's certificate (%v): check --s3-ca-bundle or AWS_CA_BUNDLE", ErrTLS, verify.Err)
	}
	return nil
}

// explainConfigError names the CA bundle when it is what the AWS
// configuration could not load.
func explainConfigError(err error) error {
	if strings.Contains(err.Error(), "CA bundle") || strings.Contains(err.Error(), "custom CA") {
		return fmt.Errorf("the S3 CA bundle (--s3-ca-bundle or AWS_CA_BUNDLE) is not a PEM certificate file: %w", err)
	}
	return fmt.Errorf("aws configuration: %w", err)
}
