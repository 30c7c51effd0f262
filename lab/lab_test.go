//go:build linux

package lab

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"regexp"
	"runtime"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

func TestNewRejectsBadPrefix(t *testing.T) {
	for _, p := range []string{"", "abcdefghijklm", "a/b", "a.b", "a b"} {
		if _, err := New(p); err == nil {
			t.Errorf("New(%q): no error", p)
		}
	}
}

func TestUniquePrefix(t *testing.T) {
	re := regexp.MustCompile(`^gw[0-9a-f]{6}$`)
	a, b := UniquePrefix(), UniquePrefix()
	if !re.MatchString(a) || len(a)+len("lan") > 15 {
		t.Errorf("UniquePrefix() = %q, want gw + 6 hex digits", a)
	}
	if a == b {
		t.Errorf("UniquePrefix() returned %q twice", a)
	}
}

func TestSysctlPath(t *testing.T) {
	for key, want := range map[string]string{
		"net.ipv4.ip_forward":                  "/proc/sys/net/ipv4/ip_forward",
		"net/ipv6/conf/eth0.100/accept_dad":    "/proc/sys/net/ipv6/conf/eth0.100/accept_dad",
		"net.bridge.bridge-nf-call-iptables":   "/proc/sys/net/bridge/bridge-nf-call-iptables",
		"net/ipv4/conf/gw1a2b3clan/forwarding": "/proc/sys/net/ipv4/conf/gw1a2b3clan/forwarding",
	} {
		if got, err := sysctlPath(key); err != nil || got != want {
			t.Errorf("sysctlPath(%q) = %q, %v; want %q", key, got, err, want)
		}
	}
	for _, key := range []string{"", "net/../../etc/passwd", "net..ipv4", "/net/ipv4"} {
		if _, err := sysctlPath(key); err == nil {
			t.Errorf("sysctlPath(%q): no error", key)
		}
	}
}

func netnsList(t *testing.T) []string {
	t.Helper()
	out, err := exec.Command("ip", "netns", "list").CombinedOutput()
	if err != nil {
		t.Fatalf("ip netns list: %v: %s", err, out)
	}
	var names []string
	for _, line := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		if f := strings.Fields(line); len(f) > 0 {
			names = append(names, f[0])
		}
	}
	return names
}

// linkAddrs returns ifname's global addresses in ns, and whether it is up
// and enslaved.
func linkState(t *testing.T, ns *NS, ifname string) (addrs []netip.Prefix, up, enslaved bool) {
	t.Helper()
	h, err := ns.Netlink()
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	link, err := h.LinkByName(ifname)
	if err != nil {
		t.Fatalf("finding %s in %s: %v", ifname, ns.Name, err)
	}
	list, err := h.AddrList(link, netlink.FAMILY_ALL)
	if err != nil {
		t.Fatalf("listing addresses of %s: %v", ifname, err)
	}
	for _, a := range list {
		ip, _ := netip.AddrFromSlice(a.IP)
		ones, _ := a.Mask.Size()
		if ip = ip.Unmap(); !ip.IsLinkLocalUnicast() {
			addrs = append(addrs, netip.PrefixFrom(ip, ones))
		}
	}
	return addrs, link.Attrs().Flags&net.FlagUp != 0, link.Attrs().MasterIndex != 0
}

func TestTopology(t *testing.T) {
	t.Parallel()
	l := NewT(t)
	names := netnsList(t)
	for _, ns := range []*NS{l.Client, l.Box, l.Server} {
		if !slices.Contains(names, ns.Name) {
			t.Errorf("ip netns list = %v, missing %s", names, ns.Name)
		}
		if !strings.HasPrefix(ns.Name, l.Prefix) {
			t.Errorf("namespace %s not named with prefix %s", ns.Name, l.Prefix)
		}
	}
	for _, end := range []struct {
		ns       *NS
		ifname   string
		ip4, ip6 netip.Addr
	}{
		{l.Client, l.ClientIf, l.ClientIP4, l.ClientIP6},
		{l.Server, l.ServerIf, l.ServerIP4, l.ServerIP6},
	} {
		addrs, up, _ := linkState(t, end.ns, end.ifname)
		want := []netip.Prefix{netip.PrefixFrom(end.ip4, 24), netip.PrefixFrom(end.ip6, 64)}
		for _, w := range want {
			if !slices.Contains(addrs, w) {
				t.Errorf("%s in %s has addresses %v, missing %v", end.ifname, end.ns.Name, addrs, w)
			}
		}
		if !up {
			t.Errorf("%s in %s is down", end.ifname, end.ns.Name)
		}
		for key, want := range map[string]string{"net.ipv4.tcp_tw_reuse": "1", "net.ipv4.ip_local_port_range": "1024\t65000", "net.ipv4.ip_local_reserved_ports": "9876-9877"} {
			v, err := end.ns.ReadSysctl(key)
			if err != nil {
				t.Fatal(err)
			}
			if v != want {
				t.Errorf("%s in %s = %q, want %q", key, end.ns.Name, v, want)
			}
		}
	}
	for _, port := range []string{l.ClientNIC, l.ServerNIC, "lo"} {
		addrs, up, enslaved := linkState(t, l.Box, port)
		if !up || enslaved {
			t.Errorf("%s in box: up=%v enslaved=%v, want up and free", port, up, enslaved)
		}
		if port != "lo" && len(addrs) != 0 {
			t.Errorf("%s in box has addresses %v, want none", port, addrs)
		}
	}
	// Links must be in their own namespace only.
	h, err := l.Box.Netlink()
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	if _, err := h.LinkByName(l.ClientIf); err == nil {
		t.Errorf("%s found in the box namespace", l.ClientIf)
	}
	// Command runs in the namespace.
	out, err := l.Client.Command(t.Context(), "ip", "-o", "link", "show").CombinedOutput()
	if err != nil {
		t.Fatalf("ip link in client: %v: %s", err, out)
	}
	if !strings.Contains(string(out), l.ClientIf+"@") || strings.Contains(string(out), l.ClientNIC) {
		t.Errorf("ip link in client ns shows:\n%s", out)
	}
}

