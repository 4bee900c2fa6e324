package fault

import (
	"bytes"
	"errors"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// Proxy is a TCP proxy in front of Postgres. In pass mode it forwards both
// ways; CloseAll cuts every connection at once (RST or FIN); BlackHole stops
// forwarding on every existing and new connection without closing anything,
// the way a lost conntrack entry or a silent partition does. After Pass, new
// connections forward again but black-holed ones stay silent until their
// client closes them (or the proxy is closed): neither side ever hears of
// the other, as on a real black-holed path.
type Proxy struct {
	target string
	ln     net.Listener

	mu        sync.Mutex
	blackhole bool
	links     map[*link]struct{}
	closed    bool

	accepted atomic.Int64
	wg       sync.WaitGroup
	// cutOn, when set, is a byte string: the first client packet that
	// contains it is not forwarded, and its connection is reset (CutOn).
	cutOn atomic.Pointer[[]byte]
	cuts  atomic.Int64
}

// link is one proxied connection.
type link struct {
	client, server net.Conn // server is nil for a connection accepted while black-holed
	holed          atomic.Bool
	done           chan struct{} // closed when the proxy ends the link
	// replication is set when the client's startup message asked for a
	// replication connection (parameter replication=database).
	replication atomic.Bool
	first       atomic.Bool // the first client packet was inspected

	mu    sync.Mutex // guards server and ended
	ended bool
}

// setServer attaches the upstream connection; false when the link was
// closed meanwhile.
func (l *link) setServer(s net.Conn) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.ended {
		return false
	}
	l.server = s
	return true
}

func (l *link) close(rst bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.ended {
		return
	}
	l.ended = true
	for _, c := range []net.Conn{l.client, l.server} {
		if c == nil {
			continue
		}
		if tc, ok := c.(*net.TCPConn); ok && rst {
			_ = tc.SetLinger(0) // close sends RST
		}
		_ = c.Close()
	}
	close(l.done)
}

// NewProxy listens on a free loopback port and forwards to target
// (host:port). It is closed at cleanup.
func NewProxy(t testing.TB, target string) *Proxy {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	p := &Proxy{target: target, ln: ln, links: map[*link]struct{}{}}
	p.wg.Add(1)
	go p.accept()
	t.Cleanup(p.Close)
	return p
}

// Port is the proxy's listening port.
func (p *Proxy) Port() int { return p.ln.Addr().(*net.TCPAddr).Port }

// Accepted is how many client connections the proxy accepted so far.
func (p *Proxy) Accepted() int64 { return p.accepted.Load() }

func (p *Proxy) accept() {
	defer p.wg.Done()
	for {
		c, err := p.ln.Accept()
		if err != nil {
			return
		}
		p.accepted.Add(1)
		l := &link{client: c, done: make(chan struct{})}
		p.mu.Lock()
		if p.closed {
			p.mu.Unlock()
			_ = c.Close()
			return
		}
		hole := p.blackhole
		p.links[l] = struct{}{}
		p.mu.Unlock()
		if hole {
			// Accepted (the TCP handshake succeeded) but nothing goes
			// anywhere: the client waits for an answer that never comes.
			l.holed.Store(true)
			continue
		}
		p.wg.Add(1)
		go func() {
			defer p.wg.Done()
			s, err := net.DialTimeout("tcp", p.target, 5*time.Second)
			if err != nil {
				p.drop(l, false)
				return
			}
			p.mu.Lock()
			cut := p.closed
			p.mu.Unlock()
			if cut || !l.setServer(s) {
				_ = s.Close()
				p.drop(l, false)
				return
			}
			p.wg.Add(2)
			go p.pump(l, l.client, s, true)
			go p.pump(l, s, l.client, false)
		}()
	}
}

// pump copies src to dst until either side ends or the link is black-holed,
// after which it drops what it read and waits for the link to be closed.
func (p *Proxy) pump(l *link, src, dst net.Conn, fromClient bool) {
	defer p.wg.Done()
	buf := make([]byte, 32<<10)
	for {
		n, err := src.Read(buf)
		if fromClient && n > 0 && l.first.CompareAndSwap(false, true) {
			// The startup message (sslmode=disable: no SSLRequest first)
			// lists parameters as NUL-terminated key/value pairs.
			l.replication.Store(bytes.Contains(buf[:n], []byte("\x00replication\x00")))
		}
		if l.holed.Load() {
			<-l.done
			return
		}
		if pat := p.cutOn.Load(); fromClient && n > 0 && pat != nil && bytes.Contains(buf[:n], *pat) &&
			p.cutOn.CompareAndSwap(pat, nil) {
			p.cuts.Add(1)
			p.drop(l, true)
			return
		}
		if n > 0 {
			if _, werr := dst.Write(buf[:n]); werr != nil {
				err = werr
			}
		}
		if err != nil {
			if l.holed.Load() {
				<-l.done
				return
			}
			// One side ended (EOF, reset, or the link was closed by the
			// proxy): end the other too, as a TCP middlebox would.
			rst := !errors.Is(err, io.EOF)
			p.drop(l, rst)
			return
		}
	}
}

func (p *Proxy) drop(l *link, rst bool) {
	l.close(rst)
	p.mu.Lock()
	delete(p.links, l)
	p.mu.Unlock()
}

// CutOn arms a one-shot cut: the next packet a client sends that contains
// pattern (a protocol command such as "START_REPLICATION") is dropped and its
// connection reset, as if the network failed at exactly that step.
func (p *Proxy) CutOn(pattern string) {
	b := []byte(pattern)
	p.cutOn.Store(&b)
}

// Cuts is how many CutOn cuts happened.
func (p *Proxy) Cuts() int64 { return p.cuts.Load() }

// CloseAll ends every current connection at once, with a reset (rst) or an
// orderly FIN, on both sides. New connections are still accepted.
func (p *Proxy) CloseAll(rst bool) int {
	p.mu.Lock()
	links := make([]*link, 0, len(p.links))
	for l := range p.links {
		links = append(links, l)
	}
	p.links = map[*link]struct{}{}
	p.mu.Unlock()
	for _, l := range links {
		l.close(rst)
	}
	return len(links)
}

// BlackHole stops forwarding on every current and future connection, without
// closing any. It returns how many connections it froze.
func (p *Proxy) BlackHole() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.blackhole = true
	for l := range p.links {
		l.holed.Store(true)
	}
	return len(p.links)
}

// BlackHoleReplication freezes the current replication connections only
// (their standby status updates no longer reach the server); every other
// connection, current or new, keeps forwarding. It returns how many it froze.
func (p *Proxy) BlackHoleReplication() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	n := 0
	for l := range p.links {
		if l.replication.Load() {
			l.holed.Store(true)
			n++
		}
	}
	return n
}

// Pass makes new connections forward again; black-holed ones stay silent.
func (p *Proxy) Pass() {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.blackhole = false
}

// Close stops the proxy and ends every connection.
func (p *Proxy) Close() {
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		return
	}
	p.closed = true
	p.mu.Unlock()
	_ = p.ln.Close()
	p.CloseAll(false)
	p.wg.Wait()
}
