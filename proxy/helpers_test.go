package proxy

import (
	"context"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/netip"
	"runtime"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// testPort is Config.Port in hook-based tests; nothing listens on it, the
// listeners are on ephemeral loopback ports.
const testPort = 1

// ioDeadline keeps a broken test from hanging: no test waits this long when
// the code is right.
const ioDeadline = 60 * time.Second

// logSink collects slog JSON records, one per Write.
type logSink struct {
	mu      sync.Mutex
	recs    []map[string]any
	changed chan struct{} // closed and replaced on every record
}

func newLogSink() *logSink { return &logSink{changed: make(chan struct{})} }

func (s *logSink) Write(b []byte) (int, error) {
	var m map[string]any
	if err := json.Unmarshal(b, &m); err != nil {
		return 0, err
	}
	s.mu.Lock()
	s.recs = append(s.recs, m)
	close(s.changed)
	s.changed = make(chan struct{})
	s.mu.Unlock()
	return len(b), nil
}

// closed waits for n "connection closed" records and returns them.
func (s *logSink) closed(t *testing.T, n int) []map[string]any {
	t.Helper()
	return s.records(t, "connection closed", n)
}

// records waits for n records with message msg and returns them.
func (s *logSink) records(t *testing.T, msg string, n int) []map[string]any {
	t.Helper()
	deadline := time.NewTimer(ioDeadline)
	defer deadline.Stop()
	for {
		s.mu.Lock()
		var got []map[string]any
		for _, r := range s.recs {
			if r["msg"] == msg {
				got = append(got, r)
			}
		}
		ch := s.changed
		s.mu.Unlock()
		if len(got) >= n {
			return got
		}
		select {
		case <-ch:
		case <-deadline.C:
			t.Fatalf("got %d %q log records, want %d", len(got), msg, n)
		}
	}
}

// harness is a Proxy on loopback driven by the test hooks, in front of one
// backend server.
type harness struct {
	t       *testing.T
	p       *Proxy
	cfg     Config
	logs    *logSink
	backend *net.TCPAddr
	dials   atomic.Int32

	serveOnce sync.Once
	serveRes  chan error
	serveErr  error
}

// checkGoroutines fails t if goroutines started during the test outlive
// it. Call it first so its cleanup runs last.
func checkGoroutines(t *testing.T) {
	base := runtime.NumGoroutine()
	t.Cleanup(func() {
		deadline := time.Now().Add(10 * time.Second)
		for runtime.NumGoroutine() > base {
			if time.Now().After(deadline) {
				buf := make([]byte, 1<<20)
				t.Errorf("goroutines leaked: %d, want <= %d\n%s", runtime.NumGoroutine(), base, buf[:runtime.Stack(buf, true)])
				return
			}
			time.Sleep(5 * time.Millisecond)
		}
	})
}

// startBackend serves handle on a loopback listener until the test ends,
// then closes every connection it accepted and waits for the handlers.
func startBackend(t testing.TB, handle func(*net.TCPConn)) *net.TCPAddr {
	ln, err := net.ListenTCP("tcp4", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	conns := map[*net.TCPConn]bool{}
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.AcceptTCP()
			if err != nil {
				return
			}
			mu.Lock()
			conns[c] = true
			mu.Unlock()
			c.SetDeadline(time.Now().Add(ioDeadline))
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer c.Close()
				handle(c)
			}()
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		mu.Lock()
		for c := range conns {
			c.Close()
		}
		mu.Unlock()
		wg.Wait()
	})
	return ln.Addr().(*net.TCPAddr)
}

// reset closes c with an RST instead of a FIN.
func reset(c *net.TCPConn) {
	c.SetLinger(0)
	c.Close()
}

// addrOf is a as the proxy's OrigDst hook returns it (IPv4 unmapped).
func addrOf(a *net.TCPAddr) netip.AddrPort {
	ap := a.AddrPort()
	return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
}

