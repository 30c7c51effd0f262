package e2e

import (
	"bufio"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/ghostwire/ghostwire/lab"
)

// proxiedBox is a provisioned lab box with `ghostwire run` owning the
// diversion; cleanup stops the proxy and tears down before the lab goes.
func proxiedBox(t *testing.T, ports ...int) *lab.Appliance {
	t.Helper()
	return proxiedBoxWith(t, nil, ports...)
}

// applyAndRun applies b's config and starts the proxy; the test's cleanup
// stops it and tears the box down.
func applyAndRun(t *testing.T, b *lab.Appliance) {
	t.Helper()
	applied(t, b)
	if err := b.StartProxy(); err != nil {
		t.Fatal(err)
	}
}

// applied applies b's config; the test's cleanup stops the proxy, if one
// runs, and tears the box down.
func applied(t *testing.T, b *lab.Appliance) {
	t.Helper()
	if _, err := b.Ghostwire("apply"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if b.Proxy != nil {
			b.StopProxy(syscall.SIGTERM)
		}
		if out, err := b.Ghostwire("teardown"); err != nil {
			t.Errorf("teardown: %v\n%s", err, out)
		}
	})
}

// proxiedBoxWith is proxiedBox with extra keys in the config's proxy:
// section (indented two spaces, one per line, e.g. "max_connections: 4").
// The harness's config already has a proxy: section, so the keys go into
// it rather than into a second one.
func proxiedBoxWith(t *testing.T, proxyKeys []string, ports ...int) *lab.Appliance {
	t.Helper()
	needRoot(t)
	b := newBox(t, ports...)
	cfg, err := readFile(b.Config)
	if err != nil {
		t.Fatal(err)
	}
	const anchor = "\n  shutdown_grace: 10s\n"
	if len(proxyKeys) > 0 && !strings.Contains(cfg, anchor) {
		t.Fatalf("harness config has no %q line to add proxy keys after:\n%s", strings.TrimSpace(anchor), cfg)
	}
	var add strings.Builder
	for _, k := range proxyKeys {
		add.WriteString("  " + k + "\n")
	}
	if err := writeFile(b.Config, strings.Replace(cfg, anchor, anchor+add.String(), 1)); err != nil {
		t.Fatal(err)
	}
	applyAndRun(t, b)
	return b
}

type family struct {
	name           string
	client, server string // IPs
	box            string
}

func families(b *lab.Appliance) []family {
	return []family{
		{"IPv4", b.Lab.ClientIP4.String(), b.Lab.ServerIP4.String(), b.Lab.BoxIP4.Addr().String()},
		{"IPv6", b.Lab.ClientIP6.String(), b.Lab.ServerIP6.String(), b.Lab.BoxIP6.Addr().String()},
	}
}

// waitConnLog waits for the proxy's "connection closed" line for the
// client socket local.
func waitConnLog(t *testing.T, b *lab.Appliance, local net.Addr) lab.LogLine {
	t.Helper()
	var line lab.LogLine
	err := lab.WaitFor(10*time.Second, func() (bool, error) {
		if ls := b.ConnLogFor(local); len(ls) > 0 {
			line = ls[0]
			return true, nil
		}
		return false, nil
	})
	if err != nil {
		t.Fatalf("no proxy log line for client %s: %v\n%s", local, err, b.Proxy.Stderr())
	}
	return line
}

// Proxied both ways, 64 MiB each way at once, intact; the server sees the
// client's address and the client the server's; the proxy logs it.
func TestProxyBulkBothWaysServerSeesClient(t *testing.T) {
	b := proxiedBox(t, 80)
	const size = 64 << 20
	for _, f := range families(b) {
		t.Run(f.name, func(t *testing.T) {
			var got <-chan served
			addr := listenServer(t, b, f.server, "80", func(t *testing.T, ln net.Listener) { got = mirrorServer(t, ln, size) })
			c, err := lab.Dial(b.Lab.Client, "tcp", addr, 5*time.Second)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			if c.RemoteAddr().String() != addr {
				t.Errorf("client is connected to %s, want the server %s", c.RemoteAddr(), addr)
			}
			rc := drainAsync(c)
			sent, err := stream(c, size, 1)
			if err != nil {
				t.Fatalf("client send: %v", err)
			}
			c.CloseWrite()
			r := <-rc
			s := <-got
			if r.err != nil || s.readErr != nil || s.writeErr != nil {
				t.Fatalf("transfer errors: client read %v, server read %v, server write %v", r.err, s.readErr, s.writeErr)
			}
			if s.got != size || s.gotSHA != sent {
				t.Errorf("client→server: server got %d bytes sha %s, client sent %d sha %s", s.got, s.gotSHA, size, sent)
			}
			if r.n != size || r.sha != s.sentSHA {
				t.Errorf("server→client: client got %d bytes sha %s, server sent %d sha %s", r.n, r.sha, size, s.sentSHA)
			}
			host, _, _ := net.SplitHostPort(s.peer)
			if host != f.client {
				t.Errorf("server saw peer %s, want the client's address %s", s.peer, f.client)
			}
			line := waitConnLog(t, b, c.LocalAddr())
			if line["server"] != addr || line["bytes_up"] != float64(size) || line["bytes_down"] != float64(size) {
				t.Errorf("proxy log line = %v", line)
			}
		})
	}
}

