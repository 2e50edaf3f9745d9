// Package s3 is the sink that writes archived WAL to an S3 bucket or an
// S3-compatible server (s3://bucket/prefix). Credentials come from the AWS
// default chain. Each object is written with one PUT carrying
// If-None-Match: * and a CRC32C checksum, so the server both refuses to
// overwrite and verifies the body. Every request has a deadline
// (Options.Timeout) and the HTTP transport bounds connecting, the TLS
// handshake, the wait for response headers and each read of a body, so a
// server that accepts a connection and never answers cannot hang a caller.
package s3

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"syscall"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	v4 "github.com/aws/aws-sdk-go-v2/aws/signer/v4"
	awshttp "github.com/aws/aws-sdk-go-v2/aws/transport/http"
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
	// Timeout bounds each request, the transfer of its body included, and
	// the wait for response headers and for each read of a response body.
	// 0 means DefaultTimeout. Raise it for large segments on slow links.
	Timeout time.Duration
	// NoConditionalWrites is for stores that ignore If-None-Match (older
	// MinIO, some Ceph versions): Put checks with a HEAD that the key is
	// free before it writes. Two archivers racing for one key can then
	// both write it; walship's archivers only write identical bytes to a
	// key, but a conflict would go unnoticed.
	NoConditionalWrites bool
	// CABundle is a PEM file of CAs to trust for an HTTPS endpoint (a
	// private CA); empty: AWS_CA_BUNDLE or the shared config's
	// ca_bundle, else the system's roots.
	CABundle string
	// SSE is the server-side encryption asked for on every PUT: "",
	// "AES256" or "aws:kms" (with SSEKMSKeyID, or the bucket's default
	// key). StorageClass, when set, is sent on every PUT too.
	SSE          string
	SSEKMSKeyID  string
	StorageClass string
}

// DefaultTimeout is the per-request deadline when Options.Timeout is 0.
const DefaultTimeout = time.Minute

// Sink stores objects in one bucket.
type Sink struct {
	client        *s3.Client
	bucket        string
	unsigned      bool
	timeout       time.Duration
	noConditional bool
	putOpts       putOptions
}

// New builds an S3 sink. It does not contact the server.
func New(ctx context.Context, o Options) (*Sink, error) {
	if o.Bucket == "" {
		return nil, errors.New("s3 destination has no bucket: use s3://bucket/prefix")
	}
	timeout := o.Timeout
	if timeout <= 0 {
		timeout = DefaultTimeout
	}
	put, err := o.putOptions()
	if err != nil {
		return nil, err
	}
	var opts []func(*config.LoadOptions) error
	if o.Region != "" {
		opts = append(opts, config.WithRegion(o.Region))
	}
	if o.CABundle != "" {
		pem, err := os.ReadFile(o.CABundle)
		if err != nil {
			return nil, fmt.Errorf("--s3-ca-bundle: %w", err)
		}
		opts = append(opts, config.WithCustomCABundle(bytes.NewReader(pem)))
	}
	cfg, err := config.LoadDefaultConfig(ctx, opts...)
	if err != nil {
		return nil, explainConfigError(err)
	}
	if cfg.Region == "" {
		cfg.Region = "us-east-1"
	}
	// The client LoadDefaultConfig built holds the CA bundle, if any.
	base, ok := cfg.HTTPClient.(*awshttp.BuildableClient)
	if !ok {
		base = awshttp.NewBuildableClient()
	}
	httpClient := base.
		WithDialerOptions(func(d *net.Dialer) { d.Timeout = min(10*time.Second, timeout) }).
		WithTransportOptions(func(tr *http.Transport) {
			tr.TLSHandshakeTimeout = min(10*time.Second, timeout)
			tr.ResponseHeaderTimeout = timeout
		}).
		WithReadTimeout(timeout)
	client := s3.NewFromConfig(cfg, func(so *s3.Options) {
		if o.Endpoint != "" {
			so.BaseEndpoint = aws.String(o.Endpoint)
		}
		so.UsePathStyle = o.PathStyle
		so.RetryMaxAttempts = 3 // the archiver retries forever above this
		so.HTTPClient = httpClient
	})
	return &Sink{client: client, bucket: o.Bucket, unsigned: !o.SignPayload, timeout: timeout, noConditional: o.NoConditionalWrites, putOpts: put}, nil
}

