package testenv

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// NATSServerBin finds the nats-server binary: $WALSHIP_NATS_SERVER, PATH,
// or $(go env GOPATH)/bin (where scripts/deps.sh installs the version in
// go.mod).
func NATSServerBin(t testing.TB) string {
	if p := os.Getenv("WALSHIP_NATS_SERVER"); p != "" {
		return p
	}
	if p, err := exec.LookPath("nats-server"); err == nil {
		return p
	}
	gopath := os.Getenv("GOPATH")
	if gopath == "" {
		if out, err := exec.Command("go", "env", "GOPATH").Output(); err == nil {
			gopath = string(trimNL(out))
		}
	}
	p := filepath.Join(gopath, "bin", "nats-server")
	if _, err := os.Stat(p); err == nil {
		return p
	}
	t.Fatal("nats-server not found: run scripts/test.sh, or go install github.com/nats-io/nats-server/v2@<version in go.mod>")
	return ""
}

// NATSProc is one nats-server process with JetStream on its own file
// store. Kill and Start simulate a crash and a restart on the same store
// and ports.
type NATSProc struct {
	t           testing.TB
	Name        string // server_name, as JetStream reports leaders
	Port        int    // client port
	ClusterPort int    // route port (0 for a single node)
	MonitorPort int    // HTTP monitoring: /healthz, /jsz
	StoreDir    string
	LogPath     string
	bin, conf   string

	mu   sync.Mutex
	cmd  *exec.Cmd
	done chan struct{}
}

// URL is the node's client URL.
func (p *NATSProc) URL() string { return "nats://127.0.0.1:" + strconv.Itoa(p.Port) }

// Start starts (or restarts) the process on its store and waits until it
// accepts client connections. In a cluster that is before JetStream is
// usable: see NATSCluster.WaitHealthy.
func (p *NATSProc) Start() {
	p.t.Helper()
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.cmd != nil {
		p.t.Fatalf("nats-server %s already running", p.Name)
	}
	cmd := exec.Command(p.bin, "-c", p.conf)
	log, err := os.OpenFile(p.LogPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		p.t.Fatal(err)
	}
	cmd.Stdout, cmd.Stderr = log, log
	if err := cmd.Start(); err != nil {
		log.Close()
		p.t.Fatalf("start nats-server %s: %v", p.Name, err)
	}
	done := make(chan struct{})
	go func() { cmd.Wait(); log.Close(); close(done) }()
	p.cmd, p.done = cmd, done
	deadline := time.Now().Add(20 * time.Second)
	for time.Now().Before(deadline) {
		select {
		case <-done:
			p.cmd = nil
			p.t.Fatalf("nats-server %s exited at start; log %s:\n%s", p.Name, p.LogPath, tail(p.LogPath, 4000))
		default:
		}
		if natsAnswers(p.Port) {
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
	p.t.Fatalf("nats-server %s did not accept connections within 20s", p.Name)
}

// natsAnswers reports whether a NATS server on port sends its INFO line.
func natsAnswers(port int) bool {
	c, err := net.DialTimeout("tcp", "127.0.0.1:"+strconv.Itoa(port), time.Second)
	if err != nil {
		return false
	}
	defer c.Close()
	c.SetReadDeadline(time.Now().Add(time.Second))
	line, err := bufio.NewReader(c).ReadString('\n')
	return err == nil && strings.HasPrefix(line, "INFO ")
}

// Kill sends SIGKILL and waits for the process to end: a crash, with
// whatever the store had not fsynced.
func (p *NATSProc) Kill() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.cmd == nil {
		return
	}
	p.cmd.Process.Kill()
	<-p.done
	p.cmd = nil
}

// Running reports whether the process is up.
func (p *NATSProc) Running() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.cmd == nil {
		return false
	}
	select {
	case <-p.done:
		return false
	default:
		return true
	}
}

// PID is the process id (0 when not running).
func (p *NATSProc) PID() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.cmd == nil {
		return 0
	}
	return p.cmd.Process.Pid
}