// A client that shuts down writing still gets the server's whole reply,
// which the server only sends after it saw the client's EOF.
func TestProxyHalfClose(t *testing.T) {
	b := proxiedBox(t, 80)
	for _, f := range families(b) {
		t.Run(f.name, func(t *testing.T) {
			const reply = 1 << 20
			addr := listenServer(t, b, f.server, "80", func(t *testing.T, ln net.Listener) {
				serveConns(t, ln, func(c *net.TCPConn) {
					if _, _, err := drain(c); err != nil { // returns only at the client's EOF
						return
					}
					stream(c, reply, 3)
				})
			})
			c, err := lab.Dial(b.Lab.Client, "tcp", addr, 5*time.Second)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			io.WriteString(c, "request")
			if err := c.CloseWrite(); err != nil {
				t.Fatal(err)
			}
			c.SetReadDeadline(time.Now().Add(15 * time.Second))
			_, n, err := drain(c)
			if err != nil || n != reply {
				t.Fatalf("after half-close the client got %d of %d reply bytes (%v)", n, reply, err)
			}
		})
	}
}

func TestProxy200Concurrent(t *testing.T) {
	b := proxiedBox(t, 80)
	addr := listenServer(t, b, b.Lab.ServerIP4.String(), "80", echoServer)
	const n = 200
	var wg sync.WaitGroup
	errs := make(chan error, n)
	locals := make(chan net.Addr, n)
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c, err := lab.Dial(b.Lab.Client, "tcp", addr, 10*time.Second)
			if err != nil {
				errs <- err
				return
			}
			defer c.Close()
			locals <- c.LocalAddr()
			msg := strings.Repeat(fmt.Sprintf("conn %03d ", i), 1000)
			go func() { io.WriteString(c, msg); c.CloseWrite() }()
			c.SetReadDeadline(time.Now().Add(30 * time.Second))
			got, err := io.ReadAll(c)
			if err != nil || string(got) != msg {
				errs <- fmt.Errorf("conn %d: echo of %d bytes came back as %d (%v)", i, len(msg), len(got), err)
			}
		}()
	}
	wg.Wait()
	close(errs)
	close(locals)
	for err := range errs {
		t.Error(err)
	}
	for l := range locals {
		waitConnLog(t, b, l)
	}
}

