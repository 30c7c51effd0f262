package proxy

import (
	"errors"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ghostwire/ghostwire/lab"
)

// TestClientPortKernel pins down, in the lab's box, the kernel behaviour
// the upstream dialer's choice of port rests on: when the client's port
// can be kept, which conflicts fail bind (EADDRINUSE) or connect
// (EADDRNOTAVAIL), that a box TIME_WAIT with the same 4-tuple is recycled
// exactly when the old connection had timestamps whatever tcp_tw_reuse
// says, and that connectTransparent falls back to a port of the kernel's
// in every conflict.
func TestClientPortKernel(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("skipping: needs root (CAP_NET_ADMIN, CAP_SYS_ADMIN) to build network namespaces; run as root: go test -run TestClientPortKernel ./proxy/")
	}
	if testing.Short() {
		t.Skip("skipping namespace integration test in -short mode")
	}
	for _, tool := range []string{"ip", "nft", "ss"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("skipping: %s not installed (apt-get install iproute2 nftables)", tool)
		}
	}
	l := newClientPortLab(t)
	srv := startPortServer(t, l.Server)
	for _, fam := range []struct {
		name           string
		client, server netip.Addr
		network        string
		base           uint16
	}{
		{"ipv4", l.ClientIP4, l.ServerIP4, "tcp4", 40000},
		{"ipv6", l.ClientIP6, l.ServerIP6, "tcp6", 45000},
	} {
		t.Run(fam.name, func(t *testing.T) {
			port := fam.base
			next := func() netip.AddrPort { port++; return netip.AddrPortFrom(fam.client, port) }
			srv80, srv81 := netip.AddrPortFrom(fam.server, 80), netip.AddrPortFrom(fam.server, 81)

			client := next()
			up := dialUpstream(t, l, client, srv80)
			wantKept(t, up, srv.accept(t), client)

			t.Run("second server, same client port", func(t *testing.T) {
				// Takes SO_REUSEADDR on both sockets: without it this
				// bind fails with EADDRINUSE.
				wantKept(t, dialUpstream(t, l, client, srv81), srv.accept(t), client)
			})
			t.Run("same 4-tuple still open", func(t *testing.T) {
				wantFallback(t, dialUpstream(t, l, client, srv80), srv.accept(t), client, unix.EADDRNOTAVAIL)
			})
			t.Run("box TIME_WAIT of the 4-tuple", func(t *testing.T) {
				for _, ts := range []string{"1", "0"} {
					for _, reuse := range []string{"0", "1", "2"} {
						t.Run("server timestamps "+ts+", box tcp_tw_reuse "+reuse, func(t *testing.T) {
							l.Server.SysctlT(t, "net.ipv4.tcp_timestamps", ts)
							l.Box.SysctlT(t, "net.ipv4.tcp_tw_reuse", reuse)
							client := next()
							first := dialUpstream(t, l, client, srv80)
							wantKept(t, first, srv.accept(t), client)
							closeFirst(t, first, srv.last)
							wantTimeWait(t, l.Box, client, srv80)
							second := dialUpstream(t, l, client, srv80)
							if ts == "1" {
								// Recycled at once: a bound socket's connect
								// takes over a TIME_WAIT with timestamps
								// (PAWS guards the new connection).
								wantKept(t, second, srv.accept(t), client)
							} else {
								wantFallback(t, second, srv.accept(t), client, unix.EADDRNOTAVAIL)
							}
						})
					}
				}
			})
			t.Run("the box's accepted socket of the client's connection", func(t *testing.T) {
				// The listener side holds (server, client) as its local
				// and remote addresses, the upstream (client, server): no
				// conflict, and each gets its own packets.
				lfd := boxListener(t, l, fam.network)
				client := next()
				var c *net.TCPConn
				if err := l.Client.Do(func() error {
					d := net.Dialer{LocalAddr: net.TCPAddrFromAddrPort(client), Timeout: 10 * time.Second}
					nc, err := d.Dial(fam.network, srv80.String())
					if err == nil {
						c = nc.(*net.TCPConn)
					}
					return err
				}); err != nil {
					t.Fatal(err)
				}
				defer c.Close()
				if !pollFD(lfd, unix.POLLIN) {
					t.Fatal("the box's listener got no connection")
				}
				afd, src, err := acceptFD(lfd)
				if err != nil {
					t.Fatal(err)
				}
				defer unix.Close(afd)
				if src != client {
					t.Fatalf("accepted a connection from %v, want %v", src, client)
				}
				up := dialUpstream(t, l, client, srv80)
				sc := srv.accept(t)
				wantKept(t, up, sc, client)
				if _, err := sc.Write([]byte("s")); err != nil {
					t.Fatal(err)
				}
				wantRead(t, up.fd, "s")
				if _, err := c.Write([]byte("c")); err != nil {
					t.Fatal(err)
				}
				wantRead(t, afd, "c")
			})
			t.Run("client port is a box listener's", func(t *testing.T) {
				boxListener(t, l, fam.network)
				client := netip.AddrPortFrom(fam.client, nsProxyPort)
				wantFallback(t, dialUpstream(t, l, client, srv80), srv.accept(t), client, unix.EADDRINUSE)
			})
			t.Run("a fallback's port stays free for a client's", func(t *testing.T) {
				client := next()
				dialUpstream(t, l, client, srv80)
				srv.accept(t)
				fb := dialUpstream(t, l, client, srv80)
				fbPort := srv.accept(t).RemoteAddr().(*net.TCPAddr).AddrPort().Port()
				if fb.notKept == nil {
					t.Fatal("the second socket of one 4-tuple kept the client's port")
				}
				// The fallback socket set SO_REUSEADDR too, so a client
				// using the port the kernel gave it can still have it.
				other := netip.AddrPortFrom(fam.client, fbPort)
				wantKept(t, dialUpstream(t, l, other, srv81), srv.accept(t), other)
			})
		})
	}
}

