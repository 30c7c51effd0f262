package e2e

import (
	"errors"
	"fmt"
	"net"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/ghostwire/ghostwire/lab"
)

// dialFailConnect connects to addr through the proxy: the handshake
// completes (TPROXY's listener answers for the server); then the client
// must be reset. It returns the client's address and how long after the
// handshake the reset came.
//
// A reset that comes within microseconds can beat Go's connect to the
// socket's error: connect then fails with ECONNRESET, which (unlike
// ECONNREFUSED, a reset answering the SYN) says the handshake had
// completed. Its address is not returned then, so the client socket's
// address is taken from a Control hook, and the latency counts from the
// start of the dial.
func dialFailConnect(t *testing.T, b *lab.Appliance, addr string) (net.Addr, time.Duration) {
	t.Helper()
	return dialFailConnectFrom(t, b, addr, 0)
}

// dialFailConnectFrom is dialFailConnect from the client's port (0: one
// the kernel chooses).
func dialFailConnectFrom(t *testing.T, b *lab.Appliance, addr string, port int) (net.Addr, time.Duration) {
	t.Helper()
	var local net.Addr
	start := time.Now()
	var c net.Conn
	err := b.Lab.Client.Do(func() (err error) {
		d := net.Dialer{Timeout: 5 * time.Second, Control: func(_, _ string, rc syscall.RawConn) error {
			// Bind to a kernel-chosen port first, so the address is
			// known even if connect fails.
			var berr error
			rc.Control(func(fd uintptr) {
				if berr = syscall.Bind(int(fd), &syscall.SockaddrInet4{Port: port}); berr != nil {
					return
				}
				sa, gerr := syscall.Getsockname(int(fd))
				if gerr != nil {
					berr = gerr
					return
				}
				ip := sa.(*syscall.SockaddrInet4)
				local = &net.TCPAddr{IP: b.Lab.ClientIP4.AsSlice(), Port: ip.Port}
			})
			return berr
		}}
		c, err = d.Dial("tcp4", addr)
		return err
	})
	if errors.Is(err, syscall.ECONNRESET) {
		d := time.Since(start)
		t.Logf("client of %s: reset already in connect (%v)", addr, err)
		return local, d
	}
	if err != nil {
		t.Fatalf("dial %s: %v: the proxy should have completed the handshake", addr, err)
	}
	defer c.Close()
	connected := time.Now()
	c.SetReadDeadline(connected.Add(15 * time.Second))
	n, err := c.Read(make([]byte, 64))
	d := time.Since(connected)
	if !errors.Is(err, syscall.ECONNRESET) {
		t.Fatalf("client of %s: read returned %d bytes, %v after %s, want ECONNRESET", addr, n, err, d)
	}
	return c.LocalAddr(), d
}

// dialFailReason waits for the proxy's line for client local and checks
// its reason and server.
func dialFailReason(t *testing.T, b *lab.Appliance, local net.Addr, server, want string) {
	t.Helper()
	l := waitConnLog(t, b, local)
	if l["reason"] != want || l["server"] != server || l["bytes_up"] != 0.0 || l["bytes_down"] != 0.0 {
		t.Errorf("proxy log line %v, want reason %q for server %s and no bytes", l, want, server)
	}
}

