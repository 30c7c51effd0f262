package e2e

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"net"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/ghostwire/ghostwire/lab"
)

// ovlConn is a client connection to a peerServer: peer is the address the
// server saw for it (the client's own, proxied or not).
type ovlConn struct {
	t    *testing.T
	b    *lab.Appliance
	c    *net.TCPConn
	rd   *bufio.Reader
	peer string
}

func (h *ovlConn) local() string { return h.c.LocalAddr().String() }

// proxied: the box holds a socket of the connection (viaProxy).
func (h *ovlConn) proxied() bool {
	return viaProxy(h.t, h.b, h.c.LocalAddr(), h.c.RemoteAddr().String())
}

// ovlOpen connects to a peerServer at addr and reads the peer line.
func ovlOpen(t *testing.T, b *lab.Appliance, addr string) *ovlConn {
	t.Helper()
	return ovlOpenFrom(t, b, addr, 0)
}

// ovlOpenFrom is ovlOpen from the client's port (0: one the kernel
// chooses).
func ovlOpenFrom(t *testing.T, b *lab.Appliance, addr string, port int) *ovlConn {
	t.Helper()
	var c *net.TCPConn
	err := b.Lab.Client.Do(func() error {
		d := net.Dialer{Timeout: 5 * time.Second, LocalAddr: &net.TCPAddr{Port: port}}
		conn, err := d.Dial("tcp", addr)
		if err == nil {
			c = conn.(*net.TCPConn)
		}
		return err
	})
	if err != nil {
		t.Fatalf("dial %s: %v\nproxy log:\n%s", addr, err, b.Proxy.Stderr())
	}
	t.Cleanup(func() { c.Close() })
	c.SetDeadline(time.Now().Add(60 * time.Second))
	h := &ovlConn{t: t, b: b, c: c, rd: bufio.NewReader(c)}
	line, err := h.rd.ReadString('\n')
	if err != nil || !strings.HasPrefix(line, "peer=") {
		t.Fatalf("%s: peer line %q, %v", addr, line, err)
	}
	h.peer = strings.TrimSpace(strings.TrimPrefix(line, "peer="))
	if host, _, _ := net.SplitHostPort(h.peer); host != c.LocalAddr().(*net.TCPAddr).IP.String() {
		t.Fatalf("server saw %s for client %s: not the client's IP", h.peer, h.local())
	}
	return h
}

// echo sends n bytes and checks the echo.
func (h *ovlConn) echo(t *testing.T, n int, tag string) {
	t.Helper()
	msg := []byte(strings.Repeat(tag+" ", n/(len(tag)+1)+1)[:n])
	errc := make(chan error, 1)
	go func() { _, err := h.c.Write(msg); errc <- err }()
	got := make([]byte, n)
	if _, err := io.ReadFull(h.rd, got); err != nil || string(got) != string(msg) {
		t.Fatalf("%s (%s): echo of %d bytes: %v (match %v)", h.local(), tag, n, err, string(got) == string(msg))
	}
	if err := <-errc; err != nil {
		t.Fatalf("%s (%s): write: %v", h.local(), tag, err)
	}
}

// end closes the connection in order: half-close, the server's EOF.
func (h *ovlConn) end(t *testing.T) {
	t.Helper()
	if err := h.c.CloseWrite(); err != nil {
		t.Fatalf("%s: close write: %v", h.local(), err)
	}
	if rest, err := io.ReadAll(h.rd); err != nil || len(rest) != 0 {
		t.Fatalf("%s: orderly end: %d stray bytes, %v", h.local(), len(rest), err)
	}
	h.c.Close()
}

// peerCounter is a peerServer that counts what it accepted.
type peerCounter struct {
	mu    sync.Mutex
	peers []string
}

func (pc *peerCounter) serve(t *testing.T, ln net.Listener) {
	serveConns(t, ln, func(c *net.TCPConn) {
		pc.mu.Lock()
		pc.peers = append(pc.peers, c.RemoteAddr().String())
		pc.mu.Unlock()
		servePeer(c)
	})
}