// call bounds one request.
func (s *Sink) call(ctx context.Context) (context.Context, context.CancelFunc) {
	return context.WithTimeout(ctx, s.timeout)
}

// Put implements sinks.Sink.
func (s *Sink) Put(ctx context.Context, key string, body []byte, meta sinks.Metadata) error {
	if s.noConditional {
		_, err := s.Head(ctx, key)
		if err == nil {
			return fmt.Errorf("put s3://%s/%s: %w", s.bucket, key, sinks.ErrExists)
		}
		if !errors.Is(err, os.ErrNotExist) {
			return err
		}
	}
	return s.put(ctx, key, body, meta, !s.noConditional)
}

func (s *Sink) put(ctx context.Context, key string, body []byte, meta sinks.Metadata, conditional bool) error {
	ctx, cancel := s.call(ctx)
	defer cancel()
	in := &s3.PutObjectInput{
		Bucket:            aws.String(s.bucket),
		Key:               aws.String(key),
		Body:              bytes.NewReader(body),
		ContentLength:     aws.Int64(int64(len(body))),
		ChecksumAlgorithm: types.ChecksumAlgorithmCrc32c,
		Metadata:          meta.Map(),
		ContentType:       aws.String("application/octet-stream"),
	}
	if conditional {
		in.IfNoneMatch = aws.String("*")
	}
	s.putOpts.apply(in)
	_, err := s.client.PutObject(ctx, in, func(o *s3.Options) {
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

// ErrNoConditionalWrites is returned by ProbeConditionalWrites when the
// store overwrote an object although the PUT said If-None-Match: *.
var ErrNoConditionalWrites = errors.New("the store ignores If-None-Match: * and overwrites objects")

// ProbeConditionalWrites writes a small object at key twice with
// If-None-Match: * and requires the second write to be refused, then
// deletes it: a store that ignores the header would let an archive be
// overwritten silently. It returns nil at once with NoConditionalWrites
// (the operator accepted HEAD before PUT), and an error wrapping
// ErrNoConditionalWrites when the store overwrote the probe.
func (s *Sink) ProbeConditionalWrites(ctx context.Context, key string) error {
	if s.noConditional {
		return nil
	}
	body := []byte("walship conditional-write probe\n")
	meta := sinks.Metadata{Codec: "none", RawSize: int64(len(body))}
	err := s.put(ctx, key, body, meta, true)
	if errors.Is(err, sinks.ErrExists) {
		return nil // refused: honoured (a probe left behind)
	}
	if err != nil {
		return err
	}
	defer s.Delete(context.WithoutCancel(ctx), key)
	err = s.put(ctx, key, body, meta, true)
	switch {
	case errors.Is(err, sinks.ErrExists):
		return nil
	case err == nil:
		return fmt.Errorf("s3://%s/%s was written twice with If-None-Match: *: %w; an archive there could be overwritten silently: upgrade the store, or pass --s3-no-conditional-writes to check with a HEAD before each PUT",
			s.bucket, key, ErrNoConditionalWrites)
	}
	return err
}

// Head implements sinks.Sink.
func (s *Sink) Head(ctx context.Context, key string) (sinks.Metadata, error) {
	ctx, cancel := s.call(ctx)
	defer cancel()
	out, err := s.client.HeadObject(ctx, &s3.HeadObjectInput{Bucket: aws.String(s.bucket), Key: aws.String(key)})
	if err != nil {
		return sinks.Metadata{}, fmt.Errorf("head s3://%s/%s: %w", s.bucket, key, describe(err))
	}
	return sinks.MetadataFromMap(out.Metadata), nil
}

// Get implements sinks.Sink. The deadline covers reading the body; the
// caller's Close ends it.
func (s *Sink) Get(ctx context.Context, key string) (io.ReadCloser, sinks.Metadata, error) {
	ctx, cancel := s.call(ctx)
	out, err := s.client.GetObject(ctx, &s3.GetObjectInput{Bucket: aws.String(s.bucket), Key: aws.String(key)})
	if err != nil {
		cancel()
		return nil, sinks.Metadata{}, fmt.Errorf("get s3://%s/%s: %w", s.bucket, key, describe(err))
	}
	return cancelOnClose{out.Body, cancel}, sinks.MetadataFromMap(out.Metadata), nil
}

type cancelOnClose struct {
	io.ReadCloser
	cancel context.CancelFunc
}

func (c cancelOnClose) Close() error {
	err := c.ReadCloser.Close()
	c.cancel()
	return err
}

// Delete implements sinks.Deleter.
func (s *Sink) Delete(ctx context.Context, key string) error {
	ctx, cancel := s.call(ctx)
	defer cancel()
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
	ctx, cancel := s.call(ctx)
	defer cancel()
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

// Unavailable reports whether err means the store cannot be reached or
// cannot answer now — a refused, reset or timed-out connection, a name that
// does not resolve (a stopped container's name stops resolving), a 5xx
// other than 501, 408 or 429 answer — so that waiting and trying again may
// succeed. Everything else is taken for a misconfiguration that no retry
// fixes: no such bucket, access denied (403), a wrong region (301, 400), a
// feature the store lacks (501), a malformed endpoint, no credentials. The distinction decides whether a process starts and waits
// or exits with the error at start-up.
func Unavailable(err error) bool {
	if err == nil || errors.Is(err, ErrNoBucket) || errors.Is(err, ErrTLS) {
		return false
	}
	var re interface{ HTTPStatusCode() int }
	if errors.As(err, &re) && re.HTTPStatusCode() != 0 {
		code := re.HTTPStatusCode()
		return code >= 500 && code != http.StatusNotImplemented || code == http.StatusRequestTimeout || code == http.StatusTooManyRequests
	}
	var ae *net.AddrError
	if errors.As(err, &ae) {
		return false // an endpoint with a malformed address or port
	}
	var ne net.Error
	var oe *net.OpError
	var de *net.DNSError
	return errors.Is(err, context.DeadlineExceeded) || errors.As(err, &ne) && ne.Timeout() ||
		errors.As(err, &oe) || errors.As(err, &de) ||
		errors.Is(err, syscall.ECONNREFUSED) || errors.Is(err, syscall.ECONNRESET) ||
		errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF)
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
	if e := explainTLSError(err); e != nil {
		return e
	}
	return err
}

// List implements sinks.Lister. Some S3-compatible stores repeat a
// continuation token (or omit it on a truncated page); List then goes on
// after the last key it has, and stops with an error when that brings
// nothing new, instead of asking for the same page forever.
func (s *Sink) List(ctx context.Context, prefix string, fn func(sinks.Object) error) error {
	in := &s3.ListObjectsV2Input{Bucket: aws.String(s.bucket), Prefix: aws.String(prefix)}
	seen := map[string]bool{}
	last := ""
	for {
		cctx, cancel := s.call(ctx)
		page, err := s.client.ListObjectsV2(cctx, in)
		cancel()
		if err != nil {
			return fmt.Errorf("list s3://%s/%s: %w", s.bucket, prefix, describe(err))
		}
		progressed := false
		for _, o := range page.Contents {
			key := aws.ToString(o.Key)
			if key <= last {
				continue // listed already: keys come in order
			}
			progressed, last = true, key
			if err := fn(sinks.Object{Key: key, Size: aws.ToInt64(o.Size), Modified: aws.ToTime(o.LastModified)}); err != nil {
				return err
			}
		}
		if !aws.ToBool(page.IsTruncated) {
			return nil
		}
		token := aws.ToString(page.NextContinuationToken)
		if token != "" && !seen[token] {
			seen[token] = true
			in.ContinuationToken, in.StartAfter = aws.String(token), nil
			continue
		}
		if !progressed {
			return fmt.Errorf("list s3://%s/%s: the store repeats continuation token %q without new keys; the listing cannot be completed", s.bucket, prefix, token)
		}
		in.ContinuationToken, in.StartAfter = nil, aws.String(last)
	}
}