// Healthy asks the node's /healthz: JetStream enabled, the node's view of
// the cluster current, its streams and consumers caught up.
func (p *NATSProc) Healthy() error {
	c := http.Client{Timeout: 2 * time.Second}
	resp, err := c.Get("http://127.0.0.1:" + strconv.Itoa(p.MonitorPort) + "/healthz")
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		var b strings.Builder
		bufio.NewReader(resp.Body).WriteTo(&b)
		return fmt.Errorf("%s /healthz: %s %s", p.Name, resp.Status, strings.TrimSpace(b.String()))
	}
	return nil
}

// NATSCluster is one or more nats-server processes on loopback, clustered
// (routes between every pair) when there are several.
type NATSCluster struct {
	t     testing.TB
	Nodes []*NATSProc

	extra string // appended to every node's configuration

	connMu sync.Mutex
	nc     *nats.Conn
}

// StartNATSCluster starts n nats-server processes with JetStream (file
// store in temp directories) and, for n > 1, a cluster named
// "walship-test" over loopback routes. It waits until every node is
// healthy: a JetStream meta leader is elected and every node is current.
func StartNATSCluster(t testing.TB, n int) *NATSCluster {
	t.Helper()
	return startNATSCluster(t, n, "", nil)
}

// StartNATSProcWith starts one nats-server whose configuration is the
// default one followed by extra; files (name: content) are written into
// its directory first, for extra to include them.
func StartNATSProcWith(t testing.TB, extra string, files map[string]string) *NATSCluster {
	t.Helper()
	return startNATSCluster(t, 1, extra, files)
}