func (pc *peerCounter) count() int {
	pc.mu.Lock()
	defer pc.mu.Unlock()
	return len(pc.peers)
}

const (
	ovlStarted = "overload started; new connections are not proxied"
	ovlEnded   = "overload ended; proxying new connections again"
)

// waitStatus waits until `ghostwire status`'s first line is want.
func waitStatus(t *testing.T, b *lab.Appliance, want string) {
	t.Helper()
	var last string
	err := lab.WaitFor(10*time.Second, func() (bool, error) {
		st, err := b.Status()
		last = st
		return err == nil && st == want, nil
	})
	if err != nil {
		t.Fatalf("status is %q, want %q: %v\n%s", last, want, err, b.Proxy.Stderr())
	}
}

// waitLogCount waits until the proxy logged msg n times.
func waitLogCount(t *testing.T, b *lab.Appliance, msg string, n int) []lab.LogLine {
	t.Helper()
	err := lab.WaitFor(10*time.Second, func() (bool, error) { return len(b.ProxyLog(msg)) >= n, nil })
	if err != nil {
		t.Fatalf("%q logged %d times, want %d: %v\n%s", msg, len(b.ProxyLog(msg)), n, err, b.Proxy.Stderr())
	}
	ls := b.ProxyLog(msg)
	if len(ls) != n {
		t.Fatalf("%q logged %d times, want %d:\n%v", msg, len(ls), n, ls)
	}
	return ls
}

// wantLogCount checks that msg was logged exactly n times so far.
func wantLogCount(t *testing.T, b *lab.Appliance, msg string, n int, when string) {
	t.Helper()
	if ls := b.ProxyLog(msg); len(ls) != n {
		t.Errorf("%s: %q logged %d times, want %d:\n%v", when, msg, len(ls), n, ls)
	}
}

// wantFields checks a log line's fields (numbers as JSON gives them).
func wantFields(t *testing.T, l lab.LogLine, want map[string]any) {
	t.Helper()
	for k, v := range want {
		if l[k] != v {
			t.Errorf("log line %v: %s = %v (%T), want %v", l, k, l[k], l[k], v)
		}
	}
}

// ovlLasted is the end line's lasted field (slog writes durations in ns).
func ovlLasted(l lab.LogLine) time.Duration {
	f, _ := l["lasted"].(float64)
	return time.Duration(f)
}

var bypassedFlowsRE = regexp.MustCompile(`(?m)^bypassed flows: (\d+)`)

// bypassedFlows is the count `ghostwire status` prints (0 if no line).
func bypassedFlows(t *testing.T, b *lab.Appliance) (int, string) {
	t.Helper()
	out, _, err := b.StatusOutput()
	if err != nil {
		t.Fatalf("status: %v", err)
	}
	m := bypassedFlowsRE.FindStringSubmatch(out)
	if m == nil {
		return 0, out
	}
	n, _ := strconv.Atoi(m[1])
	return n, out
}

func TestOverload(t *testing.T) {
	t.Run("bypass", testOverloadBypass)
	t.Run("refuse", testOverloadRefuse)
}