// upstreamConn is connectTransparent's result once connected.
type upstreamConn struct {
	fd      int
	notKept error
}

// dialUpstream runs connectTransparent in the box and waits for the
// connect to end, failing t unless it succeeded. The socket is closed when
// the test ends.
func dialUpstream(t *testing.T, l *lab.Lab, client, server netip.AddrPort) *upstreamConn {
	t.Helper()
	u := &upstreamConn{}
	var err error
	if nsErr := l.Box.Do(func() error {
		u.fd, u.notKept, err = connectTransparent(client, server, 0)
		return nil
	}); nsErr != nil {
		t.Fatal(nsErr)
	}
	if err != nil {
		t.Fatalf("connecting %v to %v: %v (client port not kept: %v)", client, server, err, u.notKept)
	}
	t.Cleanup(func() {
		if u.fd >= 0 {
			unix.Close(u.fd)
		}
	})
	if !pollFD(u.fd, unix.POLLOUT) {
		t.Fatalf("connect from %v to %v did not finish", client, server)
	}
	if err := sockError(u.fd); err != nil {
		t.Fatalf("connect from %v to %v: %v", client, server, err)
	}
	return u
}

// wantKept checks that u kept the client's port: sc, the server's side of
// u, comes from client.
func wantKept(t *testing.T, u *upstreamConn, sc *net.TCPConn, client netip.AddrPort) {
	t.Helper()
	if u.notKept != nil {
		t.Errorf("client port not kept: %v", u.notKept)
	}
	if got := sc.RemoteAddr().(*net.TCPAddr).AddrPort(); got != client {
		t.Errorf("the server saw %v, want the client's %v", got, client)
	}
}

// wantFallback checks that u could not keep the client's port for errno
// and connected from another port of the client's IP.
func wantFallback(t *testing.T, u *upstreamConn, sc *net.TCPConn, client netip.AddrPort, errno unix.Errno) {
	t.Helper()
	if !errors.Is(u.notKept, errno) {
		t.Errorf("client port not kept for %v, want %v", u.notKept, errno)
	}
	got := sc.RemoteAddr().(*net.TCPAddr).AddrPort()
	if got.Addr() != client.Addr() || got.Port() == client.Port() {
		t.Errorf("the server saw %v, want %v with another port", got, client.Addr())
	}
}

// closeFirst closes u's socket first: its FIN, then the server's (sc's
// close), so u's connection ends in TIME_WAIT on the box.
func closeFirst(t *testing.T, u *upstreamConn, sc *net.TCPConn) {
	t.Helper()
	fd := u.fd
	if err := unix.Shutdown(fd, unix.SHUT_WR); err != nil {
		t.Fatal(err)
	}
	sc.SetDeadline(time.Now().Add(ioDeadline))
	if _, err := io.Copy(io.Discard, sc); err != nil {
		t.Fatalf("server reading to the box's FIN: %v", err)
	}
	sc.Close()
	wantRead(t, fd, "")
	unix.Close(fd)
	u.fd = -1
}

