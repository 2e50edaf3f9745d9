// Package s3 is the sink that writes archived WAL to an S3 bucket or an
// S3-compatible server (s3://bucket/prefix). Credentials come from the AWS
// default chain. Each object is written with one PUT carrying
// If-None-Match: * and a CRC32C checksum, so the server both refuses to
// overwrite and verifies the body.
package s3

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"

	"github.com/aws/aws-sdk-go-v2/aws"
	v4 "github.com/aws/aws-sdk-go-v2/aws/signer/v4"
	"github.com/aws/aws-sdk-go-v2/config"
	"github.com/aws/aws-sdk-go-v2/service/s3"
	"github.com/aws/aws-sdk-go-v2/service/s3/types"
	"github.com/aws/smithy-go"

	"github.com/walship/walship/sinks"
)

var _ sinks.Sink = (*Sink)(nil)
var _ sinks.Deleter = (*Sink)(nil)
var _ sinks.Lister = (*Sink)(nil)

// Options configure the S3 client.
type Options struct {
	Bucket    string
	Endpoint  string // custom endpoint URL for S3-compatible servers
	Region    string // defaults to the AWS chain's region, else us-east-1
	PathStyle bool   // path-style addressing, as most S3-compatible servers want
	// SignPayload makes every upload sign a SHA-256 of its body. By
	// default the body is sent as UNSIGNED-PAYLOAD: the signed CRC32C
	// checksum header already makes the server verify the body, and hashing
	// each segment a second time costs a quarter of the archiver's CPU.
	SignPayload bool
}

// Sink stores objects in one bucket.
type Sink struct {
	client   *s3.Client
	bucket   string
	unsigned bool
}

// New builds an S3 sink. It does not contact the server.
func New(ctx context.Context, o Options) (*Sink, error) {
	if o.Bucket == "" {
		return nil, errors.New("s3 destination has no bucket: use s3://bucket/prefix")
	}
	var opts []func(*config.LoadOptions) error
	if o.Region != "" {
		opts = append(opts, config.WithRegion(o.Region))
	}
	cfg, err := config.LoadDefaultConfig(ctx, opts...)
	if err != nil {
		return nil, fmt.Errorf("aws configuration: %w", err)
	}
	if cfg.Region == "" {
		cfg.Region = "us-east-1"
	}
	client := s3.NewFromConfig(cfg, func(so *s3.Options) {
		if o.Endpoint != "" {
			so.BaseEndpoint = aws.String(o.Endpoint)
		}
		so.UsePathStyle = o.PathStyle
		so.RetryMaxAttempts = 3 // the archiver retries forever above this
	})
	return &Sink{client: client, bucket: o.Bucket, unsigned: !o.SignPayload}, nil
}

// Put implements sinks.Sink.
func (s *Sink) Put(ctx context.Context, key string, body []byte, meta sinks.Metadata) error {
	_, err := s.client.PutObject(ctx, &s3.PutObjectInput{
		Bucket:            aws.String(s.bucket),
		Key:               aws.String(key),
		Body:              bytes.NewReader(body),
		ContentLength:     aws.Int64(int64(len(body))),
		IfNoneMatch:       aws.String("*"),
		ChecksumAlgorithm: types.ChecksumAlgorithmCrc32c,
		Metadata:          meta.Map(),
		ContentType:       aws.String("application/octet-stream"),
	}, func(o *s3.Options) {
		if s.unsigned {
			o.APIOptions = append(o.APIOptions, v4.SwapComputePayloadSHA256ForUnsignedPayloadMiddleware)
		}
	})
	if err != nil {
		if isStatus(err, http.StatusPreconditionFailed) {
			return fmt.Errorf("put s3://%s/%s: %w", s.bucket, key, sinks.ErrExists)
		}
		return fmt.Errorf("put s3://%s/%s: %w", s.bucket, key, describe(err))
	}
	return nil
}

// Head implements sinks.Sink.
func (s *Sink) Head(ctx context.Context, key string) (sinks.Metadata, error) {
	out, err := s.client.HeadObject(ctx, &s3.HeadObjectInput{Bucket: aws.String(s.bucket), Key: aws.String(key)})
	if err != nil {
		return sinks.Metadata{}, fmt.Errorf("head s3://%s/%s: %w", s.bucket, key, describe(err))
	}
	return sinks.MetadataFromMap(out.Metadata), nil
}

// Get implements sinks.Sink.
func (s *Sink) Get(ctx context.Context, key string) (io.ReadCloser, sinks.Metadata, error) {
	out, err := s.client.GetObject(ctx, &s3.GetObjectInput{Bucket: aws.String(s.bucket), Key: aws.String(key)})
	if err != nil {
		return nil, sinks.Metadata{}, fmt.Errorf("get s3://%s/%s: %w", s.bucket, key, describe(err))
	}
	return out.Body, sinks.MetadataFromMap(out.Metadata), nil
}

// Delete implements sinks.Deleter.
func (s *Sink) Delete(ctx context.Context, key string) error {
	_, err := s.client.DeleteObject(ctx, &s3.DeleteObjectInput{Bucket: aws.String(s.bucket), Key: aws.String(key)})
	if err != nil {
		return fmt.Errorf("delete s3://%s/%s: %w", s.bucket, key, describe(err))
	}
	return nil
}

// ErrNoBucket is returned when the bucket does not exist.
var ErrNoBucket = errors.New("bucket does not exist")

// CheckBucket confirms the bucket exists and the credentials reach it.
func (s *Sink) CheckBucket(ctx context.Context) error {
	_, err := s.client.HeadBucket(ctx, &s3.HeadBucketInput{Bucket: aws.String(s.bucket)})
	if err != nil {
		if isStatus(err, http.StatusNotFound) {
			return fmt.Errorf("s3 bucket %q: %w: create it or fix --dest", s.bucket, ErrNoBucket)
		}
		if isStatus(err, http.StatusForbidden) {
			return fmt.Errorf("s3 bucket %q: access denied: check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY and the bucket policy", s.bucket)
		}
		return fmt.Errorf("s3 bucket %q: %w", s.bucket, describe(err))
	}
	return nil
}

func isStatus(err error, code int) bool {
	var re interface{ HTTPStatusCode() int }
	return errors.As(err, &re) && re.HTTPStatusCode() == code
}

// describe maps not-found answers to os.ErrNotExist and keeps the server's
// error code; it never includes request signatures or credentials.
func describe(err error) error {
	var nk *types.NoSuchKey
	var nf *types.NotFound
	if errors.As(err, &nk) || errors.As(err, &nf) || isStatus(err, http.StatusNotFound) {
		var ae smithy.APIError
		if errors.As(err, &ae) && ae.ErrorCode() == "NoSuchBucket" {
			return fmt.Errorf("%w: create the bucket or fix --dest", ErrNoBucket)
		}
		return fmt.Errorf("%w", os.ErrNotExist)
	}
	return err
}

// List implements sinks.Lister.
func (s *Sink) List(ctx context.Context, prefix string, fn func(sinks.Object) error) error {
	p := s3.NewListObjectsV2Paginator(s.client, &s3.ListObjectsV2Input{Bucket: aws.String(s.bucket), Prefix: aws.String(prefix)})
	for p.HasMorePages() {
		page, err := p.NextPage(ctx)
		if err != nil {
			return fmt.Errorf("list s3://%s/%s: %w", s.bucket, prefix, describe(err))
		}
		for _, o := range page.Contents {
			if err := fn(sinks.Object{Key: aws.ToString(o.Key), Size: aws.ToInt64(o.Size)}); err != nil {
				return err
			}
		}
	}
	return nil
}