// At max_connections the diversion switches: new connections cross the
// bridge untouched for their whole life, also after the overload ends;
// below 90% of the limit new connections are proxied again. One log line
// at the start, one at the end.
func testOverloadBypass(t *testing.T) {
	b := proxiedBoxWith(t, []string{"max_connections: 4", "overload: bypass"}, 80)
	fams := families(b)
	addrs := make([]string, len(fams))
	for i, f := range fams {
		addrs[i] = listenServer(t, b, f.server, "80", peerServer)
	}

	var held []*ovlConn
	for i := range 4 {
		h := ovlOpen(t, b, addrs[i%2])
		if !h.proxied() {
			t.Fatalf("connection %d below the limit: server saw the client's own %s: not proxied", i, h.peer)
		}
		held = append(held, h)
	}
	waitStatus(t, b, "ghostwire: overloaded (bypassing new connections)")
	start := waitLogCount(t, b, ovlStarted, 1)[0]
	wantFields(t, start, map[string]any{
		"reason": "connection limit", "active": 4.0, "max_connections": 4.0, "overload": "bypass", "ends_below": 3.0,
	})
	wantLogCount(t, b, ovlEnded, 0, "at the limit")

	// New connections, both families, while overloaded: bridged, working.
	var bypassed []*ovlConn
	for i := range 10 {
		h := ovlOpen(t, b, addrs[i%2])
		if h.proxied() {
			t.Errorf("connection %d during the overload: server saw %s for client %s: proxied, want bridged untouched", i, h.peer, h.local())
		}
		h.echo(t, 32<<10, fmt.Sprintf("during overload %d", i))
		bypassed = append(bypassed, h)
	}
	for _, h := range held {
		h.echo(t, 32<<10, "held during overload")
	}
	n, out := bypassedFlows(t, b)
	if n < len(bypassed) {
		t.Errorf("status counts %d bypassed flows, want at least %d:\n%s", n, len(bypassed), out)
	}
	if first, _, _ := strings.Cut(out, "\n"); first != "ghostwire: overloaded (bypassing new connections)" {
		t.Errorf("status during the overload: %q", first)
	}
	for _, set := range []string{"bypass4", "bypass6"} {
		elems := sh(t, b.Lab.Box, "nft", "list", "set", "bridge", "ghostwire", set)
		for _, h := range bypassed {
			a := h.c.LocalAddr().(*net.TCPAddr)
			if (a.IP.To4() != nil) != (set == "bypass4") {
				continue
			}
			if !strings.Contains(elems, fmt.Sprintf(" . %d . 80", a.Port)) {
				t.Errorf("bypassed flow from %s is not in set %s:\n%s", h.local(), set, elems)
			}
		}
	}
	wantLogCount(t, b, ovlStarted, 1, "after 10 connections during the overload")
	t.Logf("during the overload: %d bypassed flows in status, 1 start line", n)

	// Down to 3 of 4 (≤ 90%): the overload ends, once.
	held[0].end(t)
	waitConnLog(t, b, held[0].c.LocalAddr())
	end := waitLogCount(t, b, ovlEnded, 1)[0]
	wantFields(t, end, map[string]any{"reason": "connection limit", "active": 3.0, "refused": 0.0, "resource_failures": 0.0})
	t.Logf("overload ended: lasted %v", ovlLasted(end))
	waitStatus(t, b, "ghostwire: intercepting")
	// One more down, so that a new connection (the 4th) does not reach the
	// limit again.
	held[1].end(t)
	waitConnLog(t, b, held[1].c.LocalAddr())
	held = held[2:]

	// New connections are proxied again, both families.
	for i, addr := range addrs {
		h := ovlOpen(t, b, addr)
		if !h.proxied() {
			t.Errorf("new connection %d after the overload: server saw the client's own %s: not proxied", i, h.peer)
		}
		h.echo(t, 32<<10, "after overload")
		h.end(t)
		if l := waitConnLog(t, b, h.c.LocalAddr()); l["reason"] != "eof" {
			t.Errorf("proxied connection after the overload: %v", l)
		}
	}

	// The flows bypassed during the overload stay bridged: they keep
	// working (well past a window each) and never reach the proxy.
	for i, h := range bypassed {
		h.echo(t, 256<<10, fmt.Sprintf("after overload %d", i))
		h.end(t)
	}
	for _, h := range held {
		h.echo(t, 32<<10, "held after overload")
	}
	// The proxy logs in order of close: once this later proxied
	// connection's line is there, lines for the bypassed ones would be too.
	last := ovlOpen(t, b, addrs[0])
	last.end(t)
	waitConnLog(t, b, last.c.LocalAddr())
	for _, h := range bypassed {
		if ls := b.ConnLogFor(h.c.LocalAddr()); len(ls) != 0 {
			t.Errorf("bypassed connection %s went through the proxy: %v", h.local(), ls)
		}
	}
	wantLogCount(t, b, ovlStarted, 1, "at the end")
	wantLogCount(t, b, ovlEnded, 1, "at the end")
	for _, h := range held {
		h.end(t)
	}
}

