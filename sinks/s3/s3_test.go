package s3

import (
	"encoding/base64"
	"encoding/binary"
	"hash/crc32"

	"context"
	"errors"
	"github.com/aws/aws-sdk-go-v2/aws"
	s3api "github.com/aws/aws-sdk-go-v2/service/s3"
	"github.com/aws/aws-sdk-go-v2/service/s3/types"
	"io"
	"strings"
	"testing"

	"github.com/walship/walship/internal/testenv"
	"github.com/walship/walship/sinks"
	"github.com/walship/walship/sinks/sinktest"
)

func TestConformance(t *testing.T) {
	gw := testenv.StartS3(t)
	gw.SetEnv(t)
	n := 0
	sinktest.Run(t, func(t *testing.T) sinks.Sink {
		s, err := New(context.Background(), Options{Bucket: gw.Bucket, Endpoint: gw.Endpoint(), PathStyle: true})
		if err != nil {
			t.Fatal(err)
		}
		n++
		return prefixed{s, strings.Repeat("x", n)}
	})
}

// prefixed gives each subtest its own key space in the shared bucket.
type prefixed struct {
	*Sink
	p string
}

func (p prefixed) Put(ctx context.Context, key string, body []byte, m sinks.Metadata) error {
	return p.Sink.Put(ctx, p.p+"/"+key, body, m)
}
func (p prefixed) Head(ctx context.Context, key string) (sinks.Metadata, error) {
	return p.Sink.Head(ctx, p.p+"/"+key)
}

func TestMissingBucket(t *testing.T) {
	gw := testenv.StartS3(t)
	gw.SetEnv(t)
	s, err := New(context.Background(), Options{Bucket: "nope", Endpoint: gw.Endpoint(), PathStyle: true})
	if err != nil {
		t.Fatal(err)
	}
	err = s.CheckBucket(context.Background())
	if !errors.Is(err, ErrNoBucket) {
		t.Fatalf("CheckBucket on a missing bucket: %v", err)
	}
}
func (p prefixed) Get(ctx context.Context, key string) (io.ReadCloser, sinks.Metadata, error) {
	return p.Sink.Get(ctx, p.p+"/"+key)
}

// The upload carries a CRC32C the server verified and kept, and
// put-if-absent holds without a signed payload hash.
func TestChecksumStored(t *testing.T) {
	gw := testenv.StartS3(t)
	gw.SetEnv(t)
	ctx := context.Background()
	s, err := New(ctx, Options{Bucket: gw.Bucket, Endpoint: gw.Endpoint(), PathStyle: true})
	if err != nil {
		t.Fatal(err)
	}
	body := []byte("sixteen megabytes of wal, give or take")
	if err := s.Put(ctx, "c/obj", body, sinks.Metadata{SHA256: "aa"}); err != nil {
		t.Fatal(err)
	}
	out, err := gw.Client().HeadObject(ctx, &s3api.HeadObjectInput{Bucket: aws.String(gw.Bucket), Key: aws.String("c/obj"),
		ChecksumMode: types.ChecksumModeEnabled})
	if err != nil {
		t.Fatal(err)
	}
	want := base64.StdEncoding.EncodeToString(binary.BigEndian.AppendUint32(nil, crc32.Checksum(body, crc32.MakeTable(crc32.Castagnoli))))
	if out.ChecksumCRC32C == nil || *out.ChecksumCRC32C != want {
		t.Errorf("stored CRC32C %v, want %s", out.ChecksumCRC32C, want)
	}
}
func (p prefixed) List(ctx context.Context, prefix string, fn func(sinks.Object) error) error {
	return p.Sink.List(ctx, p.p+"/"+prefix, func(o sinks.Object) error {
		o.Key = strings.TrimPrefix(o.Key, p.p+"/")
		return fn(o)
	})
}
