package e2e

import (
	"crypto/sha256"
	"hash"
	"io"
	"net"
	"net/netip"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/ghostwire/ghostwire/lab"
)

// Second addresses the selection tests give the lab's client and server
// (in the lab's namespaces: they go with them).
var (
	client2 = netip.MustParseAddr("192.0.2.3")
	server2 = netip.MustParseAddr("192.0.2.5")
)

// selectionBox is a proxied box intercepting port 80 whose client has a
// second address (client2) and whose server has a second one (server2),
// with a peer server on port 80 at both server addresses. It returns the
// box and the two server addresses.
func selectionBox(t *testing.T) (b *lab.Appliance, servers [2]string) {
	t.Helper()
	b = proxiedBox(t, 80)
	sh(t, b.Lab.Client, "ip", "addr", "add", client2.String()+"/24", "dev", b.Lab.ClientIf)
	sh(t, b.Lab.Server, "ip", "addr", "add", server2.String()+"/24", "dev", b.Lab.ServerIf)
	servers[0] = listenServer(t, b, b.Lab.ServerIP4.String(), "80", peerServer)
	servers[1] = listenServer(t, b, server2.String(), "80", peerServer)
	return b, servers
}

// reloadSelection rewrites b's config with the intercept section's
// selection keys (YAML lines like "client_cidrs: [192.0.2.1]"), sends
// SIGHUP and waits for the reload to be logged.
func reloadSelection(t *testing.T, b *lab.Appliance, keys ...string) {
	t.Helper()
	if err := b.WriteConfig([]int{80}, ""); err != nil {
		t.Fatal(err)
	}
	cfg, err := readFile(b.Config)
	if err != nil {
		t.Fatal(err)
	}
	const anchor = "\n  tcp_ports: [80]\n"
	if !strings.Contains(cfg, anchor) {
		t.Fatalf("harness config has no %q line:\n%s", strings.TrimSpace(anchor), cfg)
	}
	var add strings.Builder
	for _, k := range keys {
		add.WriteString("  " + k + "\n")
	}
	if err := writeFile(b.Config, strings.Replace(cfg, anchor, anchor+add.String(), 1)); err != nil {
		t.Fatal(err)
	}
	before := len(b.ProxyLog("reloaded"))
	if err := b.Proxy.Signal(syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	if err := lab.WaitFor(10*time.Second, func() (bool, error) { return len(b.ProxyLog("reloaded")) > before, nil }); err != nil {
		t.Fatalf("no reload with %v: %v\n%s", keys, err, b.Proxy.Stderr())
	}
}

// dialFrom connects from the client namespace, from address local.
func dialFrom(b *lab.Appliance, local netip.Addr, addr string, timeout time.Duration) (*net.TCPConn, error) {
	var c net.Conn
	err := b.Lab.Client.Do(func() (err error) {
		d := net.Dialer{Timeout: timeout, LocalAddr: &net.TCPAddr{IP: local.AsSlice()}}
		c, err = d.Dial("tcp", addr)
		return err
	})
	if err != nil {
		return nil, err
	}
	return c.(*net.TCPConn), nil
}

// probeFrom is probe from client address local: one short connection,
// and the peer the server saw.
func probeFrom(b *lab.Appliance, local netip.Addr, addr string) (peer string, self net.Addr, err error) {
	c, err := dialFrom(b, local, addr, 5*time.Second)
	if err != nil {
		return "", nil, err
	}
	return probeOver(c, 5*time.Second)
}

// wantPath probes from local to addr and checks the flow was proxied (the
// server saw another source port than the client's, and the proxy logged
// the connection) or bridged (the server saw the client's own address and
// port; no log line). Bridged flows are checked after a proxied one's log
// line came, so a missing line is not just a late one.
func wantPath(t *testing.T, b *lab.Appliance, what string, local netip.Addr, addr string, proxied bool) {
	t.Helper()
	peer, self, err := probeFrom(b, local, addr)
	if err != nil {
		t.Fatalf("%s: %s -> %s: %v", what, local, addr, err)
	}
	if peer != self.String() {
		t.Errorf("%s: %s -> %s: the server saw %s, the client was %s", what, local, addr, peer, self)
	}
	if proxied {
		if !viaProxy(t, b, self, addr) {
			t.Errorf("%s: %s -> %s: the box holds no socket of it: bridged, want proxied", what, local, addr)
		}
		waitConnLog(t, b, self)
		return
	}
	if viaProxy(t, b, self, addr) {
		t.Errorf("%s: %s -> %s: the box holds a socket of it: proxied, want bridged", what, local, addr)
	}
	if ls := b.ConnLogFor(self); len(ls) > 0 {
		t.Errorf("%s: %s -> %s: bridged, but the proxy logged it: %v", what, local, addr, ls)
	}
}

// TestSelection: for each of the four keys, a flow it selects is proxied
// and one it does not crosses the bridge untouched; each set by reload.
func TestSelection(t *testing.T) {
	b, servers := selectionBox(t)
	c1, c2 := b.Lab.ClientIP4, client2
	// Before any selection, everything is proxied.
	wantPath(t, b, "no selection", c1, servers[0], true)
	wantPath(t, b, "no selection", c2, servers[1], true)
	for _, tc := range []struct {
		key        string
		in, out    netip.Addr // client addresses
		inS, outS  string     // server addresses
		proxiedOut bool
	}{
		{key: "client_cidrs: [192.0.2.1]", in: c1, out: c2, inS: servers[0], outS: servers[0]},
		{key: "server_cidrs: [192.0.2.2/32]", in: c1, out: c1, inS: servers[0], outS: servers[1]},
		{key: "exclude_client_cidrs: [192.0.2.3]", in: c1, out: c2, inS: servers[0], outS: servers[0]},
		{key: "exclude_server_cidrs: [192.0.2.4/31]", in: c2, out: c2, inS: servers[0], outS: servers[1]},
	} {
		reloadSelection(t, b, tc.key)
		wantPath(t, b, tc.key+", selected", tc.in, tc.inS, true)
		wantPath(t, b, tc.key+", not selected", tc.out, tc.outS, false)
	}
	// And back: no selection proxies everything again.
	reloadSelection(t, b)
	wantPath(t, b, "selection removed", c2, servers[1], true)
	if out := sh(t, b.Lab.Box, "nft", "list", "set", "bridge", "ghostwire", "bypass4"); !strings.Contains(out, "192.0.2.5") || !strings.Contains(out, "192.0.2.3") {
		t.Errorf("the bridged flows are not in bypass4:\n%s", out)
	}
}

// TestSelectionReloadKeepsProxiedFlows: a SIGHUP that excludes a client
// leaves its established proxied transfer in the proxy, every byte intact,
// while its new connections cross the bridge untouched.
func TestSelectionReloadKeepsProxiedFlows(t *testing.T) {
	b, servers := selectionBox(t)
	c1 := b.Lab.ClientIP4
	f := startInflight(t, b, c1, servers[0])
	pump := f.pump
	pump(1)

	reloadSelection(t, b, "exclude_client_cidrs: [192.0.2.1]")
	pump(2)
	wantPath(t, b, "excluded client, new connection", c1, servers[0], false)
	wantPath(t, b, "other client", client2, servers[0], true)
	pump(3)

	f.finish("the reload")
	// It stayed in the proxy to its end.
	waitConnLog(t, b, f.c.LocalAddr())
}

// inflight is a proxied transfer held open across a change of the box,
// pumped in rounds of 4 MiB each way; finish ends it and checks that every
// byte came back intact.
type inflight struct {
	t          *testing.T
	c          *net.TCPConn
	rd         *lineReader
	sent, recv hash.Hash
}

func startInflight(t *testing.T, b *lab.Appliance, from netip.Addr, server string) *inflight {
	t.Helper()
	c, err := dialFrom(b, from, server, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	c.SetDeadline(time.Now().Add(60 * time.Second))
	f := &inflight{t: t, c: c, rd: newLineReader(c), sent: sha256.New(), recv: sha256.New()}
	if peer := strings.TrimPrefix(f.rd.line(t), "peer="); peer != c.LocalAddr().String() || !viaProxy(t, b, c.LocalAddr(), c.RemoteAddr().String()) {
		t.Fatalf("the transfer is not proxied: the server saw %s, the box holds no socket of it", peer)
	}
	return f
}

func (f *inflight) pump(seed uint64) {
	f.t.Helper()
	done := make(chan error, 1)
	go func() { _, err := io.CopyN(f.recv, f.rd, 4<<20); done <- err }()
	if _, err := stream(io.MultiWriter(f.c, f.sent), 4<<20, seed); err != nil {
		f.t.Fatalf("in-flight write: %v", err)
	}
	if err := <-done; err != nil {
		f.t.Fatalf("in-flight read: %v", err)
	}
}

func (f *inflight) finish(across string) {
	f.t.Helper()
	f.c.CloseWrite()
	if rest, err := io.ReadAll(f.rd); err != nil || len(rest) != 0 {
		f.t.Fatalf("in-flight transfer did not end cleanly: %d stray bytes, %v", len(rest), err)
	}
	if string(f.sent.Sum(nil)) != string(f.recv.Sum(nil)) {
		f.t.Errorf("in-flight transfer corrupted across %s", across)
	}
}
