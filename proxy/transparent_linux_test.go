package proxy

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/ghostwire/ghostwire/lab"
)

// nsProxyPort is the proxy's TPROXY port in the lab's box.
const nsProxyPort = 9876

// nsRuleset is the diversion at its smallest, the same mechanism the rules
// package installs: frames of port 80 get the bridge's MAC and go up to the
// box (both directions), where pure SYNs go to the proxy and packets of the
// proxy's own transparent sockets are marked for local delivery.
func nsRuleset(l *lab.Lab, brMAC net.HardwareAddr) string {
	return fmt.Sprintf(`table bridge t {
	chain p {
		type filter hook prerouting priority dstnat;
		iifname %q tcp dport 80 ether daddr set %s meta pkttype set host
		iifname %q tcp sport 80 ether daddr set %s meta pkttype set host
	}
}
table inet t {
	chain p {
		type filter hook prerouting priority mangle;
		tcp dport 80 tcp flags & (fin|syn|rst|ack) == syn tproxy to :%d meta mark set 1 accept
		meta l4proto tcp socket transparent 1 meta mark set 1 accept
	}
}
`, l.ClientNIC, brMAC, l.ServerNIC, brMAC, nsProxyPort)
}

// TestTransparentInNamespaces proves transparency end to end with the real
// listener and dialer: the server sees the client's IP, the client sees the
// server's address, and the connection really went through the proxy (not
// merely routed by the box).
func TestTransparentInNamespaces(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("skipping: needs root (CAP_NET_ADMIN, CAP_SYS_ADMIN) to build network namespaces; run as root: go test -run TestTransparentInNamespaces ./proxy/")
	}
	if testing.Short() {
		t.Skip("skipping namespace integration test in -short mode")
	}
	for _, tool := range []string{"ip", "nft"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("skipping: %s not installed (apt-get install iproute2 nftables)", tool)
		}
	}
	checkGoroutines(t)
	l := newLab(t)

	logs := newLogSink()
	dial := dialTransparent
	p, err := New(Config{
		Port:           nsProxyPort,
		ConnectTimeout: 5 * time.Second,
		IdleTimeout:    time.Minute,
		Logger:         slog.New(slog.NewJSONHandler(logs, nil)),
		// The production dialer, run in the box namespace: a new socket
		// belongs to its creating thread's namespace, and the proxy's
		// goroutines run on threads of the test's namespace.
		Dial: func(ctx context.Context, network string, local, remote *net.TCPAddr) (c *net.TCPConn, err error) {
			if nsErr := l.Box.Do(func() error {
				c, err = dial(ctx, network, local, remote)
				return nil
			}); nsErr != nil {
				return nil, nsErr
			}
			return c, err
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	// Listeners keep the namespace they were created in.
	if err := l.Box.Do(p.Start); err != nil {
		t.Fatalf("starting proxy in the box namespace: %v", err)
	}
	served := make(chan error, 1)
	go func() { served <- p.Serve(context.Background()) }()
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := p.Shutdown(ctx); err != nil {
			t.Errorf("Shutdown: %v", err)
		}
		if err := <-served; err != nil {
			t.Errorf("Serve: %v", err)
		}
	})

	startPeerReporter(t, l.Server)

	for _, tc := range []struct {
		name, client, server string
	}{
		{"ipv4", l.ClientIP4.String(), l.ServerIP4.String()},
		{"ipv6", l.ClientIP6.String(), l.ServerIP6.String()},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := p.Stats().Accepted
			server := net.JoinHostPort(tc.server, "80")
			var c net.Conn
			if err := l.Client.Do(func() (err error) {
				c, err = net.DialTimeout("tcp", server, 5*time.Second)
				return err
			}); err != nil {
				t.Fatalf("client dialing %s: %v", server, err)
			}
			defer c.Close()
			c.SetDeadline(time.Now().Add(ioDeadline))
			if got := c.RemoteAddr().String(); got != server {
				t.Errorf("client's remote address = %s, want the server %s", got, server)
			}
			line, err := bufio.NewReader(c).ReadString('\n')
			if err != nil {
				t.Fatalf("reading the server's report: %v", err)
			}
			seen, _, err := net.SplitHostPort(strings.TrimSpace(line))
			if err != nil {
				t.Fatalf("server reported %q: %v", line, err)
			}
			if seen != tc.client {
				t.Errorf("server saw the connection from %s, want the client's %s", seen, tc.client)
			}
			c.Close()

			// Proof it was relayed, not routed: the proxy accepted it and
			// logged it as this client's connection to this server.
			if got := p.Stats().Accepted; got != before+1 {
				t.Errorf("proxy accepted %d connections, want 1", got-before)
			}
			want := c.LocalAddr().String()
			found := false
			for _, r := range logs.closed(t, int(before)+1) {
				if field(r, "client") == want {
					found = true
					if field(r, "server") != server || field(r, "reason") != "eof" {
						t.Errorf("log record %v, want server %s and reason eof", r, server)
					}
				}
			}
			if !found {
				t.Errorf("no log record for client %s", want)
			}
		})
	}

	t.Run("direct connection refused", func(t *testing.T) {
		var c net.Conn
		err := l.Client.Do(func() (err error) {
			c, err = net.DialTimeout("tcp", net.JoinHostPort(l.BoxIP4.Addr().String(), fmt.Sprint(nsProxyPort)), 5*time.Second)
			return err
		})
		if err == nil {
			defer c.Close()
			c.SetDeadline(time.Now().Add(ioDeadline))
			_, err = c.Read(make([]byte, 1))
		}
		wantReset(t, err)
		if st := p.Stats(); st.Refused != 1 {
			t.Errorf("Refused = %d, want 1", st.Refused)
		}
	})
}