func startNATSCluster(t testing.TB, n int, extra string, files map[string]string) *NATSCluster {
	t.Helper()
	if n < 1 {
		t.Fatal("StartNATSCluster: n < 1")
	}
	bin := NATSServerBin(t)
	root, err := os.MkdirTemp("", "walship-natsc-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(root) })
	c := &NATSCluster{t: t, extra: extra}
	for i := range n {
		dir := filepath.Join(root, "n"+strconv.Itoa(i+1))
		if err := os.MkdirAll(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		p := &NATSProc{t: t, Name: "n" + strconv.Itoa(i+1), Port: FreePort(t), MonitorPort: FreePort(t),
			StoreDir: filepath.Join(dir, "store"), LogPath: filepath.Join(dir, "nats.log"), conf: filepath.Join(dir, "nats.conf"), bin: bin}
		if n > 1 {
			p.ClusterPort = FreePort(t)
		}
		c.Nodes = append(c.Nodes, p)
	}
	for _, p := range c.Nodes {
		if err := os.WriteFile(p.conf, []byte(c.config(p)), 0o644); err != nil {
			t.Fatal(err)
		}
		for name, content := range files {
			if err := os.WriteFile(filepath.Join(filepath.Dir(p.conf), name), []byte(content), 0o644); err != nil {
				t.Fatal(err)
			}
		}
	}
	t.Cleanup(func() {
		c.connMu.Lock()
		if c.nc != nil {
			c.nc.Close()
		}
		c.connMu.Unlock()
		for _, p := range c.Nodes {
			p.Kill()
		}
		if t.Failed() {
			for _, p := range c.Nodes {
				t.Logf("nats-server %s log (tail):\n%s", p.Name, tail(p.LogPath, 3000))
			}
		}
	})
	for _, p := range c.Nodes {
		p.Start()
	}
	if err := c.WaitHealthy(60 * time.Second); err != nil {
		t.Fatal(err)
	}
	return c
}

// StartNATSProc starts a single nats-server process (a cluster of one).
func StartNATSProc(t testing.TB) *NATSCluster { return StartNATSCluster(t, 1) }

func (c *NATSCluster) config(p *NATSProc) string {
	var b strings.Builder
	fmt.Fprintf(&b, "server_name: %q\nlisten: \"127.0.0.1:%d\"\nhttp: \"127.0.0.1:%d\"\nmax_payload: 8MB\n", p.Name, p.Port, p.MonitorPort)
	fmt.Fprintf(&b, "jetstream {\n  store_dir: %q\n}\n", p.StoreDir)
	if p.ClusterPort != 0 {
		var routes []string
		for _, o := range c.Nodes {
			if o != p {
				routes = append(routes, strconv.Quote("nats-route://127.0.0.1:"+strconv.Itoa(o.ClusterPort)))
			}
		}
		fmt.Fprintf(&b, "cluster {\n  name: \"walship-test\"\n  listen: \"127.0.0.1:%d\"\n  routes: [%s]\n}\n",
			p.ClusterPort, strings.Join(routes, ", "))
	}
	b.WriteString(c.extra)
	return b.String()
}

// URLs is every node's client URL, comma-separated, as nats.Connect and
// walship's --nats take them.
func (c *NATSCluster) URLs() string {
	var u []string
	for _, p := range c.Nodes {
		u = append(u, p.URL())
	}
	return strings.Join(u, ",")
}

// Node returns the node with the given server name, or nil.
func (c *NATSCluster) Node(name string) *NATSProc {
	for _, p := range c.Nodes {
		if p.Name == name {
			return p
		}
	}
	return nil
}

// WaitHealthy waits until every running node answers /healthz with OK.
func (c *NATSCluster) WaitHealthy(timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	var err error
	for time.Now().Before(deadline) {
		err = nil
		for _, p := range c.Nodes {
			if p.Running() {
				if err = p.Healthy(); err != nil {
					break
				}
			}
		}
		if err == nil {
			return nil
		}
		time.Sleep(100 * time.Millisecond)
	}
	return fmt.Errorf("nats cluster not healthy after %s: %v", timeout, err)
}

// conn is a client connection to the running nodes, kept for API queries.
func (c *NATSCluster) conn() (*nats.Conn, error) {
	c.connMu.Lock()
	defer c.connMu.Unlock()
	if c.nc != nil && !c.nc.IsClosed() {
		return c.nc, nil
	}
	nc, err := nats.Connect(c.URLs(), nats.Name("walship-testenv"), nats.Timeout(2*time.Second),
		nats.MaxReconnects(-1), nats.ReconnectWait(100*time.Millisecond), nats.RetryOnFailedConnect(false))
	if err != nil {
		return nil, err
	}
	c.nc = nc
	return nc, nil
}

// StreamInfo asks JetStream for a stream's info (answered by its leader).
func (c *NATSCluster) StreamInfo(ctx context.Context, stream string) (*jetstream.StreamInfo, error) {
	nc, err := c.conn()
	if err != nil {
		return nil, err
	}
	js, err := jetstream.New(nc)
	if err != nil {
		return nil, err
	}
	s, err := js.Stream(ctx, stream)
	if err != nil {
		return nil, err
	}
	return s.CachedInfo(), nil
}

// ErrNoLeader is returned by StreamLeader and ConsumerLeader during an
// election.
var ErrNoLeader = errors.New("stream has no leader")

// StreamLeader finds the node that leads a stream, from the stream info's
// cluster section. It fails with ErrNoLeader (wrapped) while an election
// is under way, and with the API's error when no leader answers at all.
func (c *NATSCluster) StreamLeader(ctx context.Context, stream string) (*NATSProc, error) {
	info, err := c.StreamInfo(ctx, stream)
	if err != nil {
		return nil, err
	}
	if info.Cluster == nil || info.Cluster.Leader == "" {
		return nil, fmt.Errorf("%s: %w", stream, ErrNoLeader)
	}
	p := c.Node(info.Cluster.Leader)
	if p == nil {
		return nil, fmt.Errorf("%s: leader %q is not one of this cluster's nodes", stream, info.Cluster.Leader)
	}
	return p, nil
}

// MoveStreamLeader asks a stream's leader to step down in favour of node,
// and waits until node leads it.
func (c *NATSCluster) MoveStreamLeader(ctx context.Context, stream string, node *NATSProc) error {
	nc, err := c.conn()
	if err != nil {
		return err
	}
	req, _ := json.Marshal(map[string]any{"placement": map[string]string{"preferred": node.Name}})
	for {
		if l, err := c.StreamLeader(ctx, stream); err == nil && l == node {
			return nil
		}
		rctx, stop := context.WithTimeout(ctx, 2*time.Second)
		nc.RequestWithContext(rctx, "$JS.API.STREAM.LEADER.STEPDOWN."+stream, req)
		stop()
		select {
		case <-ctx.Done():
			return fmt.Errorf("move the leader of %s to %s: %w", stream, node.Name, ctx.Err())
		case <-time.After(500 * time.Millisecond):
		}
	}
}

// ConsumerLeader finds the node that leads a durable consumer.
func (c *NATSCluster) ConsumerLeader(ctx context.Context, stream, consumer string) (*NATSProc, error) {
	nc, err := c.conn()
	if err != nil {
		return nil, err
	}
	js, err := jetstream.New(nc)
	if err != nil {
		return nil, err
	}
	cons, err := js.Consumer(ctx, stream, consumer)
	if err != nil {
		return nil, err
	}
	info := cons.CachedInfo()
	if info.Cluster == nil || info.Cluster.Leader == "" {
		return nil, fmt.Errorf("%s/%s: %w", stream, consumer, ErrNoLeader)
	}
	p := c.Node(info.Cluster.Leader)
	if p == nil {
		return nil, fmt.Errorf("%s/%s: leader %q is not one of this cluster's nodes", stream, consumer, info.Cluster.Leader)
	}
	return p, nil
}

// MetaLeader is the JetStream meta leader (which places streams and
// answers the cluster-wide API), as a running node's /jsz reports it.
func (c *NATSCluster) MetaLeader() (*NATSProc, error) {
	var last error = errors.New("no node running")
	for _, p := range c.Nodes {
		if !p.Running() {
			continue
		}
		var jsz struct {
			Meta *struct {
				Leader string `json:"leader"`
			} `json:"meta_cluster"`
		}
		cl := http.Client{Timeout: 2 * time.Second}
		resp, err := cl.Get("http://127.0.0.1:" + strconv.Itoa(p.MonitorPort) + "/jsz")
		if err != nil {
			last = err
			continue
		}
		err = json.NewDecoder(resp.Body).Decode(&jsz)
		resp.Body.Close()
		if err != nil {
			last = err
			continue
		}
		if jsz.Meta == nil || jsz.Meta.Leader == "" {
			last = fmt.Errorf("%s knows no meta leader", p.Name)
			continue
		}
		if l := c.Node(jsz.Meta.Leader); l != nil {
			return l, nil
		}
		last = fmt.Errorf("meta leader %q is not one of this cluster's nodes", jsz.Meta.Leader)
	}
	return nil, last
}

// WaitStreamCurrent waits until a stream has a leader and every replica
// is online and current: after a restart, the node has caught up.
func (c *NATSCluster) WaitStreamCurrent(ctx context.Context, stream string) error {
	var last error
	for {
		qctx, stop := context.WithTimeout(ctx, 2*time.Second)
		info, err := c.StreamInfo(qctx, stream)
		stop()
		switch {
		case err != nil:
			last = err
		case info.Cluster == nil || info.Cluster.Leader == "":
			last = fmt.Errorf("%s: %w", stream, ErrNoLeader)
		default:
			last = nil
			for _, r := range info.Cluster.Replicas {
				if !r.Current || r.Offline {
					last = fmt.Errorf("%s: replica %s current %v offline %v lag %d", stream, r.Name, r.Current, r.Offline, r.Lag)
				}
			}
			if last == nil {
				return nil
			}
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("%w: %v", ctx.Err(), last)
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// tail is the last n bytes of a file.
func tail(path string, n int) string {
	b, _ := os.ReadFile(path)
	if len(b) > n {
		b = b[len(b)-n:]
	}
	return string(b)
}