// echoServer listens on addr in ns and echoes every connection back.
func echoServer(t *testing.T, ns *NS, addr string) netip.AddrPort {
	t.Helper()
	var ln net.Listener
	if err := ns.Do(func() (err error) {
		ln, err = net.Listen("tcp", addr)
		return err
	}); err != nil {
		t.Fatalf("listening on %s in %s: %v", addr, ns.Name, err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				_, _ = io.Copy(c, c)
			}()
		}
	}()
	return ln.Addr().(*net.TCPAddr).AddrPort()
}

// echo connects from ns to addr, round-trips msg and returns the local
// address used.
func echo(t *testing.T, ns *NS, addr netip.AddrPort, msg string) netip.AddrPort {
	t.Helper()
	var local netip.AddrPort
	err := ns.Do(func() error {
		c, err := net.DialTimeout("tcp", addr.String(), 5*time.Second)
		if err != nil {
			return err
		}
		defer c.Close()
		local = c.LocalAddr().(*net.TCPAddr).AddrPort()
		_ = c.SetDeadline(time.Now().Add(5 * time.Second))
		if _, err := io.WriteString(c, msg); err != nil {
			return err
		}
		got := make([]byte, len(msg))
		if _, err := io.ReadFull(c, got); err != nil {
			return err
		}
		if string(got) != msg {
			return fmt.Errorf("echo returned %q, want %q", got, msg)
		}
		return nil
	})
	if err != nil {
		t.Fatalf("echo via %s: %v", addr, err)
	}
	return local
}

func TestPlainBridgeTraffic(t *testing.T) {
	t.Parallel()
	l := NewT(t)
	br := l.Prefix + "br"
	if err := l.PlainBridge(br); err != nil {
		t.Fatal(err)
	}
	if err := l.PlainBridge(br); err != nil {
		t.Fatalf("PlainBridge again: %v", err)
	}
	if v, err := l.Box.ReadSysctl("net.bridge.bridge-nf-call-iptables"); err != nil || v != "0" {
		t.Errorf("box bridge-nf-call-iptables = %q, %v; want 0", v, err)
	}

	srv4 := echoServer(t, l.Server, netip.AddrPortFrom(l.ServerIP4, 0).String())
	srv6 := echoServer(t, l.Server, netip.AddrPortFrom(l.ServerIP6, 0).String())

	capture, err := l.Box.Capture(l.ClientNIC)
	if err != nil {
		t.Fatal(err)
	}
	defer capture.Stop()
	for _, srv := range []netip.AddrPort{srv4, srv6} {
		if err := l.WaitTCP(l.Client, srv.String(), 10*time.Second); err != nil {
			t.Fatal(err)
		}
	}
	local4 := echo(t, l.Client, srv4, "hello over ipv4")
	local6 := echo(t, l.Client, srv6, "hello over ipv6")
	frames, err := capture.Stop()
	if err != nil {
		t.Fatalf("stopping capture: %v", err)
	}

	for _, flow := range []struct{ client, server netip.AddrPort }{{local4, srv4}, {local6, srv6}} {
		var syn, synAck, data bool
		for _, f := range frames {
			if f.Proto != ProtoTCP {
				continue
			}
			switch {
			case f.Src == flow.client.Addr() && f.SrcPort == flow.client.Port() && f.Dst == flow.server.Addr() && f.DstPort == flow.server.Port():
				syn = syn || f.TCPFlags&(TCPFlagSYN|TCPFlagACK) == TCPFlagSYN
				data = data || bytes.Contains(f.Ethernet.Payload, []byte("hello over ipv"))
				if f.Ethernet.Source.String() != l.ClientMAC.String() {
					t.Errorf("client frame %v from MAC %s, want %s", f, f.Ethernet.Source, l.ClientMAC)
				}
			case f.Src == flow.server.Addr() && f.SrcPort == flow.server.Port() && f.Dst == flow.client.Addr() && f.DstPort == flow.client.Port():
				synAck = synAck || f.TCPFlags&(TCPFlagSYN|TCPFlagACK) == TCPFlagSYN|TCPFlagACK
			}
		}
		if !syn || !synAck || !data {
			t.Errorf("capture of %s -> %s: SYN %v, SYN-ACK %v, data %v; want all; %d frames:\n%s",
				flow.client, flow.server, syn, synAck, data, len(frames), frameList(frames))
		}
	}

	// Without the bridge the client cannot reach the server; with it again, it can.
	if err := l.DeleteBridge(br); err != nil {
		t.Fatal(err)
	}
	if err := l.DeleteBridge(br); err != nil {
		t.Fatalf("DeleteBridge again: %v", err)
	}
	if err := l.WaitTCP(l.Client, srv4.String(), 300*time.Millisecond); err == nil {
		t.Errorf("WaitTCP succeeded with the bridge deleted")
	}
}