// startPeerReporter runs a server on port 80 (v4 and v6) in ns that writes
// back the peer address it sees, then waits for the client's EOF.
func startPeerReporter(t *testing.T, ns *lab.NS) {
	var lns []net.Listener
	if err := ns.Do(func() error {
		for _, a := range []struct{ network, addr string }{{"tcp4", "0.0.0.0:80"}, {"tcp6", "[::]:80"}} {
			ln, err := net.Listen(a.network, a.addr)
			if err != nil {
				return err
			}
			lns = append(lns, ln)
		}
		return nil
	}); err != nil {
		for _, ln := range lns {
			ln.Close()
		}
		t.Fatalf("server listening: %v", err)
	}
	var wg sync.WaitGroup
	for _, ln := range lns {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				c, err := ln.Accept()
				if err != nil {
					return
				}
				wg.Add(1)
				go func() {
					defer wg.Done()
					defer c.Close()
					c.SetDeadline(time.Now().Add(ioDeadline))
					fmt.Fprintf(c, "%s\n", c.RemoteAddr())
					io.Copy(io.Discard, c)
				}()
			}
		}()
	}
	t.Cleanup(func() {
		for _, ln := range lns {
			ln.Close()
		}
		wg.Wait()
	})
}

// newLab builds the lab (client, box, server namespaces, deleted when the
// test ends) with the box bridging its two ports, an address on the
// bridge, the diversion above and the policy routing that delivers marked
// packets locally.
func newLab(t *testing.T) *lab.Lab {
	t.Helper()
	return newLabWith(t, func(ruleset string) string { return ruleset })
}

// newLabWith is newLab with the diversion's ruleset changed by edit first.
func newLabWith(t *testing.T, edit func(ruleset string) string) *lab.Lab {
	t.Helper()
	l := lab.NewT(t)
	br := l.Prefix + "br"
	if err := l.PlainBridge(br); err != nil {
		t.Fatal(err)
	}
	var brMAC net.HardwareAddr
	if err := l.Box.Do(func() error {
		link, err := netlink.LinkByName(br)
		if err != nil {
			return err
		}
		brMAC = link.Attrs().HardwareAddr
		return nil
	}); err != nil {
		t.Fatalf("reading %s's MAC: %v", br, err)
	}
	for _, args := range [][]string{
		{"addr", "add", l.BoxIP4.String(), "dev", br},
		{"addr", "add", l.BoxIP6.String(), "dev", br, "nodad"},
		{"rule", "add", "fwmark", "1", "lookup", "100"},
		{"route", "add", "local", "0.0.0.0/0", "dev", "lo", "table", "100"},
		{"-6", "rule", "add", "fwmark", "1", "lookup", "100"},
		{"-6", "route", "add", "local", "::/0", "dev", "lo", "table", "100"},
	} {
		run(t, l.Box, "", "ip", args...)
	}
	run(t, l.Box, edit(nsRuleset(l, brMAC)), "nft", "-f", "-")
	// Until the hosts' IPv6 addresses finish duplicate address detection
	// the first IPv6 SYN waits for a neighbour retransmit.
	for _, ns := range []*lab.NS{l.Client, l.Box, l.Server} {
		if err := ns.WaitNoTentative(10 * time.Second); err != nil {
			t.Fatal(err)
		}
	}
	return l
}

// run executes a command in ns with stdin, failing the test with its output.
func run(t *testing.T, ns *lab.NS, stdin, name string, args ...string) {
	t.Helper()
	cmd := ns.Command(t.Context(), name, args...)
	cmd.Stdin = strings.NewReader(stdin)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("%s %s: %v: %s", name, strings.Join(args, " "), err, out)
	}
}

// dialTransparent connects from the client's IP with Go's dialer, on the
// calling thread (so in the namespace it runs in): the proxy's own dial
// runs on its loop's thread, which is in the test's namespace, not the
// box's.
func dialTransparent(ctx context.Context, network string, local, remote *net.TCPAddr) (*net.TCPConn, error) {
	d := &net.Dialer{
		LocalAddr: local,
		Control: func(network, _ string, rc syscall.RawConn) error {
			var err error
			rc.Control(func(fd uintptr) {
				if err = setTransparent(fd, network == "tcp6"); err == nil {
					err = setBindNoPort(fd)
				}
			})
			return err
		},
		KeepAlive: -1,
	}
	d.SetMultipathTCP(false)
	c, err := d.DialContext(ctx, network, remote.String())
	if err != nil {
		return nil, err
	}
	return c.(*net.TCPConn), nil
}