// A port that is not intercepted is bridged: no proxy log line for it.
func TestProxyLeavesOtherPortsAlone(t *testing.T) {
	b := proxiedBox(t, 80)
	plain := net.JoinHostPort(b.Lab.ServerIP4.String(), "8080")
	proxied := net.JoinHostPort(b.Lab.ServerIP4.String(), "80")
	for _, port := range []string{"8080", "80"} {
		listenServer(t, b, b.Lab.ServerIP4.String(), port, echoServer)
	}
	roundTrip := func(addr string) net.Addr {
		c, err := lab.Dial(b.Lab.Client, "tcp", addr, 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		io.WriteString(c, "hi")
		c.CloseWrite()
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		if got, err := io.ReadAll(c); err != nil || string(got) != "hi" {
			t.Fatalf("echo via %s = %q, %v", addr, got, err)
		}
		return c.LocalAddr()
	}
	plainLocal := roundTrip(plain)
	// The proxy logs in order of close: once the later proxied connection is
	// logged, a line for the plain one would be there too.
	waitConnLog(t, b, roundTrip(proxied))
	if ls := b.ConnLogFor(plainLocal); len(ls) != 0 {
		t.Errorf("connection to a non-intercepted port went through the proxy: %v", ls)
	}
}

// Connecting to the proxy port itself, or to the box's own address on an
// intercepted port, is refused at once: never proxied, never a hang.
func TestDirectConnectionsRefused(t *testing.T) {
	b := proxiedBox(t, 80)
	waitNoTentative(t, b.Lab.Box) // a tentative address answers no neighbour solicitation
	for _, f := range families(b) {
		for _, port := range []string{fmt.Sprint(lab.ProxyPort), "80"} {
			addr := net.JoinHostPort(f.box, port)
			start := time.Now()
			c, err := lab.Dial(b.Lab.Client, "tcp", addr, 5*time.Second)
			if err == nil {
				c.Close()
				t.Errorf("%s: connection to the box's %s was accepted", f.name, addr)
				continue
			}
			if !errors.Is(err, syscall.ECONNREFUSED) {
				t.Errorf("%s: dial %s: %v, want connection refused", f.name, addr, err)
			}
			if d := time.Since(start); d > 2*time.Second {
				t.Errorf("%s: refusal of %s took %s", f.name, addr, d)
			}
		}
	}
	if ls := b.ProxyLog("connection closed"); len(ls) != 0 {
		t.Errorf("direct connections reached the relay: %v", ls)
	}
}

// SIGTERM: the in-flight transfer finishes, a new connection still gets
// through (routed, not proxied), and the proxy exits 0.
func TestSIGTERMDrains(t *testing.T) {
	b := proxiedBox(t, 80)
	var got <-chan served
	addr := listenServer(t, b, b.Lab.ServerIP4.String(), "80", func(t *testing.T, ln net.Listener) { got = mirrorServer(t, ln, 0) })
	c, err := lab.Dial(b.Lab.Client, "tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	const half = 8 << 20
	sent := sha256.New()
	if _, err := stream(io.MultiWriter(c, sent), half, 4); err != nil {
		t.Fatal(err)
	}
	if err := b.Proxy.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	// "stopping" is logged on the signal, before the draining ruleset is
	// in; "draining" once new connections are no longer diverted.
	if err := lab.WaitFor(10*time.Second, func() (bool, error) { return len(b.ProxyLog("draining")) > 0, nil }); err != nil {
		t.Fatalf("proxy did not start draining: %v", err)
	}
	// A new connection while draining is neither hijacked nor cut.
	c2, err := lab.Dial(b.Lab.Client, "tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatalf("new connection during drain: %v", err)
	}
	io.WriteString(c2, "during drain")
	c2.CloseWrite()
	c2.SetReadDeadline(time.Now().Add(10 * time.Second))
	io.ReadAll(c2)
	c2.Close()

	if _, err := stream(io.MultiWriter(c, sent), half, 5); err != nil {
		t.Fatalf("in-flight transfer broke during drain: %v", err)
	}
	c.CloseWrite()
	io.ReadAll(c)
	for range 2 {
		s := <-got
		if s.peer == c2.LocalAddr().String() {
			if s.got != int64(len("during drain")) {
				t.Errorf("connection made during drain delivered %d bytes", s.got)
			}
			continue
		}
		if s.got != 2*half || s.gotSHA != hex.EncodeToString(sent.Sum(nil)) {
			t.Errorf("in-flight transfer: server got %d bytes (want %d), sha match %v, err %v\nproxy log:\n%s",
				s.got, 2*half, s.gotSHA == hex.EncodeToString(sent.Sum(nil)), s.readErr, b.Proxy.Stderr())
		}
	}
	select {
	case <-b.Proxy.Done():
	case <-time.After(20 * time.Second):
		t.Fatal("proxy still running 20s after SIGTERM with nothing left to drain")
	}
	if err := b.Proxy.Wait(); err != nil {
		t.Fatalf("proxy exit after drain: %v\n%s", err, b.Proxy.Stderr())
	}
	if ls := b.ConnLogFor(c2.LocalAddr()); len(ls) != 0 {
		t.Errorf("a connection made during drain was proxied: %v", ls)
	}
	b.Proxy = nil
	if st, _ := b.Status(); !strings.HasPrefix(st, "ghostwire: bypassing") {
		t.Errorf("status after the proxy stopped = %q, want bypassing", st)
	}
}

// A chatty connection (many small messages, like HTTP keep-alive) that
// turns to bulk carries every byte both ways through the real TPROXY path,
// between the real addresses.
func TestProxyChattyThenBulk(t *testing.T) {
	b := proxiedBox(t, 80)
	for _, f := range families(b) {
		t.Run(f.name, func(t *testing.T) {
			addr := listenServer(t, b, f.server, "80", peerServer)
			c, err := lab.Dial(b.Lab.Client, "tcp", addr, 5*time.Second)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			c.SetDeadline(time.Now().Add(30 * time.Second))
			r := bufio.NewReader(c)
			peer, err := r.ReadString('\n')
			if host, _, _ := net.SplitHostPort(strings.TrimSpace(strings.TrimPrefix(peer, "peer="))); err != nil || host != f.client {
				t.Fatalf("server saw peer %q (%v), want %s", peer, err, f.client)
			}
			msg := strings.Repeat("k", 100)
			buf := make([]byte, len(msg))
			const rounds = 50
			for i := range rounds {
				if _, err := io.WriteString(c, msg); err != nil {
					t.Fatalf("round trip %d: %v", i, err)
				}
				if _, err := io.ReadFull(r, buf); err != nil || string(buf) != msg {
					t.Fatalf("round trip %d: got %q (%v)", i, buf, err)
				}
			}
			const size = 4 << 20
			rc := drainAsync(r)
			sent, err := stream(c, size, 5)
			if err != nil {
				t.Fatal(err)
			}
			c.CloseWrite()
			if got := <-rc; got.err != nil || got.n != size || got.sha != sent {
				t.Fatalf("echoed bulk: %d of %d bytes, sha match %v (%v)", got.n, size, got.sha == sent, got.err)
			}
			line := waitConnLog(t, b, c.LocalAddr())
			up := float64(rounds*len(msg) + size)
			if line["reason"] != "eof" || line["bytes_up"] != up || line["bytes_down"] != up+float64(len(peer)) {
				t.Errorf("proxy log line = %v, want eof, %v bytes up", line, up)
			}
		})
	}
}
