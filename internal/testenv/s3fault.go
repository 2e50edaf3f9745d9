package testenv

import (
	"bytes"
	"context"
	"io"
	"net"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/s3"
)

// FaultyS3 is a proxy on loopback in front of a real S3 server that adds
// the misbehaviour of some S3-compatible stores, one switch each. With
// every switch off it forwards requests unchanged (signatures stay valid:
// the Host header is kept).
type FaultyS3 struct {
	backend *S3
	ln      net.Listener
	srv     *http.Server
	client  *http.Client

	// IgnoreIfNoneMatch overwrites objects although the PUT says
	// If-None-Match: * (older MinIO, some Ceph versions).
	IgnoreIfNoneMatch atomic.Bool
	// RepeatListToken answers every ListObjectsV2 as truncated with the
	// same continuation token, and that token with the first page again.
	RepeatListToken atomic.Bool
	// VanishGets answers the next n GETs of an object whose path contains
	// VanishMatch 404 NoSuchKey while HEAD still finds it (a retention
	// job, a lagging replica). Set VanishMatch first.
	VanishGets  atomic.Int32
	VanishMatch string
	// Fail answers every request 503 SlowDown.
	Fail atomic.Bool

	// Requests counts requests by method.
	mu       sync.Mutex
	requests map[string]int
	listPage []byte
}

// StartFaultyS3 starts a proxy in front of backend.
func StartFaultyS3(t testing.TB, backend *S3) *FaultyS3 {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	f := &FaultyS3{backend: backend, ln: ln, requests: map[string]int{},
		client: &http.Client{Transport: &http.Transport{DisableCompression: true}}}
	f.srv = &http.Server{Handler: f}
	go f.srv.Serve(ln)
	t.Cleanup(func() { f.srv.Close() })
	return f
}

// Endpoint is the proxy's URL, for --s3-endpoint.
func (f *FaultyS3) Endpoint() string { return "http://" + f.ln.Addr().String() }

// Requests reports how many requests with method the proxy received.
func (f *FaultyS3) Requests(method string) int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.requests[method]
}

func (f *FaultyS3) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	f.mu.Lock()
	f.requests[r.Method]++
	f.mu.Unlock()
	body, _ := io.ReadAll(r.Body)
	q := r.URL.Query()
	isObject := strings.Count(strings.Trim(r.URL.Path, "/"), "/") >= 1
	switch {
	case f.Fail.Load():
		s3Error(w, http.StatusServiceUnavailable, "SlowDown", "Please reduce your request rate.")
		return
	case r.Method == http.MethodGet && isObject && strings.Contains(r.URL.Path, f.VanishMatch) && f.VanishGets.Load() > 0:
		f.VanishGets.Add(-1)
		s3Error(w, http.StatusNotFound, "NoSuchKey", "The specified key does not exist.")
		return
	case r.Method == http.MethodGet && q.Get("list-type") == "2" && f.RepeatListToken.Load():
		f.mu.Lock()
		page := f.listPage
		f.mu.Unlock()
		if q.Get("continuation-token") == "walship-loop" && page != nil {
			w.Header().Set("Content-Type", "application/xml")
			w.Write(page)
			return
		}
		resp, data, err := f.forward(r, body)
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadGateway)
			return
		}
		data = bytes.Replace(data, []byte("<IsTruncated>false</IsTruncated>"),
			[]byte("<IsTruncated>true</IsTruncated><NextContinuationToken>walship-loop</NextContinuationToken>"), 1)
		f.mu.Lock()
		f.listPage = data
		f.mu.Unlock()
		resp.Header.Del("Content-Length")
		copyResponse(w, resp, data)
		return
	}
	resp, data, err := f.forward(r, body)
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadGateway)
		return
	}
	if r.Method == http.MethodPut && resp.StatusCode == http.StatusPreconditionFailed && f.IgnoreIfNoneMatch.Load() {
		// Overwrite: remove the object and send the same signed request again.
		bucket, key, _ := strings.Cut(strings.TrimPrefix(r.URL.Path, "/"), "/")
		key, _ = url.PathUnescape(key)
		f.backend.Client().DeleteObject(context.Background(), &s3.DeleteObjectInput{Bucket: aws.String(bucket), Key: aws.String(key)})
		if resp, data, err = f.forward(r, body); err != nil {
			http.Error(w, err.Error(), http.StatusBadGateway)
			return
		}
	}
	copyResponse(w, resp, data)
}

func (f *FaultyS3) forward(r *http.Request, body []byte) (*http.Response, []byte, error) {
	req, err := http.NewRequestWithContext(r.Context(), r.Method, f.backend.Endpoint()+r.URL.RequestURI(), bytes.NewReader(body))
	if err != nil {
		return nil, nil, err
	}
	req.Header = r.Header.Clone()
	req.Host = r.Host
	req.ContentLength = int64(len(body))
	resp, err := f.client.Do(req)
	if err != nil {
		return nil, nil, err
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(resp.Body)
	return resp, data, err
}

func copyResponse(w http.ResponseWriter, resp *http.Response, data []byte) {
	for k, v := range resp.Header {
		w.Header()[k] = v
	}
	w.WriteHeader(resp.StatusCode)
	w.Write(data)
}

func s3Error(w http.ResponseWriter, status int, code, msg string) {
	w.Header().Set("Content-Type", "application/xml")
	w.WriteHeader(status)
	io.WriteString(w, `<?xml version="1.0" encoding="UTF-8"?><Error><Code>`+code+`</Code><Message>`+msg+`</Message></Error>`)
}

// BlackHole listens on loopback, accepts connections and never answers:
// the endpoint that proves timeouts. It returns the URL.
func BlackHole(t testing.TB) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	var conns []net.Conn
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			conns = append(conns, c)
			mu.Unlock()
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		mu.Lock()
		defer mu.Unlock()
		for _, c := range conns {
			c.Close()
		}
	})
	return "http://" + ln.Addr().String()
}
