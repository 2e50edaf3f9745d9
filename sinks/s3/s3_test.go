package s3

import (
	"context"
	"errors"
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
