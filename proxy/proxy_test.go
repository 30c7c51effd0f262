package proxy

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"
)

func TestNewValidates(t *testing.T) {
	good := Config{Port: 9876, ConnectTimeout: time.Second, IdleTimeout: time.Minute}
	for _, tc := range []struct {
		name  string
		tweak func(*Config)
		want  []string
	}{
		{"port zero", func(c *Config) { c.Port = 0 }, []string{"proxy port: 0 is outside 1-65535"}},
		{"connect zero", func(c *Config) { c.ConnectTimeout = 0 }, []string{"connect timeout: 0s must be positive"}},
		{"idle negative", func(c *Config) { c.IdleTimeout = -time.Second }, []string{"idle timeout: -1s must be positive"}},
		{"all at once", func(c *Config) { *c = Config{} }, []string{"proxy port", "connect timeout", "idle timeout"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := good
			tc.tweak(&cfg)
			_, err := New(cfg)
			if err == nil {
				t.Fatal("New accepted an invalid config")
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not mention %q", err, w)
				}
			}
		})
	}
	if _, err := New(good); err != nil {
		t.Fatalf("New(valid) = %v", err)
	}
}

// TestRelayBothWaysConcurrently moves 64 MiB each way at once and compares
// checksums at both ends.
func TestRelayBothWaysConcurrently(t *testing.T) {
	checkGoroutines(t)
	const size = 64 << 20
	type result struct {
		got, sent [32]byte
		n         int64
		err       error
	}
	atServer := make(chan result, 1)
	h := startProxy(t, func(c *net.TCPConn) {
		var r result
		var werr error
		done := make(chan struct{})
		go func() {
			defer close(done)
			r.sent, werr = writeStream(c, 2, size)
			c.CloseWrite()
		}()
		r.got, r.n, r.err = readSum(c)
		<-done
		r.err = errors.Join(r.err, werr)
		atServer <- r
	}, nil)

	c := h.dial()
	var sent [32]byte
	var werr error
	done := make(chan struct{})
	go func() {
		defer close(done)
		sent, werr = writeStream(c, 1, size)
		c.CloseWrite()
	}()
	got, n, err := readSum(c)
	<-done
	if err != nil || werr != nil {
		t.Fatalf("client: read %v, write %v", err, werr)
	}
	srv := <-atServer
	if srv.err != nil {
		t.Fatalf("server: %v", srv.err)
	}
	if n != size || srv.n != size {
		t.Fatalf("client read %d bytes, server read %d, want %d each", n, srv.n, size)
	}
	if got != srv.sent {
		t.Error("client received different bytes than the server sent")
	}
	if srv.got != sent {
		t.Error("server received different bytes than the client sent")
	}
	r := h.logs.closed(t, 1)[0]
	if field(r, "reason") != "eof" || field(r, "bytes_up") != "67108864" || field(r, "bytes_down") != "67108864" {
		t.Errorf("log record = %v, want reason eof and 64 MiB each way", r)
	}
	if st := h.p.Stats(); st.BytesUp != size || st.BytesDown != size || st.Accepted != 1 {
		t.Errorf("stats = %+v", st)
	}
}

// TestHalfClose: the client finishes its request with a FIN; the server
// only answers after seeing that EOF, and the answer still arrives whole.
// The log record carries every attribute.
func TestHalfClose(t *testing.T) {
	checkGoroutines(t)
	reply := bytes.Repeat([]byte("0123456789abcdef"), 1<<16) // 1 MiB
	h := startProxy(t, func(c *net.TCPConn) {
		req, err := io.ReadAll(c) // returns at the client's FIN
		if err != nil || string(req) != "request" {
			t.Errorf("server read %q, %v", req, err)
			return
		}
		c.Write(reply)
	}, nil)
	c := h.dial()
	if _, err := c.Write([]byte("request")); err != nil {
		t.Fatal(err)
	}
	if err := c.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	got, err := io.ReadAll(c)
	if err != nil || !bytes.Equal(got, reply) {
		t.Fatalf("client read %d bytes (%v), want the %d-byte reply", len(got), err, len(reply))
	}

	recs := h.logs.closed(t, 1)
	if len(recs) != 1 {
		t.Fatalf("%d connection-closed records, want 1", len(recs))
	}
	r := recs[0]
	for k, want := range map[string]string{
		"level":      "INFO",
		"client":     c.LocalAddr().String(),
		"server":     h.backend.String(),
		"bytes_up":   "7",
		"bytes_down": "1048576",
		"reason":     "eof",
	} {
		if got := field(r, k); got != want {
			t.Errorf("log %s = %s, want %s", k, got, want)
		}
	}
	if _, err := netip.ParseAddrPort(field(r, "client")); err != nil {
		t.Errorf("client attr is not ip:port: %v", err)
	}
	if d, ok := r["duration"].(float64); !ok || d <= 0 {
		t.Errorf("duration = %v, want a positive number of nanoseconds", r["duration"])
	}
}

