package e2e

import (
	"bufio"
	"errors"
	"io"
	"net"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/ghostwire/ghostwire/lab"
)

// crashServed is what the crash test's server saw of one connection.
type crashServed struct {
	kind     byte  // the request: 'F' finished download, 'M' mid-stream, 'H' half-closed
	wrote    int64 // bytes written before the stream ended or failed
	sentSHA  string
	writeErr error
	readErr  error // of reading the client after the request (EOF for 'H', the request's own half-close)
}

// crashServer serves downloads: the client sends one byte saying which,
// then the server streams. 'F' (finished): crashSmall bytes, half-close,
// and read to the client's EOF. 'M' (mid-stream) and 'H' (half-closed
// client): crashBig bytes, far more than every buffer on the path holds,
// so a client that stops reading keeps the server blocked in write.
func crashServer(t *testing.T, ln net.Listener) <-chan crashServed {
	out := make(chan crashServed, 8)
	serveConns(t, ln, func(c *net.TCPConn) {
		var s crashServed
		req := make([]byte, 1)
		if _, err := io.ReadFull(c, req); err != nil {
			s.readErr = err
			out <- s
			return
		}
		s.kind = req[0]
		size := int64(crashBig)
		if s.kind == 'F' {
			size = crashSmall
		}
		readDone := make(chan error, 1)
		go func() { _, err := io.Copy(io.Discard, c); readDone <- err }()
		cw := &countingWriter{w: c}
		s.sentSHA, s.writeErr = stream(cw, size, 11)
		s.wrote = cw.n.Load()
		if s.writeErr == nil {
			c.CloseWrite()
		}
		select {
		case s.readErr = <-readDone:
		case <-time.After(20 * time.Second):
			s.readErr = errors.New("client neither closed nor reset within 20s")
		}
		out <- s
	})
	return out
}

const (
	crashSmall = 16 << 20
	crashBig   = 1 << 30
)

type countingWriter struct {
	w io.Writer
	n atomic.Int64
}

func (c *countingWriter) Write(p []byte) (int, error) {
	n, err := c.w.Write(p)
	c.n.Add(int64(n))
	return n, err
}

func isReset(err error) bool {
	return errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.EPIPE)
}

// kill -9 of the proxy while downloads are mid-stream: the clients' reads
// end in a reset, never a clean EOF that would pass a truncated body off
// as whole, and the server's writes fail with a reset too. A download that
// finished (both ways closed, logged eof) before the kill got every byte.
func TestCrashResetsMidStream(t *testing.T) {
	b := proxiedBox(t, 80)
	ln, err := lab.Listen(b.Lab.Server, "tcp", net.JoinHostPort(b.Lab.ServerIP4.String(), "80"))
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	servedc := crashServer(t, ln)
	dial := func(req string) *net.TCPConn {
		t.Helper()
		c, err := lab.Dial(b.Lab.Client, "tcp", addr, 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		c.SetDeadline(time.Now().Add(60 * time.Second))
		if _, err := io.WriteString(c, req); err != nil {
			t.Fatal(err)
		}
		return c
	}

	// A download finished before the crash: every byte, then EOF.
	fin := dial("F")
	sha, n, err := drain(fin)
	if err != nil || n != crashSmall {
		t.Fatalf("finished download: %d of %d bytes, %v", n, crashSmall, err)
	}
	fin.CloseWrite()
	fs := <-servedc
	if fs.kind != 'F' || fs.writeErr != nil || fs.readErr != nil {
		t.Fatalf("server side of the finished download: %+v", fs)
	}
	if sha != fs.sentSHA {
		t.Fatalf("finished download: checksum %s, server sent %s", sha, fs.sentSHA)
	}
	fin.Close()
	if l := waitConnLog(t, b, fin.LocalAddr()); l["reason"] != "eof" || l["bytes_down"] != float64(crashSmall) {
		t.Fatalf("finished download's log line: %v", l)
	}

	// Two downloads mid-stream: one with the client's side open, one
	// half-closed by the client (request sent, then FIN). Each client
	// reads 4 MiB and then stops reading, so the server is surely still
	// writing when the proxy dies.
	mid := dial("M")
	half := dial("H")
	if err := half.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	const before = 4 << 20
	for _, c := range []*net.TCPConn{mid, half} {
		if _, err := io.ReadFull(c, make([]byte, before)); err != nil {
			t.Fatalf("%s: reading the first %d bytes: %v", c.LocalAddr(), before, err)
		}
	}

	if err := b.Proxy.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	killed := time.Now()
	<-b.Proxy.Done()
	b.Proxy = nil

	for _, tc := range []struct {
		name string
		c    *net.TCPConn
	}{{"mid-stream", mid}, {"half-closed", half}} {
		c := tc.c
		c.SetReadDeadline(time.Now().Add(20 * time.Second))
		rest, err := io.Copy(io.Discard, bufio.NewReaderSize(c, 1<<20))
		got := before + rest
		t.Logf("%s client: %d of %d bytes, then %v (%s after the kill)", tc.name, got, crashBig, err, time.Since(killed).Round(time.Millisecond))
		switch {
		case err == nil:
			t.Errorf("%s client: clean EOF after %d of %d bytes: a crash passed for the end of the stream", tc.name, got, crashBig)
		case !errors.Is(err, syscall.ECONNRESET):
			t.Errorf("%s client: read ended with %v after %d bytes, want ECONNRESET", tc.name, err, got)
		}
		if got >= crashBig {
			t.Errorf("%s client: got all %d bytes: the download was not mid-stream at the kill", tc.name, got)
		}
	}
	for range 2 {
		var s crashServed
		select {
		case s = <-servedc:
		case <-time.After(30 * time.Second):
			t.Fatal("the server side of a download mid-stream hangs after kill -9")
		}
		name := map[byte]string{'M': "mid-stream", 'H': "half-closed"}[s.kind]
		t.Logf("%s server: wrote %d bytes, write: %v, read: %v", name, s.wrote, s.writeErr, s.readErr)
		if !isReset(s.writeErr) {
			t.Errorf("%s server: write ended with %v after %d bytes, want a reset (ECONNRESET/EPIPE)", name, s.writeErr, s.wrote)
		}
		switch s.kind {
		case 'M':
			// The kernel reports a reset once: to whichever of the
			// server's concurrent write and read asks first; the other
			// then sees the socket shut down (EOF, EPIPE). So the read may
			// end in EOF, but in no other error.
			if s.readErr != nil && !isReset(s.readErr) {
				t.Errorf("mid-stream server: read ended with %v, want a reset or, after the write took the reset, EOF", s.readErr)
			}
		case 'H':
			if s.readErr != nil { // the client's FIN came before the crash
				t.Errorf("half-closed server: read of the client's half-close: %v, want EOF", s.readErr)
			}
		default:
			t.Errorf("unexpected connection at the server: %+v", s)
		}
	}
}