// When the upstream dial fails, the accepted client is reset at once (a
// connection that accepted and then hangs would be worse than the server's
// own refusal) and the log says why.
func TestDialFailures(t *testing.T) {
	t.Run("refused", func(t *testing.T) {
		b := proxiedBox(t, 80)
		addr := net.JoinHostPort(b.Lab.ServerIP4.String(), "80") // nothing listens
		local, d := dialFailConnect(t, b, addr)
		t.Logf("reset %s after the handshake", d)
		if d > time.Second {
			t.Errorf("reset came %s after the handshake, want at once", d)
		}
		dialFailReason(t, b, local, addr, "dial: refused")
	})

	t.Run("timeout", func(t *testing.T) {
		b := proxiedBox(t, 80)
		// The server drops the SYNs: the dial times out (connect_timeout 2s).
		tbl := b.Lab.Prefix + "drop"
		sh(t, b.Lab.Server, "nft", "add", "table", "inet", tbl)
		sh(t, b.Lab.Server, "nft", "add", "chain", "inet", tbl, "input", "{ type filter hook input priority 0; policy accept; }")
		sh(t, b.Lab.Server, "nft", "add", "rule", "inet", tbl, "input", "tcp", "dport", "80", "counter", "drop")
		addr := listenServer(t, b, b.Lab.ServerIP4.String(), "80", echoServer)
		local, d := dialFailConnect(t, b, addr)
		t.Logf("reset %s after the handshake (connect_timeout 2s)", d)
		if d < 1900*time.Millisecond || d > 3500*time.Millisecond {
			t.Errorf("reset came %s after the handshake, want about connect_timeout (2s)", d)
		}
		dialFailReason(t, b, local, addr, "dial: timeout")
		if out := sh(t, b.Lab.Server, "nft", "list", "chain", "inet", tbl, "input"); strings.Contains(out, "counter packets 0 ") {
			t.Errorf("the server dropped no SYN: did the proxy dial?\n%s", out)
		}
	})

	t.Run("no route", func(t *testing.T) {
		b := proxiedBox(t, 80)
		// An address only the server has (on its loopback: this kernel
		// may lack dummy links, and lo goes with the namespace), which the
		// client routes via the server's lab address: the client's SYN
		// crosses the bridge to the box, and the box has no route to it.
		const far = "10.99.0.1"
		sh(t, b.Lab.Server, "ip", "addr", "add", far+"/32", "dev", "lo")
		sh(t, b.Lab.Client, "ip", "route", "add", far+"/32", "via", b.Lab.ServerIP4.String())
		if out, err := b.Lab.Box.Command(t.Context(), "ip", "route", "get", far).CombinedOutput(); err == nil {
			t.Fatalf("the box has a route to %s, the test needs none:\n%s", far, out)
		}
		addr := listenServer(t, b, far, "80", echoServer)
		local, d := dialFailConnect(t, b, addr)
		t.Logf("reset %s after the handshake", d)
		if d > time.Second {
			t.Errorf("reset came %s after the handshake, want at once", d)
		}
		dialFailReason(t, b, local, addr, "dial: no route (network unreachable)")
	})

	t.Run("local port exhaustion", func(t *testing.T) {
		b := proxiedBox(t, 80)
		// The upstream leg keeps the client's port unless the box cannot
		// bind it (a listener of the box's own on that port, here), then
		// takes one the kernel chooses: one left (the box's namespace
		// goes with the lab).
		if err := b.Lab.Box.Sysctl("net.ipv4.ip_local_port_range", "40000 40000"); err != nil {
			t.Fatal(err)
		}
		const heldPort, failPort = 41001, 41002
		for _, p := range []int{heldPort, failPort} {
			ln, err := lab.Listen(b.Lab.Box, "tcp", fmt.Sprintf(":%d", p))
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { ln.Close() })
		}
		addr := listenServer(t, b, b.Lab.ServerIP4.String(), "80", peerServer)
		held := ovlOpenFrom(t, b, addr, heldPort)
		if want := net.JoinHostPort(b.Lab.ClientIP4.String(), "40000"); held.peer != want {
			t.Fatalf("the held connection reached the server from %s, want %s (the one port left)", held.peer, want)
		}
		held.echo(t, 1<<10, "held")
		local, d := dialFailConnectFrom(t, b, addr, failPort)
		t.Logf("reset %s after the handshake", d)
		if d > time.Second {
			t.Errorf("reset came %s after the handshake, want at once", d)
		}
		dialFailReason(t, b, local, addr, "dial: no local port free for this client and server (EADDRNOTAVAIL)")
		held.echo(t, 1<<10, "held after")
		held.end(t)
	})
}
