package testenv

import (
	"io"
	"net"
	"strconv"
	"sync"
	"testing"
)

// Proxy forwards TCP connections on a loopback port to a target, and can
// be cut to play a network partition: Cut(false) resets every connection
// and refuses new ones (a host that is gone); Cut(true) keeps accepting and
// forwards nothing (packets silently dropped: calls hang until their
// deadline). Heal restores the link.
type Proxy struct {
	ln     net.Listener
	target string

	mu    sync.Mutex
	conns map[net.Conn]bool
	cut   bool
	hole  bool
}

// StartProxy listens on a free loopback port and forwards to target
// (host:port). It closes with the test.
func StartProxy(t testing.TB, target string) *Proxy {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &Proxy{ln: ln, target: target, conns: map[net.Conn]bool{}}
	go p.serve()
	t.Cleanup(func() { ln.Close(); p.closeAll() })
	return p
}

// Addr is the proxy's host:port.
func (p *Proxy) Addr() string { return p.ln.Addr().String() }

// Port is the proxy's port.
func (p *Proxy) Port() int { return p.ln.Addr().(*net.TCPAddr).Port }

// URL is scheme://host:port of the proxy.
func (p *Proxy) URL(scheme string) string {
	return scheme + "://127.0.0.1:" + strconv.Itoa(p.Port())
}

// Cut partitions the link; blackhole chooses silence over resets.
func (p *Proxy) Cut(blackhole bool) {
	p.mu.Lock()
	p.cut, p.hole = true, blackhole
	p.mu.Unlock()
	if !blackhole {
		p.closeAll()
	}
}

// Heal ends the partition; connections held in a black hole are reset so
// clients reconnect.
func (p *Proxy) Heal() {
	p.mu.Lock()
	wasHole := p.hole
	p.cut, p.hole = false, false
	p.mu.Unlock()
	if wasHole {
		p.closeAll()
	}
}

func (p *Proxy) closeAll() {
	p.mu.Lock()
	for c := range p.conns {
		c.Close()
	}
	p.conns = map[net.Conn]bool{}
	p.mu.Unlock()
}

func (p *Proxy) track(c net.Conn) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.conns[c] = true
	return p.cut
}

func (p *Proxy) serve() {
	for {
		c, err := p.ln.Accept()
		if err != nil {
			return
		}
		p.mu.Lock()
		cut, hole := p.cut, p.hole
		p.mu.Unlock()
		switch {
		case cut && hole:
			p.track(c) // held, silent
			continue
		case cut:
			c.Close()
			continue
		}
		go p.forward(c)
	}
}

func (p *Proxy) forward(c net.Conn) {
	up, err := net.Dial("tcp", p.target)
	if err != nil {
		c.Close()
		return
	}
	if p.track(c) || p.track(up) {
		c.Close()
		up.Close()
		return
	}
	done := make(chan struct{}, 2)
	pipe := func(dst, src net.Conn) {
		io.Copy(dst, src)
		done <- struct{}{}
	}
	go pipe(up, c)
	go pipe(c, up)
	<-done
	c.Close()
	up.Close()
	<-done
	p.mu.Lock()
	delete(p.conns, c)
	delete(p.conns, up)
	p.mu.Unlock()
}
