package proxy

import (
	"bufio"
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vishvananda/netns"
)

// The namespaced topology: client ── box ── server, routed through box.
// Addresses are documentation prefixes that exist only inside the test's
// own namespaces.
const (
	nsProxyPort = 9876
	clientV4    = "192.0.2.1"
	boxClientV4 = "192.0.2.126"
	boxServerV4 = "192.0.2.129"
	serverV4    = "192.0.2.130"
	clientV6    = "2001:db8:1::1"
	boxClientV6 = "2001:db8:1::ff"
	boxServerV6 = "2001:db8:2::ff"
	serverV6    = "2001:db8:2::2"
)

// The minimal diversion: pure SYNs to :80 go to the proxy; packets of the
// proxy's own transparent sockets (the server's replies to the client's
// address) are marked for local delivery.
var nsRuleset = fmt.Sprintf(`table inet t {
	chain p {
		type filter hook prerouting priority mangle;
		tcp dport 80 tcp flags & (fin|syn|rst|ack) == syn tproxy to :%d meta mark set 1 accept
		meta l4proto tcp socket transparent 1 meta mark set 1 accept
	}
}
`, nsProxyPort)

type topology struct {
	client, box, server netns.NsHandle
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
	topo := newTopology(t)

	logs := newLogSink()
	dial := dialTransparent(0)
	p, err := New(Config{
		Port:           nsProxyPort,
		ConnectTimeout: 5 * time.Second,
		IdleTimeout:    time.Minute,
		Logger:         slog.New(slog.NewJSONHandler(logs, nil)),
		// The production dialer, run in the box namespace: a new socket
		// belongs to its creating thread's namespace, and the proxy's
		// goroutines run on threads of the test's namespace.
		Dial: func(ctx context.Context, network string, local, remote *net.TCPAddr) (c *net.TCPConn, err error) {
			if nsErr := inNetns(topo.box, func() error {
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
	if err := inNetns(topo.box, p.Start); err != nil {
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

	startPeerReporter(t, topo.server)

	for _, tc := range []struct {
		name, client, server string
	}{
		{"ipv4", clientV4, serverV4},
		{"ipv6", clientV6, serverV6},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := p.Stats().Accepted
			server := net.JoinHostPort(tc.server, "80")
			var c net.Conn
			if err := inNetns(topo.client, func() (err error) {
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
		err := inNetns(topo.client, func() (err error) {
			c, err = net.DialTimeout("tcp", net.JoinHostPort(boxClientV4, fmt.Sprint(nsProxyPort)), 5*time.Second)
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
func startPeerReporter(t *testing.T, ns netns.NsHandle) {
	var lns []net.Listener
	if err := inNetns(ns, func() error {
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

// newTopology builds three namespaces named gwp<hex>-{c,b,s} and deletes
// them when the test ends.
func newTopology(t *testing.T) *topology {
	t.Helper()
	var rnd [3]byte
	rand.Read(rnd[:])
	prefix := "gwp" + hex.EncodeToString(rnd[:])
	c, b, s := prefix+"-c", prefix+"-b", prefix+"-s"
	for _, ns := range []string{c, b, s} {
		run(t, "", "ip", "netns", "add", ns)
		t.Cleanup(func() {
			if out, err := exec.Command("ip", "netns", "del", ns).CombinedOutput(); err != nil {
				t.Errorf("deleting namespace %s: %v: %s", ns, err, out)
			}
		})
	}
	// No duplicate address detection: while it runs (~1 s after link up)
	// neighbour solicitations can go unanswered and the first SYN waits
	// for a retransmit.
	for _, ns := range []string{c, b, s} {
		run(t, "", "ip", "netns", "exec", ns, "sysctl", "-q", "-w", "net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0")
	}
	for _, args := range [][]string{
		// Links are created inside the namespaces: their names never
		// touch the host's.
		{"-n", c, "link", "add", "c0", "type", "veth", "peer", "name", "b0", "netns", b},
		{"-n", s, "link", "add", "s0", "type", "veth", "peer", "name", "b1", "netns", b},
		{"-n", c, "addr", "add", clientV4 + "/25", "dev", "c0"},
		{"-n", c, "addr", "add", clientV6 + "/64", "dev", "c0", "nodad"},
		{"-n", b, "addr", "add", boxClientV4 + "/25", "dev", "b0"},
		{"-n", b, "addr", "add", boxClientV6 + "/64", "dev", "b0", "nodad"},
		{"-n", b, "addr", "add", boxServerV4 + "/25", "dev", "b1"},
		{"-n", b, "addr", "add", boxServerV6 + "/64", "dev", "b1", "nodad"},
		{"-n", s, "addr", "add", serverV4 + "/25", "dev", "s0"},
		{"-n", s, "addr", "add", serverV6 + "/64", "dev", "s0", "nodad"},
		{"-n", c, "link", "set", "c0", "up"},
		{"-n", c, "link", "set", "lo", "up"},
		{"-n", b, "link", "set", "b0", "up"},
		{"-n", b, "link", "set", "b1", "up"},
		{"-n", b, "link", "set", "lo", "up"},
		{"-n", s, "link", "set", "s0", "up"},
		{"-n", s, "link", "set", "lo", "up"},
		{"-n", c, "route", "add", "default", "via", boxClientV4},
		{"-n", c, "-6", "route", "add", "default", "via", boxClientV6},
		{"-n", s, "route", "add", "default", "via", boxServerV4},
		{"-n", s, "-6", "route", "add", "default", "via", boxServerV6},
		// Diverted packets are delivered locally: marked ones look up a
		// table where every address is local.
		{"-n", b, "rule", "add", "fwmark", "1", "lookup", "100"},
		{"-n", b, "route", "add", "local", "0.0.0.0/0", "dev", "lo", "table", "100"},
		{"-n", b, "-6", "rule", "add", "fwmark", "1", "lookup", "100"},
		{"-n", b, "-6", "route", "add", "local", "::/0", "dev", "lo", "table", "100"},
	} {
		run(t, "", "ip", args...)
	}
	run(t, "", "ip", "netns", "exec", b, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1")
	run(t, nsRuleset, "ip", "netns", "exec", b, "nft", "-f", "-")

	topo := &topology{}
	for _, x := range []struct {
		h    *netns.NsHandle
		name string
	}{{&topo.client, c}, {&topo.box, b}, {&topo.server, s}} {
		h, err := netns.GetFromName(x.name)
		if err != nil {
			t.Fatalf("opening namespace %s: %v", x.name, err)
		}
		*x.h = h
		t.Cleanup(func() { h.Close() })
	}
	return topo
}

// run executes a command with stdin, failing the test with its output.
func run(t *testing.T, stdin, name string, args ...string) {
	t.Helper()
	cmd := exec.Command(name, args...)
	cmd.Stdin = strings.NewReader(stdin)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("%s %s: %v: %s", name, strings.Join(args, " "), err, out)
	}
}

// inNetns runs fn on this goroutine's thread switched into ns. Sockets
// created by fn stay in ns for their whole life.
func inNetns(ns netns.NsHandle, fn func() error) error {
	runtime.LockOSThread()
	orig, err := netns.Get()
	if err != nil {
		runtime.UnlockOSThread()
		return fmt.Errorf("reading current netns: %w", err)
	}
	defer orig.Close()
	if err := netns.Set(ns); err != nil {
		runtime.UnlockOSThread()
		return fmt.Errorf("entering netns: %w", err)
	}
	ferr := fn()
	if err := netns.Set(orig); err != nil {
		// Stay locked: the runtime discards the thread with the goroutine
		// rather than reuse it in the wrong namespace.
		return fmt.Errorf("returning to the original netns: %w", err)
	}
	runtime.UnlockOSThread()
	return ferr
}
