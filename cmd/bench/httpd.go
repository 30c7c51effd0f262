package main

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/signal"
	"sync"
	"syscall"
)

// The bench's HTTP server: the bench binary re-executes itself with
// -serve-http ADDR inside the server namespace. It answers every request
// with a fixed 13-byte body and does as little as an HTTP/1.1 server can,
// so the figures measure the path in between rather than the server.
// It never times a connection out: the memory workload parks 10,000 idle
// connections on it, and on SIGUSR1 it closes every open connection, so
// that the server, not the proxy, closes first and the box's ephemeral
// ports are not left in TIME_WAIT (see measureMemory).

var (
	respKeepAlive = []byte("HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 13\r\n\r\nhello, world\n")
	respClose     = []byte("HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 13\r\nConnection: close\r\n\r\nhello, world\n")
)

func serveHTTP(addr string) error {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return fmt.Errorf("bench httpd: %w", err)
	}
	var (
		mu    sync.Mutex
		conns = map[net.Conn]struct{}{}
	)
	go func() {
		sig := make(chan os.Signal, 1)
		signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT, syscall.SIGUSR1)
		for s := range sig {
			if s != syscall.SIGUSR1 {
				ln.Close()
				return
			}
			mu.Lock()
			for c := range conns {
				c.Close()
			}
			mu.Unlock()
		}
	}()
	for {
		c, err := ln.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return nil
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				continue
			}
			// EMFILE and friends: keep serving what is open.
			fmt.Fprintln(os.Stderr, "bench httpd: accept:", err)
			continue
		}
		mu.Lock()
		conns[c] = struct{}{}
		mu.Unlock()
		go func() {
			serveHTTPConn(c)
			mu.Lock()
			delete(conns, c)
			mu.Unlock()
		}()
	}
}

// serveHTTPConn answers requests on one connection until the client closes
// or asks to close. Pipelined requests are answered in one write.
func serveHTTPConn(c net.Conn) {
	defer c.Close()
	r := bufio.NewReaderSize(c, 4096)
	var out []byte
	for {
		closeAfter, err := readRequest(r)
		if err != nil {
			return
		}
		if closeAfter {
			out = append(out, respClose...)
		} else {
			out = append(out, respKeepAlive...)
		}
		if closeAfter || r.Buffered() == 0 {
			if _, err := c.Write(out); err != nil {
				return
			}
			out = out[:0]
		}
		if closeAfter {
			return
		}
	}
}

var hdrConnection = []byte("connection:")

// readRequest reads one request head and skips a Content-Length body. It
// reports whether the client sent "Connection: close".
func readRequest(r *bufio.Reader) (closeAfter bool, err error) {
	first := true
	var bodyLen int64
	for {
		line, err := r.ReadSlice('\n')
		if err != nil {
			return false, err
		}
		line = bytes.TrimRight(line, "\r\n")
		if first {
			first = false
			if len(line) == 0 {
				first = true // tolerate a stray CRLF between requests
				continue
			}
			if bytes.HasSuffix(line, []byte("HTTP/1.0")) {
				closeAfter = true
			}
			continue
		}
		if len(line) == 0 {
			break
		}
		if len(line) > len(hdrConnection) && bytes.EqualFold(line[:len(hdrConnection)], hdrConnection) {
			v := bytes.TrimSpace(line[len(hdrConnection):])
			closeAfter = bytes.EqualFold(v, []byte("close"))
		}
		const cl = "content-length:"
		if len(line) > len(cl) && bytes.EqualFold(line[:len(cl)], []byte(cl)) {
			fmt.Sscan(string(bytes.TrimSpace(line[len(cl):])), &bodyLen)
		}
	}
	if bodyLen > 0 {
		if _, err := io.CopyN(io.Discard, r, bodyLen); err != nil {
			return false, err
		}
	}
	return closeAfter, nil
}
