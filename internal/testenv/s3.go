package testenv

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/credentials"
	"github.com/aws/aws-sdk-go-v2/service/s3"
)

// S3 test credentials: versitygw's root user.
const (
	S3AccessKey = "walship-test-access"
	S3SecretKey = "walship-test-secret-not-for-production"
)

// S3 is a Versity S3 Gateway with the posix backend, on loopback.
type S3 struct {
	t      testing.TB
	Root   string // the posix backend's directory: buckets are subdirectories
	Port   int
	Bucket string
	cmd    *exec.Cmd
	bin    string
	flags  []string // extra gateway flags
	ca     *CA      // set: the gateway serves HTTPS with a certificate from ca
}

// VersityGW finds the versitygw binary: $WALSHIP_VERSITYGW, PATH, or
// $(go env GOPATH)/bin.
func VersityGW(t testing.TB) string {
	if p := os.Getenv("WALSHIP_VERSITYGW"); p != "" {
		return p
	}
	if p, err := exec.LookPath("versitygw"); err == nil {
		return p
	}
	gopath := os.Getenv("GOPATH")
	if gopath == "" {
		if out, err := exec.Command("go", "env", "GOPATH").Output(); err == nil {
			gopath = string(trimNL(out))
		}
	}
	p := filepath.Join(gopath, "bin", "versitygw")
	if _, err := os.Stat(p); err == nil {
		return p
	}
	t.Fatal("versitygw not found: run scripts/test.sh, or go install github.com/versity/versitygw/cmd/versitygw@v1.8.0")
	return ""
}

// StartS3 starts versitygw and creates one bucket.
func StartS3(t testing.TB) *S3 {
	t.Helper()
	return startS3(t, nil)
}

// StartS3TLS starts versitygw serving HTTPS (--cert, --key) with a
// certificate from ca for 127.0.0.1 and localhost, and creates one bucket.
func StartS3TLS(t testing.TB, ca *CA) *S3 {
	t.Helper()
	return startS3(t, ca)
}

func startS3(t testing.TB, ca *CA) *S3 {
	t.Helper()
	root, err := os.MkdirTemp("", "walship-s3-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(root) })
	s := &S3{t: t, Root: root, Port: FreePort(t), Bucket: "wal", bin: VersityGW(t), ca: ca}
	if ca != nil {
		cert, key := ca.Issue("s3-server", []string{"127.0.0.1", "localhost"}, false)
		s.flags = append(s.flags, "--cert", cert, "--key", key)
	}
	s.Start()
	t.Cleanup(s.Stop)
	if _, err := s.Client().CreateBucket(context.Background(), &s3.CreateBucketInput{Bucket: aws.String(s.Bucket)}); err != nil {
		t.Fatalf("create bucket: %v", err)
	}
	return s
}

// Endpoint is the gateway's URL.
func (s *S3) Endpoint() string {
	if s.ca != nil {
		return "https://127.0.0.1:" + strconv.Itoa(s.Port)
	}
	return "http://127.0.0.1:" + strconv.Itoa(s.Port)
}

// Env is the environment walship needs to reach the gateway.
func (s *S3) Env() []string {
	return []string{"AWS_ACCESS_KEY_ID=" + S3AccessKey, "AWS_SECRET_ACCESS_KEY=" + S3SecretKey, "AWS_REGION=us-east-1",
		"AWS_EC2_METADATA_DISABLED=true"}
}

// SetEnv sets that environment for in-process use.
func (s *S3) SetEnv(t testing.TB) {
	t.Setenv("AWS_ACCESS_KEY_ID", S3AccessKey)
	t.Setenv("AWS_SECRET_ACCESS_KEY", S3SecretKey)
	t.Setenv("AWS_REGION", "us-east-1")
	t.Setenv("AWS_EC2_METADATA_DISABLED", "true")
}

// Start starts (or restarts) the gateway and waits for its port.
func (s *S3) Start() {
	s.t.Helper()
	args := append([]string{"--access", S3AccessKey, "--secret", S3SecretKey,
		"--port", "127.0.0.1:" + strconv.Itoa(s.Port), "--quiet"}, s.flags...)
	cmd := exec.Command(s.bin, append(args, "posix", s.Root)...)
	log, _ := os.Create(filepath.Join(os.TempDir(), "walship-versitygw-"+strconv.Itoa(s.Port)+".log"))
	cmd.Stdout, cmd.Stderr = log, log
	if err := cmd.Start(); err != nil {
		s.t.Fatalf("start versitygw: %v", err)
	}
	s.cmd = cmd
	deadline := time.Now().Add(20 * time.Second)
	for time.Now().Before(deadline) {
		c, err := net.DialTimeout("tcp", "127.0.0.1:"+strconv.Itoa(s.Port), time.Second)
		if err == nil {
			c.Close()
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
	s.t.Fatal("versitygw did not start listening")
}

// Stop kills the gateway.
func (s *S3) Stop() {
	if s.cmd != nil {
		s.cmd.Process.Kill()
		s.cmd.Wait()
		s.cmd = nil
	}
}

// Client is an S3 client for the gateway.
func (s *S3) Client() *s3.Client {
	o := s3.Options{
		Region:       "us-east-1",
		BaseEndpoint: aws.String(s.Endpoint()),
		UsePathStyle: true,
		Credentials:  credentials.NewStaticCredentialsProvider(S3AccessKey, S3SecretKey, ""),
	}
	if s.ca != nil {
		pem, err := os.ReadFile(s.ca.CAPath)
		if err != nil {
			s.t.Fatal(err)
		}
		pool := x509.NewCertPool()
		pool.AppendCertsFromPEM(pem)
		o.HTTPClient = &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}}}
	}
	return s3.New(o)
}

func trimNL(b []byte) []byte {
	for len(b) > 0 && (b[len(b)-1] == '\n' || b[len(b)-1] == '\r') {
		b = b[:len(b)-1]
	}
	return b
}

func itoa(n int) string { return strconv.Itoa(n) }

// PID is the gateway's process id, for CPU accounting in benchmarks.
func (s *S3) PID() int {
	if s.cmd == nil {
		return 0
	}
	return s.cmd.Process.Pid
}

// ReadOnly starts a second gateway over the same directory that allows
// only reads: a bucket that denies writes.
func (s *S3) ReadOnly(t testing.TB) *S3 {
	ro := &S3{t: t, Root: s.Root, Port: FreePort(t), Bucket: s.Bucket, bin: s.bin, flags: []string{"--readonly"}}
	ro.Start()
	t.Cleanup(ro.Stop)
	return ro
}
