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
	"time"

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
func (p prefixed) Delete(ctx context.Context, key string) error {
	return p.Sink.Delete(ctx, p.p+"/"+key)
}
func (p prefixed) List(ctx context.Context, prefix string, fn func(sinks.Object) error) error {
	return p.Sink.List(ctx, p.p+"/"+prefix, func(o sinks.Object) error {
		o.Key = strings.TrimPrefix(o.Key, p.p+"/")
		return fn(o)
	})
}

// A server that accepts connections and never answers cannot hang a
// caller: every request ends within Options.Timeout.
func TestTimeouts(t *testing.T) {
	gw := testenv.StartS3(t)
	gw.SetEnv(t)
	s, err := New(context.Background(), Options{Bucket: "wal", Endpoint: testenv.BlackHole(t), PathStyle: true, Timeout: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	for name, call := range map[string]func() error{
		"head":   func() error { _, err := s.Head(ctx, "k"); return err },
		"get":    func() error { _, _, err := s.Get(ctx, "k"); return err },
		"put":    func() error { return s.Put(ctx, "k", []byte("x"), sinks.Metadata{}) },
		"list":   func() error { return s.List(ctx, "", func(sinks.Object) error { return nil }) },
		"bucket": func() error { return s.CheckBucket(ctx) },
	} {
		began := time.Now()
		done := make(chan error, 1)
		go func() { done <- call() }()
		select {
		case err := <-done:
			if err == nil {
				t.Errorf("%s against a server that never answers succeeded", name)
			}
			if took := time.Since(began); took > 5*time.Second {
				t.Errorf("%s took %s with a 1s timeout", name, took)
			}
		case <-time.After(20 * time.Second):
			t.Fatalf("%s still hangs after 20s with a 1s timeout", name)
		}
	}
}

// A store that ignores If-None-Match is detected by the probe, and
// NoConditionalWrites keeps archived objects from being overwritten there.
func TestConditionalWrites(t *testing.T) {
	gw := testenv.StartS3(t)
	gw.SetEnv(t)
	ctx := context.Background()
	open := func(endpoint string, noCond bool) *Sink {
		s, err := New(ctx, Options{Bucket: gw.Bucket, Endpoint: endpoint, PathStyle: true, NoConditionalWrites: noCond})
		if err != nil {
			t.Fatal(err)
		}
		return s
	}
	if err := open(gw.Endpoint(), false).ProbeConditionalWrites(ctx, "probe/a"); err != nil {
		t.Fatalf("probe against versitygw, which honours If-None-Match: %v", err)
	}
	proxy := testenv.StartFaultyS3(t, gw)
	proxy.IgnoreIfNoneMatch.Store(true)
	lax := open(proxy.Endpoint(), false)
	if err := lax.ProbeConditionalWrites(ctx, "probe/b"); !errors.Is(err, ErrNoConditionalWrites) {
		t.Fatalf("probe against a store that ignores If-None-Match: %v, want ErrNoConditionalWrites", err)
	}
	if _, err := gw.Client().HeadObject(ctx, &s3api.HeadObjectInput{Bucket: aws.String(gw.Bucket), Key: aws.String("probe/b")}); err == nil {
		t.Error("the probe object was left behind")
	}
	// The danger, shown: a plain put-if-absent overwrites there.
	if err := lax.Put(ctx, "seg/1", []byte("first"), sinks.Metadata{SHA256: "1"}); err != nil {
		t.Fatal(err)
	}
	if err := lax.Put(ctx, "seg/1", []byte("second"), sinks.Metadata{SHA256: "2"}); err != nil {
		t.Fatalf("the faulty store refused the overwrite (%v): the test proves nothing", err)
	}
	// HEAD before PUT refuses it.
	careful := open(proxy.Endpoint(), true)
	if err := careful.ProbeConditionalWrites(ctx, "probe/c"); err != nil {
		t.Errorf("probe with NoConditionalWrites: %v, want nil (the operator accepted HEAD before PUT)", err)
	}
	if err := careful.Put(ctx, "seg/2", []byte("first"), sinks.Metadata{SHA256: "1"}); err != nil {
		t.Fatal(err)
	}
	if err := careful.Put(ctx, "seg/2", []byte("second"), sinks.Metadata{SHA256: "2"}); !errors.Is(err, sinks.ErrExists) {
		t.Errorf("second put with NoConditionalWrites: %v, want ErrExists", err)
	}
	rc, meta, err := careful.Get(ctx, "seg/2")
	if err != nil {
		t.Fatal(err)
	}
	got, _ := io.ReadAll(rc)
	rc.Close()
	if string(got) != "first" || meta.SHA256 != "1" {
		t.Errorf("object holds %q (sha %s), want the first write", got, meta.SHA256)
	}
}

// A store that repeats its continuation token does not make List loop.
func TestListRepeatedToken(t *testing.T) {
	gw := testenv.StartS3(t)
	gw.SetEnv(t)
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	proxy := testenv.StartFaultyS3(t, gw)
	s, err := New(ctx, Options{Bucket: gw.Bucket, Endpoint: proxy.Endpoint(), PathStyle: true})
	if err != nil {
		t.Fatal(err)
	}
	for _, k := range []string{"l/a", "l/b", "l/c"} {
		if err := s.Put(ctx, k, []byte(k), sinks.Metadata{}); err != nil {
			t.Fatal(err)
		}
	}
	proxy.RepeatListToken.Store(true)
	var keys []string
	err = s.List(ctx, "l/", func(o sinks.Object) error { keys = append(keys, o.Key); return nil })
	if ctx.Err() != nil {
		t.Fatalf("List was still paging after 15s (%d requests)", proxy.Requests("GET"))
	}
	if strings.Join(keys, ",") != "l/a,l/b,l/c" {
		t.Errorf("listed %v, want each key once", keys)
	}
	if err == nil || !strings.Contains(err.Error(), "repeats continuation token") {
		t.Errorf("List: %v, want an error naming the repeated token", err)
	}
	if n := proxy.Requests("GET"); n > 5 {
		t.Errorf("%d list requests for one page", n)
	}
}
