package pgtest

import (
	"context"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"net/url"
	"sync"
	"testing"

	"github.com/jackc/pgx/v5/pgxpool"
)

// CommitCut is what a CommitCutter does to the next COMMIT sent through it.
type CommitCut int

const (
	// AnswerLost lets the COMMIT reach the server, then drops the answer and
	// the connection: the transaction committed, the client learns nothing.
	AnswerLost CommitCut = iota + 1
	// CommitLost drops the connection, COMMIT included: the transaction
	// rolls back, the client cannot know it did.
	CommitLost
	// BackendStuck drops the client's side of the connection and keeps the
	// server's open without the COMMIT: the backend sits idle in the
	// transaction, holding its locks, until it is terminated (a network that
	// black-holed the connection).
	BackendStuck
	// CommitHeld holds the COMMIT until Release, then lets it and the rest
	// of the connection through: a commit that takes its time.
	CommitHeld
)

// CommitCutter is a TCP proxy in front of a real server that cuts the next
// COMMIT the way a network or a server fails: Arm picks it.
type CommitCutter struct {
	t      testing.TB
	ln     net.Listener
	server string

	mu      sync.Mutex
	next    CommitCut
	fired   chan struct{}
	release chan struct{}
	conns   []net.Conn
}

// Release lets a COMMIT held by CommitHeld through.
func (c *CommitCutter) Release() {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.release != nil {
		close(c.release)
		c.release = nil
	}
}

// NewCommitCutter starts a cutter in front of the server of dbURL; it stops
// at the end of t, closing every connection it holds.
func NewCommitCutter(t testing.TB, dbURL string) *CommitCutter {
	t.Helper()
	u, err := url.Parse(dbURL)
	if err != nil {
		t.Fatalf("pgtest: cutter: %v", err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("pgtest: cutter: %v", err)
	}
	c := &CommitCutter{t: t, ln: ln, server: u.Host}
	var wg sync.WaitGroup
	wg.Go(func() {
		for {
			conn, err := ln.Accept()
			if err != nil {
				return
			}
			wg.Go(func() { c.serve(conn) })
		}
	})
	t.Cleanup(func() {
		c.Release()
		_ = ln.Close()
		c.mu.Lock()
		for _, conn := range c.conns {
			_ = conn.Close()
		}
		c.mu.Unlock()
		wg.Wait()
	})
	return c
}

// URL returns dbURL with the cutter in place of the server.
func (c *CommitCutter) URL(dbURL string) string {
	u, err := url.Parse(dbURL)
	if err != nil {
		c.t.Fatalf("pgtest: cutter: %v", err)
	}
	u.Host = c.ln.Addr().String()
	return u.String()
}

// Pool returns a pool on dbURL through the cutter, closed at the end of t.
func (c *CommitCutter) Pool(t testing.TB, dbURL string) *pgxpool.Pool {
	t.Helper()
	pool, err := pgxpool.New(context.Background(), c.URL(dbURL))
	if err != nil {
		t.Fatalf("pgtest: pool: %v", err)
	}
	t.Cleanup(func() {
		c.Release() // a held COMMIT would keep its connection, and Close waiting
		pool.Close()
	})
	return pool
}

// Arm makes the next COMMIT through c fail as cut says; the returned channel
// is closed once it has.
func (c *CommitCutter) Arm(cut CommitCut) <-chan struct{} {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.next, c.fired = cut, make(chan struct{})
	if cut == CommitHeld {
		c.release = make(chan struct{})
	}
	return c.fired
}

func (c *CommitCutter) take() (CommitCut, chan struct{}, chan struct{}) {
	c.mu.Lock()
	defer c.mu.Unlock()
	cut := c.next
	c.next = 0
	return cut, c.fired, c.release
}

func (c *CommitCutter) track(conn net.Conn) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.conns = append(c.conns, conn)
}

// serve proxies one connection: the server's answers as they come, the
// client's messages one at a time, so that a COMMIT can be told apart.
func (c *CommitCutter) serve(client net.Conn) {
	c.track(client)
	server, err := net.Dial("tcp", c.server)
	if err != nil {
		_ = client.Close()
		return
	}
	c.track(server)
	// dropAnswer is closed when the answer to a COMMIT just sent must be
	// lost: the server-to-client pump then closes both sides.
	dropAnswer := make(chan struct{})
	var answerOnce sync.Once
	go func() {
		buf := make([]byte, 32<<10)
		for {
			n, err := server.Read(buf)
			select {
			case <-dropAnswer:
				_ = client.Close()
				_ = server.Close()
				return
			default:
			}
			if n > 0 {
				if _, werr := client.Write(buf[:n]); werr != nil {
					_ = server.Close()
					return
				}
			}
			if err != nil {
				_ = client.Close()
				return
			}
		}
	}()
	typed := false // the startup messages have no type byte
	for {
		msg, err := readMessage(client, typed)
		if err != nil {
			_ = client.Close()
			_ = server.Close()
			return
		}
		if !typed && len(msg) >= 8 && binary.BigEndian.Uint32(msg[4:8]) == 196608 {
			typed = true // a StartupMessage, protocol 3.0
		}
		if typed && isCommit(msg) {
			cut, fired, release := c.take()
			switch cut {
			case CommitHeld:
				close(fired)
				<-release
			case AnswerLost:
				answerOnce.Do(func() { close(dropAnswer) })
				_, _ = server.Write(msg)
				close(fired)
				return // the pump closes both sides once the answer is in
			case CommitLost:
				_ = server.Close()
				_ = client.Close()
				close(fired)
				return
			case BackendStuck:
				_ = client.Close()
				close(fired)
				return // the server's side stays open until the test ends
			}
		}
		if _, err := server.Write(msg); err != nil {
			_ = client.Close()
			return
		}
	}
}

// readMessage reads one frontend message, with its type byte when typed.
func readMessage(r io.Reader, typed bool) ([]byte, error) {
	head := 4
	if typed {
		head = 5
	}
	msg := make([]byte, head)
	if _, err := io.ReadFull(r, msg); err != nil {
		return nil, err
	}
	n := int(binary.BigEndian.Uint32(msg[head-4:]))
	if n < 4 || n > 1<<30 {
		return nil, errors.New("pgtest: cutter: bad message length")
	}
	body := make([]byte, n-4)
	if _, err := io.ReadFull(r, body); err != nil {
		return nil, err
	}
	return append(msg, body...), nil
}

// isCommit reports a simple-protocol COMMIT, as pgx sends it.
func isCommit(msg []byte) bool {
	return msg[0] == 'Q' && string(msg[5:]) == "commit\x00"
}