func TestManyConcurrent(t *testing.T) {
	checkGoroutines(t)
	const n = 200
	h := startProxy(t, func(c *net.TCPConn) {
		// Echo, then pass the client's FIN back.
		io.CopyBuffer(struct{ io.Writer }{c}, struct{ io.Reader }{c}, make([]byte, 4096))
		c.CloseWrite()
	}, nil)
	var wg sync.WaitGroup
	errs := make(chan error, n)
	for i := range n {
		c := h.dial()
		wg.Add(1)
		go func() {
			defer wg.Done()
			msg := bytes.Repeat([]byte{byte(i)}, 1000+i*37)
			go func() {
				c.Write(msg)
				c.CloseWrite()
			}()
			got, err := io.ReadAll(c)
			if err != nil || !bytes.Equal(got, msg) {
				errs <- errors.Join(err, errors.New("wrong echo"))
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	recs := h.logs.closed(t, n)
	for _, r := range recs {
		if field(r, "reason") != "eof" || field(r, "bytes_up") != field(r, "bytes_down") {
			t.Errorf("record %v", r)
		}
	}
	if st := h.p.Stats(); st.Accepted != n {
		t.Errorf("Accepted = %d, want %d", st.Accepted, n)
	}
	waitFor(t, "no active connections", func() bool { return h.p.Stats().Active == 0 })
}

func TestIdleTimeout(t *testing.T) {
	const idle = 200 * time.Millisecond
	short := func(c *Config) { c.IdleTimeout = idle }

	t.Run("idle connection closes", func(t *testing.T) {
		checkGoroutines(t)
		// The server's write comes before the proxy sees "hi", so the
		// proxy's idle clock cannot start earlier than this stamp. (The
		// client's read of "hi" comes after, and is no bound.)
		wrote := make(chan time.Time, 1)
		h := startProxy(t, func(c *net.TCPConn) {
			wrote <- time.Now()
			c.Write([]byte("hi"))
			io.Copy(io.Discard, c)
		}, short)
		c := h.dial()
		buf := make([]byte, 2)
		if _, err := io.ReadFull(c, buf); err != nil {
			t.Fatal(err)
		}
		_, err := c.Read(buf)
		wantReset(t, err)
		if el := time.Since(<-wrote); el < idle {
			t.Errorf("closed %v after the last byte, before the %v idle timeout", el, idle)
		}
		closedWith(t, h, "idle timeout")
	})

	// A trickle in one direction keeps the connection alive even though
	// nothing comes back and no chunk ever fills.
	const ticks = 30 // 30 x 50ms = 7.5 idle timeouts
	t.Run("slow download is not idle", func(t *testing.T) {
		checkGoroutines(t)
		h := startProxy(t, func(c *net.TCPConn) {
			tick := time.NewTicker(idle / 4)
			defer tick.Stop()
			for range ticks {
				<-tick.C
				if _, err := c.Write([]byte{'x'}); err != nil {
					return
				}
			}
		}, short)
		c := h.dial()
		got, err := io.ReadAll(c)
		if err != nil || len(got) != ticks {
			t.Fatalf("read %d bytes (%v), want %d then EOF", len(got), err, ticks)
		}
		c.Close() // else the connection stays half-open, and then idles out
		closedWith(t, h, "eof")
	})
	t.Run("slow upload is not idle", func(t *testing.T) {
		checkGoroutines(t)
		h := startProxy(t, func(c *net.TCPConn) {
			got, _ := io.ReadAll(c)
			c.Write([]byte(strings.ToUpper(string(got))))
		}, short)
		c := h.dial()
		tick := time.NewTicker(idle / 4)
		defer tick.Stop()
		for range ticks {
			<-tick.C
			if _, err := c.Write([]byte{'x'}); err != nil {
				t.Fatal(err)
			}
		}
		c.CloseWrite()
		got, err := io.ReadAll(c)
		if err != nil || string(got) != strings.Repeat("X", ticks) {
			t.Fatalf("read %q (%v)", got, err)
		}
		closedWith(t, h, "eof")
	})
	t.Run("SetTimeouts shortens it for open connections", func(t *testing.T) {
		checkGoroutines(t)
		h := startProxy(t, func(c *net.TCPConn) {
			c.Write([]byte("hi"))
			io.Copy(io.Discard, c)
		}, nil) // one minute
		c := h.dial()
		buf := make([]byte, 2)
		if _, err := io.ReadFull(c, buf); err != nil {
			t.Fatal(err)
		}
		h.p.SetTimeouts(time.Second, idle)
		_, err := c.Read(buf)
		wantReset(t, err)
		closedWith(t, h, "idle timeout")
	})
}

func TestUpstreamDialFails(t *testing.T) {
	t.Run("refused", func(t *testing.T) {
		checkGoroutines(t)
		ln, err := net.Listen("tcp4", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		closedPort := ln.Addr().(*net.TCPAddr)
		ln.Close()
		h := startProxy(t, nil, func(c *Config) {
			c.OrigDst = func(netip.AddrPort) netip.AddrPort { return addrOf(closedPort) }
		})
		wantReset(t, h.dialAndRead())
		r := h.logs.closed(t, 1)[0]
		if field(r, "reason") != "dial: refused" || field(r, "server") != closedPort.String() {
			t.Errorf("log record = %v", r)
		}
		if st := h.p.Stats(); st.DialFailed != 1 || st.Accepted != 1 {
			t.Errorf("stats = %+v", st)
		}
	})
	t.Run("timeout", func(t *testing.T) {
		checkGoroutines(t)
		h := startProxy(t, func(*net.TCPConn) {}, func(c *Config) {
			c.ConnectTimeout = 100 * time.Millisecond
			c.Dial = func(ctx context.Context, _ string, _, _ *net.TCPAddr) (*net.TCPConn, error) {
				<-ctx.Done() // a destination that never answers
				return nil, ctx.Err()
			}
		})
		wantReset(t, h.dialAndRead())
		if r := h.logs.closed(t, 1)[0]; field(r, "reason") != "dial: timeout" {
			t.Errorf("reason = %s", field(r, "reason"))
		}
	})
}

func TestDirectConnectionRefused(t *testing.T) {
	checkGoroutines(t)
	h := startProxy(t, func(*net.TCPConn) {}, func(c *Config) {
		c.OrigDst = func(netip.AddrPort) netip.AddrPort {
			return netip.AddrPortFrom(netip.AddrFrom4([4]byte{127, 0, 0, 1}), testPort)
		}
	})
	wantReset(t, h.dialAndRead())
	r := h.logs.closed(t, 1)[0]
	if field(r, "level") != "WARN" || field(r, "reason") != "direct connection to the proxy port" {
		t.Errorf("log record = %v", r)
	}
	if st := h.p.Stats(); st.Refused != 1 || st.Accepted != 0 || h.dials.Load() != 0 {
		t.Errorf("stats = %+v, dials = %d: a direct connection must not be relayed", st, h.dials.Load())
	}
}

func TestResetIsMirrored(t *testing.T) {
	t.Run("server reset", func(t *testing.T) {
		checkGoroutines(t)
		h := startProxy(t, func(c *net.TCPConn) {
			io.ReadFull(c, make([]byte, 5))
			reset(c)
		}, nil)
		c := h.dial()
		c.Write([]byte("hello"))
		_, err := c.Read(make([]byte, 1))
		wantReset(t, err)
		closedWith(t, h, "server reset")
	})
	t.Run("client reset", func(t *testing.T) {
		checkGoroutines(t)
		serverErr := make(chan error, 1)
		h := startProxy(t, func(c *net.TCPConn) {
			c.Write([]byte("hi"))
			_, err := io.Copy(io.Discard, c)
			serverErr <- err
		}, nil)
		c := h.dial()
		if _, err := io.ReadFull(c, make([]byte, 2)); err != nil {
			t.Fatal(err)
		}
		reset(c)
		wantReset(t, <-serverErr)
		closedWith(t, h, "client reset")
	})
}

// A peer that resets after both FINs, with bytes still unacknowledged to
// it, ends the connection at once: waiting for acknowledgements that can
// no longer come would hold it for the idle timeout.
func TestResetAfterBothFINs(t *testing.T) {
	checkGoroutines(t)
	const size = 1 << 20
	h := startProxy(t, func(c *net.TCPConn) {
		io.Copy(io.Discard, c) // the client's FIN
		writeStream(c, 7, size)
		c.CloseWrite()
		io.Copy(io.Discard, c)
	}, func(c *Config) { c.IdleTimeout = time.Hour })
	c := h.dial()
	c.SetReadBuffer(4096) // and never read: the proxy's last bytes stay unacked
	c.CloseWrite()
	// Read on the connection's loop: it alone touches the conn.
	onLoop := func(f func(c *conn)) {
		h.p.mu.Lock()
		var pc *conn
		for k := range h.p.conns {
			pc = k
		}
		h.p.mu.Unlock()
		if pc != nil {
			pc.l.call(func() { f(pc) })
		}
	}
	waitFor(t, "both directions to end (both FINs relayed)", func() (closingNow bool) {
		onLoop(func(c *conn) { closingNow = c.state == closing })
		return closingNow
	})
	var unacked bool
	onLoop(func(c *conn) {
		inClose, _ := closedState(c.client.fd)
		unacked = c.state == closing && !inClose
	})
	if !unacked {
		t.Fatal("the proxy's client socket is closed already: nothing is left unacknowledged, the test proves nothing")
	}
	start := time.Now()
	reset(c)
	closedWith(t, h, "client reset")
	if el := time.Since(start); el > 5*time.Second {
		t.Errorf("the connection ended %v after the reset", el)
	}
}

// The idle timeout counts delivery, not only the relay's own reads and
// writes: a client draining one long splice slowly keeps the connection.
func TestIdleCountsKernelProgress(t *testing.T) {
	checkGoroutines(t)
	// A reader that sips every idle/20 stays well inside the timeout even
	// when a loaded machine delays it several times over; one 256 KiB
	// splice chunk at its pace (8 KiB per sip) takes 1.6 idle timeouts, so
	// a watchdog that counted only the relay's own activity would cut it.
	const idle = time.Second
	const size = 4 << 20
	done := make(chan struct{})
	h := startProxy(t, func(c *net.TCPConn) {
		writeStream(c, 3, size)
		c.CloseWrite()
		<-done
	}, func(c *Config) { c.IdleTimeout = idle })
	defer close(done) // before the backend's cleanup waits for its handler
	c := h.dial()
	c.SetReadBuffer(16 << 10)
	// Read in small sips for several idle timeouts: each sip is delivery.
	buf := make([]byte, 8<<10)
	deadline := time.Now().Add(4 * idle)
	var got int
	for time.Now().Before(deadline) {
		n, err := c.Read(buf)
		if err != nil {
			t.Fatalf("read after %d bytes: %v", got, err)
		}
		got += n
		time.Sleep(idle / 20) // a slow reader's pace
	}
	n, err := io.Copy(io.Discard, c)
	if err != nil || got+int(n) != size {
		t.Fatalf("got %d bytes (%v), want %d", got+int(n), err, size)
	}
	c.Close()
	closedWith(t, h, "eof")
}

func TestShutdownDrains(t *testing.T) {
	checkGoroutines(t)
	const half = 1 << 20
	release := make(chan struct{})
	h := startProxy(t, func(c *net.TCPConn) {
		c.Write(make([]byte, half))
		<-release
		c.Write(make([]byte, half))
	}, nil)
	c := h.dial()
	if _, err := io.ReadFull(c, make([]byte, half)); err != nil {
		t.Fatal(err)
	}
	shut := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), ioDeadline)
		defer cancel()
		shut <- h.p.Shutdown(ctx)
	}()
	addr := h.p.Addrs()[0].String()
	waitFor(t, "listener closed", func() bool {
		nc, err := net.Dial("tcp4", addr)
		if err == nil {
			nc.Close()
		}
		return err != nil
	})
	if err := h.serve(); err != nil {
		t.Errorf("Serve after Shutdown = %v, want nil", err)
	}
	select {
	case err := <-shut:
		t.Fatalf("Shutdown returned %v while a transfer was in flight", err)
	default:
	}
	close(release)
	rest, err := io.ReadAll(c)
	if err != nil || len(rest) != half {
		t.Fatalf("read %d more bytes (%v), want %d then EOF", len(rest), err, half)
	}
	c.Close()
	if err := <-shut; err != nil {
		t.Fatalf("Shutdown = %v, want nil after draining", err)
	}
	if a := h.p.Stats().Active; a != 0 {
		t.Errorf("Active = %d when Shutdown returned", a)
	}
	// The listener probes above may have been accepted and reset: find
	// the transfer's own record.
	found := false
	for _, r := range h.logs.closed(t, 1) {
		if field(r, "client") == c.LocalAddr().String() {
			found = true
			if field(r, "reason") != "eof" {
				t.Errorf("reason = %s, want eof", field(r, "reason"))
			}
		}
	}
	if !found {
		t.Error("no log record for the drained connection")
	}
}

func TestShutdownForcesAfterGrace(t *testing.T) {
	checkGoroutines(t)
	h := startProxy(t, func(c *net.TCPConn) {
		c.Write([]byte("hi"))
		io.Copy(io.Discard, c)
	}, nil)
	c := h.dial()
	if _, err := io.ReadFull(c, make([]byte, 2)); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	if err := h.p.Shutdown(ctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Shutdown = %v, want the grace period's deadline error", err)
	}
	if a := h.p.Stats().Active; a != 0 {
		t.Errorf("Active = %d after forced Shutdown", a)
	}
	_, err := c.Read(make([]byte, 1))
	wantReset(t, err)
	closedWith(t, h, "shutdown")
	if err := h.serve(); err != nil {
		t.Errorf("Serve = %v", err)
	}
}

func TestServeStopsWithContext(t *testing.T) {
	checkGoroutines(t)
	p, err := New(Config{
		Port: testPort, ConnectTimeout: time.Second, IdleTimeout: time.Second,
		Listen: func(network, _ string) (net.Listener, error) { return net.Listen("tcp4", "127.0.0.1:0") },
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := p.Serve(context.Background()); err == nil {
		t.Fatal("Serve before Start succeeded")
	}
	if err := p.Start(); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	res := make(chan error, 1)
	go func() { res <- p.Serve(ctx) }()
	cancel()
	if err := <-res; !errors.Is(err, context.Canceled) {
		t.Errorf("Serve = %v, want context.Canceled", err)
	}
	if nc, err := net.Dial("tcp4", p.Addrs()[0].String()); err == nil {
		nc.Close()
		t.Error("listener still open after Serve returned")
	}
	if err := p.Shutdown(context.Background()); err != nil {
		t.Errorf("Shutdown = %v", err)
	}
}

func TestStartFailureClosesFirstListener(t *testing.T) {
	checkGoroutines(t)
	var first net.Listener
	p, err := New(Config{
		Port: testPort, ConnectTimeout: time.Second, IdleTimeout: time.Second,
		Listen: func(network, _ string) (net.Listener, error) {
			if network == "tcp6" {
				return nil, errors.New("no v6 today")
			}
			ln, err := net.Listen("tcp4", "127.0.0.1:0")
			first = ln
			return ln, err
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	err = p.Start()
	if err == nil || !strings.Contains(err.Error(), "opening tcp6 listener: no v6 today") {
		t.Fatalf("Start = %v", err)
	}
	if _, err := first.Accept(); !errors.Is(err, net.ErrClosed) {
		t.Errorf("first listener still open after Start failed: Accept = %v", err)
	}
	if len(p.Addrs()) != 0 {
		t.Errorf("Addrs = %v after failed Start", p.Addrs())
	}
}