func frameList(frames []Frame) string {
	var b strings.Builder
	for _, f := range frames {
		fmt.Fprintln(&b, f)
	}
	return b.String()
}

func TestCloseRemovesEverything(t *testing.T) {
	t.Parallel()
	l := NewT(t)
	p, err := l.Start(l.Server, "sleep", "60")
	if err != nil {
		t.Fatal(err)
	}
	pid := p.PID()
	if err := syscall.Kill(pid, 0); err != nil {
		t.Fatalf("sleep (pid %d) not running: %v", pid, err)
	}
	// The process really is in the server namespace, once ip has switched
	// into it and exec'd sleep.
	for deadline := time.Now().Add(5 * time.Second); ; {
		comm, err := os.ReadFile(fmt.Sprintf("/proc/%d/comm", pid))
		if err != nil {
			t.Fatal(err)
		}
		if string(comm) == "sleep\n" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("pid %d is still %q, not sleep", pid, comm)
		}
		time.Sleep(time.Millisecond)
	}
	self, err := os.Readlink(fmt.Sprintf("/proc/%d/ns/net", pid))
	if err != nil {
		t.Fatal(err)
	}
	var want string
	if err := l.Server.Do(func() (err error) {
		want, err = os.Readlink(fmt.Sprintf("/proc/self/task/%d/ns/net", unix.Gettid()))
		return err
	}); err != nil {
		t.Fatal(err)
	}
	if self != want {
		t.Errorf("sleep runs in %s, want the server namespace %s", self, want)
	}

	start := time.Now()
	if err := l.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	if d := time.Since(start); d > closeGrace {
		t.Errorf("Close took %v: sleep should exit on SIGTERM", d)
	}
	if err := syscall.Kill(pid, 0); !errors.Is(err, syscall.ESRCH) {
		t.Errorf("sleep (pid %d) after Close: kill 0 = %v, want ESRCH", pid, err)
	}
	if err := p.Wait(); err == nil || !strings.Contains(err.Error(), "terminated") {
		t.Errorf("sleep exit after Close = %v, want signal: terminated", err)
	}
	names := netnsList(t)
	for _, ns := range []*NS{l.Client, l.Box, l.Server} {
		if slices.Contains(names, ns.Name) {
			t.Errorf("namespace %s still listed after Close", ns.Name)
		}
		if _, err := os.Stat(ns.Path()); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("%s after Close: %v, want not exist", ns.Path(), err)
		}
	}
	if err := l.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
	if _, err := l.Start(l.Server, "true"); err == nil {
		t.Errorf("Start after Close: no error")
	}
}