// In refuse mode new connections at the limit are reset at once (the
// server never sees them) and proxied again once below 90%.
func testOverloadRefuse(t *testing.T) {
	b := proxiedBoxWith(t, []string{"max_connections: 2", "overload: refuse"}, 80)
	fams := families(b)
	var pc peerCounter
	addrs := make([]string, len(fams))
	for i, f := range fams {
		addrs[i] = listenServer(t, b, f.server, "80", pc.serve)
	}
	var held []*ovlConn
	for i := range 2 {
		h := ovlOpen(t, b, addrs[0])
		if !h.proxied() {
			t.Fatalf("connection %d below the limit is not proxied (server saw %s)", i, h.peer)
		}
		held = append(held, h)
	}
	waitStatus(t, b, "ghostwire: overloaded (refusing new connections)")
	start := waitLogCount(t, b, ovlStarted, 1)[0]
	wantFields(t, start, map[string]any{
		"reason": "connection limit", "active": 2.0, "max_connections": 2.0, "overload": "refuse", "ends_below": 1.0,
	})

	// The box answers for the server with resets, and IPv6 needs its
	// address past duplicate address detection to resolve the client.
	waitNoTentative(t, b.Lab.Box)
	seen := pc.count()
	var worst time.Duration
	for i := range 6 {
		addr := addrs[i%2]
		t0 := time.Now()
		c, err := lab.Dial(b.Lab.Client, "tcp", addr, 5*time.Second)
		d := time.Since(t0)
		worst = max(worst, d)
		if err == nil {
			// Accepted by someone: say whom, and make sure it is reset.
			c.SetReadDeadline(time.Now().Add(5 * time.Second))
			_, rerr := c.Read(make([]byte, 64))
			c.Close()
			t.Errorf("connection %d to %s during a refuse overload was accepted (then read: %v)", i, addr, rerr)
			continue
		}
		if !errors.Is(err, syscall.ECONNREFUSED) && !errors.Is(err, syscall.ECONNRESET) {
			t.Errorf("connection %d to %s during the overload: %v, want refused or reset", i, addr, err)
		}
		if d > 500*time.Millisecond {
			t.Errorf("connection %d to %s: refusal took %s", i, addr, d)
		}
	}
	t.Logf("refused connections: slowest refusal %s", worst)
	if got := pc.count(); got != seen {
		t.Errorf("the server accepted %d connections during the refuse overload", got-seen)
	}
	for _, h := range held {
		h.echo(t, 32<<10, "held during overload")
	}
	if st, _ := b.Status(); st != "ghostwire: overloaded (refusing new connections)" {
		t.Errorf("status after the refusals: %q", st)
	}
	wantLogCount(t, b, ovlStarted, 1, "after 6 refused connections")

	held[0].end(t)
	waitConnLog(t, b, held[0].c.LocalAddr())
	end := waitLogCount(t, b, ovlEnded, 1)[0]
	wantFields(t, end, map[string]any{"reason": "connection limit", "active": 1.0})
	t.Logf("overload ended: lasted %v, refused (by the proxy) %v", ovlLasted(end), end["refused"])
	waitStatus(t, b, "ghostwire: intercepting")
	// The other one too: with it, a new connection would reach the limit
	// again (and be proxied, starting a second overload).
	held[1].echo(t, 32<<10, "held after overload")
	held[1].end(t)
	waitConnLog(t, b, held[1].c.LocalAddr())

	for i, addr := range addrs {
		h := ovlOpen(t, b, addr)
		if !h.proxied() {
			t.Errorf("new connection %d after the overload is not proxied (server saw %s)", i, h.peer)
		}
		h.echo(t, 32<<10, "after overload")
		h.end(t)
		waitConnLog(t, b, h.c.LocalAddr())
	}
	wantLogCount(t, b, ovlStarted, 1, "at the end")
	wantLogCount(t, b, ovlEnded, 1, "at the end")
}
