package e2e

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"sync"
	"testing"

	"github.com/ghostwire/ghostwire/lab"
)

// stream writes n deterministic pseudo-random bytes to w and returns their
// SHA-256.
func stream(w io.Writer, n int64, seed uint64) (string, error) {
	h := sha256.New()
	src := rand.NewChaCha8([32]byte{byte(seed), byte(seed >> 8)})
	_, err := io.CopyN(io.MultiWriter(w, h), src, n)
	return hex.EncodeToString(h.Sum(nil)), err
}

// drained is what drain returned.
type drained struct {
	sha string
	n   int64
	err error
}

// drainAsync drains r on a goroutine of its own.
func drainAsync(r io.Reader) <-chan drained {
	out := make(chan drained, 1)
	go func() {
		sha, n, err := drain(r)
		out <- drained{sha, n, err}
	}()
	return out
}

// drain reads r to EOF and returns the SHA-256 of what it read and how much.
func drain(r io.Reader) (string, int64, error) {
	h := sha256.New()
	n, err := io.Copy(h, r)
	return hex.EncodeToString(h.Sum(nil)), n, err
}

// served is what a test server saw of one connection.
type served struct {
	peer     string // remote address as the server saw it
	gotSHA   string // of what it received
	got      int64
	sentSHA  string
	readErr  error
	writeErr error
}

// mirrorServer accepts on ln; per connection it sends n pseudo-random bytes
// while reading everything the client sends, then half-closes.
func mirrorServer(t *testing.T, ln net.Listener, n int64) <-chan served {
	t.Helper()
	out := make(chan served, 256)
	var wg sync.WaitGroup
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				wg.Wait()
				close(out)
				return
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer c.Close()
				var s served
				s.peer = c.RemoteAddr().String()
				done := make(chan struct{})
				go func() {
					s.gotSHA, s.got, s.readErr = drain(c)
					close(done)
				}()
				s.sentSHA, s.writeErr = stream(c, n, 2)
				c.(*net.TCPConn).CloseWrite()
				<-done
				out <- s
			}()
		}
	}()
	t.Cleanup(func() { ln.Close() })
	return out
}

// serveConns runs handle for every connection ln accepts, until the test
// ends.
func serveConns(t *testing.T, ln net.Listener, handle func(*net.TCPConn)) {
	t.Helper()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				handle(c.(*net.TCPConn))
			}()
		}
	}()
	t.Cleanup(func() { ln.Close() })
}

// echoServer echoes each connection until the client half-closes, then
// half-closes itself.
func echoServer(t *testing.T, ln net.Listener) {
	serveConns(t, ln, func(c *net.TCPConn) {
		io.Copy(c, c)
		c.CloseWrite()
	})
}

// peerServer announces the peer address it sees, "peer=IP:PORT\n", then
// echoes like echoServer.
func peerServer(t *testing.T, ln net.Listener) { serveConns(t, ln, servePeer) }

// servePeer is peerServer's handling of one connection.
func servePeer(c *net.TCPConn) {
	fmt.Fprintf(c, "peer=%s\n", c.RemoteAddr())
	io.Copy(c, c)
	c.CloseWrite()
}

// listenServer listens in the server namespace on host:port and serves
// with serve.
func listenServer(t *testing.T, b *lab.Appliance, host, port string, serve func(*testing.T, net.Listener)) string {
	t.Helper()
	addr := net.JoinHostPort(host, port)
	ln, err := lab.Listen(b.Lab.Server, "tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	serve(t, ln)
	return addr
}