// startProxy starts a backend running handle and a serving Proxy whose
// connections all go to it. tweak may change the config before New.
func startProxy(t *testing.T, handle func(*net.TCPConn), tweak func(*Config)) *harness {
	t.Helper()
	h := &harness{t: t, logs: newLogSink(), serveRes: make(chan error, 1)}
	if handle != nil {
		h.backend = startBackend(t, handle)
	}
	h.cfg = Config{
		Port:           testPort,
		ConnectTimeout: 5 * time.Second,
		IdleTimeout:    time.Minute,
		Logger:         slog.New(slog.NewJSONHandler(h.logs, &slog.HandlerOptions{Level: slog.LevelDebug})),
		Listen: func(network, addr string) (net.Listener, error) {
			if network == "tcp6" {
				return net.Listen("tcp6", "[::1]:0")
			}
			return net.Listen("tcp4", "127.0.0.1:0")
		},
		Dial: func(ctx context.Context, network string, local, remote *net.TCPAddr) (*net.TCPConn, error) {
			h.dials.Add(1)
			d := net.Dialer{LocalAddr: local}
			c, err := d.DialContext(ctx, network, remote.String())
			if err != nil {
				return nil, err
			}
			return c.(*net.TCPConn), nil
		},
		OrigDst: func(netip.AddrPort) netip.AddrPort { return addrOf(h.backend) },
	}
	if tweak != nil {
		tweak(&h.cfg)
	}
	p, err := New(h.cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := p.Start(); err != nil {
		t.Fatal(err)
	}
	h.p = p
	go func() { h.serveRes <- p.Serve(context.Background()) }()
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := p.Shutdown(ctx); err != nil {
			t.Errorf("Shutdown at cleanup: %v", err)
		}
		if err := h.serve(); err != nil {
			t.Errorf("Serve: %v", err)
		}
		if a := p.Stats().Active; a != 0 {
			t.Errorf("Active after Shutdown = %d, want 0", a)
		}
	})
	return h
}

// serve waits for Serve to return and returns its result.
func (h *harness) serve() error {
	h.serveOnce.Do(func() {
		select {
		case h.serveErr = <-h.serveRes:
		case <-time.After(ioDeadline):
			h.serveErr = errors.New("Serve did not return")
		}
	})
	return h.serveErr
}

// dial connects a client to the proxy's IPv4 listener.
func (h *harness) dial() *net.TCPConn {
	h.t.Helper()
	c, err := net.DialTCP("tcp4", nil, h.p.Addrs()[0].(*net.TCPAddr))
	if err != nil {
		h.t.Fatal(err)
	}
	c.SetDeadline(time.Now().Add(ioDeadline))
	h.t.Cleanup(func() { c.Close() })
	return c
}

// dialAndRead connects to the proxy and reads, for connections the proxy
// resets at once: the reset may beat connect's own completion check, so it
// can surface from either call.
func (h *harness) dialAndRead() error {
	c, err := net.DialTCP("tcp4", nil, h.p.Addrs()[0].(*net.TCPAddr))
	if err != nil {
		return err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(ioDeadline))
	_, err = c.Read(make([]byte, 1))
	return err
}

// waitFor polls cond, for conditions with no event to wait on.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(2 * time.Millisecond)
	}
}

// writeStream writes size pseudo-random bytes from seed to w and returns
// their SHA-256.
func writeStream(w io.Writer, seed uint64, size int) ([32]byte, error) {
	rng := rand.NewChaCha8([32]byte{byte(seed), byte(seed >> 8)})
	sum := sha256.New()
	buf := make([]byte, 256<<10)
	for size > 0 {
		b := buf[:min(size, len(buf))]
		rng.Read(b)
		sum.Write(b)
		if _, err := w.Write(b); err != nil {
			return [32]byte{}, err
		}
		size -= len(b)
	}
	return [32]byte(sum.Sum(nil)), nil
}

// readSum reads r to EOF and returns the SHA-256 and length of what it read.
func readSum(r io.Reader) ([32]byte, int64, error) {
	sum := sha256.New()
	n, err := io.CopyBuffer(sum, struct{ io.Reader }{r}, make([]byte, 256<<10))
	return [32]byte(sum.Sum(nil)), n, err
}

// wantReset checks that err is a connection reset, as an abort produces.
func wantReset(t *testing.T, err error) {
	t.Helper()
	if !errors.Is(err, syscall.ECONNRESET) {
		t.Fatalf("got %v, want connection reset by peer", err)
	}
}

// field returns a record's attribute as a string for comparisons.
func field(r map[string]any, k string) string {
	switch v := r[k].(type) {
	case string:
		return v
	case nil:
		return "<missing>"
	default:
		b, _ := json.Marshal(v)
		return string(b)
	}
}

// closedWith checks the record of h's one connection: it closed for reason.
func closedWith(t *testing.T, h *harness, reason string) {
	t.Helper()
	r := h.logs.closed(t, 1)[0]
	if got := field(r, "reason"); got != reason {
		t.Errorf("reason = %s, want %s", got, reason)
	}
}