// wantTimeWait fails t unless the box holds a TIME_WAIT socket from local
// to remote.
func wantTimeWait(t *testing.T, box *lab.NS, local, remote netip.AddrPort) {
	t.Helper()
	out, err := box.Command(t.Context(), "ss", "-Htn", "state", "time-wait",
		"src", local.String(), "dst", remote.String()).CombinedOutput()
	if err != nil {
		t.Fatalf("ss: %v: %s", err, out)
	}
	if len(strings.TrimSpace(string(out))) == 0 {
		t.Fatalf("the box holds no TIME_WAIT from %v to %v", local, remote)
	}
}

// wantRead reads fd until it has want ("" means until EOF) or fails t.
func wantRead(t *testing.T, fd int, want string) {
	t.Helper()
	var got []byte
	b := make([]byte, 64)
	for {
		if !pollFD(fd, unix.POLLIN) {
			t.Fatalf("read %q, want %q", got, want)
		}
		n, err := readFD(fd, b)
		if err == unix.EAGAIN {
			continue
		}
		if err != nil {
			t.Fatalf("reading: %v", err)
		}
		if n == 0 {
			if want != "" {
				t.Fatalf("EOF after %q, want %q", got, want)
			}
			return
		}
		got = append(got, b[:n]...)
		if want != "" && len(got) >= len(want) {
			if string(got) != want {
				t.Fatalf("read %q, want %q", got, want)
			}
			return
		}
	}
}

// pollFD waits up to ioDeadline for events on fd.
func pollFD(fd int, events int16) bool {
	deadline := time.Now().Add(ioDeadline)
	for time.Now().Before(deadline) {
		n, err := unix.Poll([]unix.PollFd{{Fd: int32(fd), Events: events}}, int(time.Until(deadline).Milliseconds()))
		if err == unix.EINTR {
			continue
		}
		return err == nil && n > 0
	}
	return false
}

// portServer accepts on ports 80 and 81 (v4 and v6) in a namespace and
// hands the connections over in order.
type portServer struct {
	conns chan *net.TCPConn
	last  *net.TCPConn // the one accept returned last
}

func startPortServer(t *testing.T, ns *lab.NS) *portServer {
	s := &portServer{conns: make(chan *net.TCPConn, 16)}
	done := make(chan struct{})
	var lns []net.Listener
	t.Cleanup(func() {
		for _, ln := range lns {
			ln.Close()
		}
		close(done)
	})
	for _, a := range []struct{ network, addr string }{
		{"tcp4", "0.0.0.0:80"}, {"tcp4", "0.0.0.0:81"}, {"tcp6", "[::]:80"}, {"tcp6", "[::]:81"},
	} {
		var ln net.Listener
		if err := ns.Do(func() (err error) { ln, err = net.Listen(a.network, a.addr); return err }); err != nil {
			t.Fatalf("server listening on %s: %v", a.addr, err)
		}
		lns = append(lns, ln)
		go func() {
			for {
				c, err := ln.Accept()
				if err != nil {
					return
				}
				select {
				case s.conns <- c.(*net.TCPConn):
				case <-done:
					c.Close()
					return
				}
			}
		}()
	}
	return s
}

// accept returns the server's next connection, closed when the test ends.
func (s *portServer) accept(t *testing.T) *net.TCPConn {
	t.Helper()
	select {
	case c := <-s.conns:
		t.Cleanup(func() { c.Close() })
		s.last = c
		return c
	case <-time.After(ioDeadline):
		t.Fatal("the server got no connection")
		return nil
	}
}

// newClientPortLab is newLab with ports 80 and 81 diverted.
func newClientPortLab(t *testing.T) *lab.Lab {
	t.Helper()
	return newLabWith(t, func(ruleset string) string {
		r := strings.ReplaceAll(ruleset, "port 80 ", "port { 80, 81 } ")
		if strings.Count(r, "{ 80, 81 }") != 3 {
			t.Fatalf("the diversion of port 80 changed shape; divert 81 too:\n%s", r)
		}
		return r
	})
}

// boxListener is a transparent listener on the proxy's port in the box,
// closed when the test ends.
func boxListener(t *testing.T, l *lab.Lab, network string) int {
	t.Helper()
	var lfd int
	if err := l.Box.Do(func() (err error) {
		lfd, _, err = listenTransparent(network, nsProxyPort, 0)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(lfd) })
	return lfd
}