func TestProcess(t *testing.T) {
	t.Parallel()
	l := NewT(t)
	p, err := l.Start(l.Client, "sh", "-c", "echo out; echo err >&2; ip -o addr show dev "+l.ClientIf)
	if err != nil {
		t.Fatal(err)
	}
	if err := p.Wait(); err != nil {
		t.Fatalf("sh: %v: %s", err, p.Stderr())
	}
	if out := string(p.Stdout()); !strings.HasPrefix(out, "out\n") || !strings.Contains(out, l.ClientIP4.String()+"/24") {
		t.Errorf("stdout = %q", out)
	}
	if errOut := string(p.Stderr()); errOut != "err\n" {
		t.Errorf("stderr = %q, want %q", errOut, "err\n")
	}

	// A process ignoring SIGTERM is killed once the timeout passes.
	stubborn, err := l.Start(l.Client, "sh", "-c", `trap "" TERM; echo ready; while :; do sleep 0.05; done`)
	if err != nil {
		t.Fatal(err)
	}
	for !bytes.Contains(stubborn.Stdout(), []byte("ready")) { // the trap must be set before we signal
		select {
		case <-stubborn.Done():
			t.Fatalf("sh exited early: %v", stubborn.Wait())
		case <-time.After(5 * time.Millisecond):
		}
	}
	err = stubborn.Stop(syscall.SIGTERM, 200*time.Millisecond)
	if err == nil || !strings.Contains(err.Error(), "killed") {
		t.Errorf("Stop of a process ignoring SIGTERM = %v, want signal: killed", err)
	}
	if err2 := stubborn.Stop(syscall.SIGTERM, time.Second); err2 == nil || err2.Error() != err.Error() {
		t.Errorf("second Stop = %v, want %v", err2, err)
	}

	if _, err := l.Start(l.Client, "no-such-command-ghostwire"); err == nil {
		t.Errorf("Start of a missing command: no error")
	}
}

func TestDoRestoresNamespace(t *testing.T) {
	t.Parallel()
	l := NewT(t)
	// The claim is about the caller's own thread, so pin it and read that
	// thread's namespace (not /proc/self, the main thread's, which a
	// parallel test may be switching at this moment).
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	hostNS, err := os.Readlink(fmt.Sprintf("/proc/self/task/%d/ns/net", unix.Gettid()))
	if err != nil {
		t.Fatal(err)
	}
	var inside string
	wantErr := errors.New("from fn")
	err = l.Box.Do(func() error {
		inside, err = os.Readlink(fmt.Sprintf("/proc/self/task/%d/ns/net", unix.Gettid()))
		if err != nil {
			return err
		}
		return wantErr
	})
	if !errors.Is(err, wantErr) {
		t.Fatalf("Do returned %v, want fn's error", err)
	}
	if inside == hostNS {
		t.Errorf("fn ran in the host namespace %s", inside)
	}
	// Many calls in a row must never leave a thread in the box: every
	// goroutine's thread here should see the host namespace.
	for range 50 {
		_ = l.Box.Do(func() error { return nil })
	}
	if got, _ := os.Readlink(fmt.Sprintf("/proc/self/task/%d/ns/net", unix.Gettid())); got != hostNS {
		t.Errorf("caller thread in %s after Do, want %s", got, hostNS)
	}
	func() {
		defer func() {
			if r := recover(); r != "boom" {
				t.Errorf("recovered %v, want fn's panic", r)
			}
		}()
		_ = l.Box.Do(func() error { panic("boom") })
	}()
}

func TestNewCleansUpOnFailure(t *testing.T) {
	t.Parallel()
	if os.Geteuid() != 0 {
		t.Skip("needs root (CAP_NET_ADMIN, CAP_SYS_ADMIN)")
	}
	prefix := "gwl" + UniquePrefix()[2:]
	// Someone else's namespace with the server's name makes New fail after
	// it has created the client and box namespaces.
	taken := prefix + "-server"
	if out, err := exec.Command("ip", "netns", "add", taken).CombinedOutput(); err != nil {
		t.Fatalf("ip netns add %s: %v: %s", taken, err, out)
	}
	t.Cleanup(func() { _ = exec.Command("ip", "netns", "del", taken).Run() })

	if l, err := New(prefix); err == nil {
		l.Close()
		t.Fatalf("New(%q) succeeded with %s taken", prefix, taken)
	} else if !errors.Is(err, os.ErrExist) {
		t.Errorf("New error = %v, want one wrapping EEXIST", err)
	}
	names := netnsList(t)
	for _, gone := range []string{prefix + "-client", prefix + "-box"} {
		if slices.Contains(names, gone) {
			t.Errorf("namespace %s left behind by the failed New", gone)
		}
	}
	if !slices.Contains(names, taken) {
		t.Errorf("failed New deleted %s, which it did not create", taken)
	}
}

func TestWithMTU(t *testing.T) {
	t.Parallel()
	l := NewT(t, WithMTU(9000))
	for _, c := range []struct {
		ns     *NS
		ifname string
	}{{l.Client, l.ClientIf}, {l.Box, l.ClientNIC}, {l.Box, l.ServerNIC}, {l.Server, l.ServerIf}} {
		h, err := c.ns.Netlink()
		if err != nil {
			t.Fatal(err)
		}
		link, err := h.LinkByName(c.ifname)
		h.Close()
		if err != nil {
			t.Fatal(err)
		}
		if mtu := link.Attrs().MTU; mtu != 9000 {
			t.Errorf("%s MTU = %d, want 9000", c.ifname, mtu)
		}
	}
}
