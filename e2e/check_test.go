package e2e

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ghostwire/ghostwire/lab"
)

// checkOutput runs `ghostwire check ARGS` in the box: its output and exit
// status (1 warnings and 2 failures are not errors).
func checkOutput(t *testing.T, b *lab.Appliance, args ...string) (string, int) {
	t.Helper()
	out, err := b.Ghostwire(append([]string{"check"}, args...)...)
	var exit *exec.ExitError
	if errors.As(err, &exit) && (exit.ExitCode() == 1 || exit.ExitCode() == 2) {
		return out, exit.ExitCode()
	}
	if err != nil {
		t.Fatal(err)
	}
	return out, 0
}

// wantCheck asserts check exits code and prints a line with every one of
// want in it.
func wantCheck(t *testing.T, b *lab.Appliance, stage string, code int, want ...string) {
	t.Helper()
	out, got := checkOutput(t, b)
	for _, line := range strings.Split(out, "\n") {
		ok := true
		for _, w := range want {
			ok = ok && strings.Contains(line, w)
		}
		if ok && got == code {
			t.Logf("%s: %s", stage, line)
			return
		}
	}
	t.Errorf("%s: check exit %d, want %d and a line with %q:\n%s", stage, got, code, want, out)
}

// Each cause injected on a running, healthy box, named by `check`, then
// undone (the box is healthy again before the next).
func TestCheck(t *testing.T) {
	b := proxiedBox(t, 80)
	box := b.Lab.Box
	healthy := func(stage string) {
		t.Helper()
		out, code := checkOutput(t, b)
		if code != 0 || strings.Contains(out, "WARN") || strings.Contains(out, "FAIL") || !strings.HasPrefix(out, "OK") {
			t.Fatalf("%s: check exit %d, want 0 and all OK:\n%s", stage, code, out)
		}
	}
	healthy("intercepting")
	out, _ := checkOutput(t, b, "--json")
	var rs []map[string]string
	if err := json.Unmarshal([]byte(out), &rs); err != nil || len(rs) < 6 || rs[0]["status"] != "OK" {
		t.Errorf("check --json: %v\n%s", err, out)
	}
	t.Logf("healthy:\n%s", func() string { o, _ := checkOutput(t, b); return o }())

	// 1. br_netfilter's calls into iptables.
	if _, err := box.ReadSysctl("net.bridge.bridge-nf-call-iptables"); err != nil {
		t.Logf("br_netfilter absent: %v; skipping its check", err)
	} else {
		for _, key := range []string{"net.bridge.bridge-nf-call-iptables", "net.bridge.bridge-nf-call-ip6tables"} {
			if err := box.Sysctl(key, "1"); err != nil {
				t.Fatal(err)
			}
			wantCheck(t, b, key, 2, "FAIL bridge-nf: "+key+" = 1", "sysctl -w "+key+"=0")
			if err := box.Sysctl(key, "0"); err != nil {
				t.Fatal(err)
			}
		}
		healthy("nf-call restored")
	}

	// The proxy down: from here on, nothing heals what the test breaks
	// (a running proxy restores its rules, routes and ports at once).
	if err := b.StopProxy(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	b.Proxy = nil
	wantCheck(t, b, "proxy down", 1, "WARN proxy: proxy not running: traffic is bridged untouched", "systemctl start ghostwire")
	// healthy, but for the proxy being down: exit 1, its one WARN.
	quiet := func(stage string) {
		t.Helper()
		out, code := checkOutput(t, b)
		if code != 1 || strings.Contains(out, "FAIL") || strings.Count(out, "WARN") != 1 || !strings.Contains(out, "WARN proxy: proxy not running") {
			t.Fatalf("%s: check exit %d, want 1 and the proxy's WARN only:\n%s", stage, code, out)
		}
	}

	// 2. Policy routing: our rules, the local route, a shadowing rule.
	sh(t, box, "ip", "-6", "rule", "del", "pref", "1000")
	wantCheck(t, b, "v6 rule deleted", 2, "FAIL routing: IPv6 policy rule fwmark 0x1 lookup 100 pref 1000 missing", "ghostwire apply")
	sh(t, box, "ip", "-6", "rule", "add", "fwmark", "0x1", "lookup", "100", "pref", "1000")
	sh(t, box, "ip", "rule", "del", "pref", "1000")
	wantCheck(t, b, "v4 rule deleted", 2, "IPv4 policy rule fwmark 0x1 lookup 100 pref 1000 missing")
	sh(t, box, "ip", "rule", "add", "fwmark", "0x1", "lookup", "100", "pref", "1000")
	sh(t, box, "ip", "route", "del", "local", "default", "dev", "lo", "table", "100")
	wantCheck(t, b, "v4 local route deleted", 2, "FAIL routing: IPv4 local default route in table 100 missing")
	sh(t, box, "ip", "route", "add", "local", "default", "dev", "lo", "table", "100")
	sh(t, box, "ip", "rule", "add", "lookup", "main", "pref", "500")
	wantCheck(t, b, "shadowed", 2, `FAIL routing: IPv4 policy rule "from all lookup main" at pref 500 shadows`, "routing.priority")
	sh(t, box, "ip", "rule", "del", "pref", "500")
	quiet("routing restored")

	// 4. The bridge's ports.
	sh(t, box, "ip", "link", "set", "dev", b.Lab.ServerNIC, "mtu", "1400")
	wantCheck(t, b, "mtu", 2, "FAIL links: MTU differs between ports", "ip link set dev "+b.Lab.ClientNIC+" mtu 1400")
	sh(t, box, "ip", "link", "set", "dev", b.Lab.ServerNIC, "mtu", "1500")
	sh(t, box, "ip", "link", "set", "dev", b.Lab.ClientNIC, "down")
	wantCheck(t, b, "port down", 2, "FAIL links: port "+b.Lab.ClientNIC+" is down", "ip link set dev "+b.Lab.ClientNIC+" up")
	sh(t, box, "ip", "link", "set", "dev", b.Lab.ClientNIC, "up")
	sh(t, b.Lab.Server, "ip", "link", "set", "dev", b.Lab.ServerIf, "down")
	wantCheck(t, b, "no carrier", 2, "FAIL links: port "+b.Lab.ServerNIC+" has no carrier")
	sh(t, b.Lab.Server, "ip", "link", "set", "dev", b.Lab.ServerIf, "up")
	sh(t, box, "ip", "link", "set", "dev", b.Lab.ServerNIC, "nomaster")
	wantCheck(t, b, "not enslaved", 2, "FAIL links: port "+b.Lab.ServerNIC+" is not enslaved to "+b.Bridge, "ghostwire apply")
	sh(t, box, "ip", "link", "set", "dev", b.Lab.ServerNIC, "master", b.Bridge)
	if err := lab.WaitFor(10*time.Second, func() (bool, error) { _, code := checkOutput(t, b); return code == 1, nil }); err != nil {
		quiet("links restored")
	}

	// 7. No route out of the bridge: its IPv4 address, and with it the
	// connected route, gone.
	sh(t, box, "ip", "addr", "del", b.Lab.BoxIP4.String(), "dev", b.Bridge)
	wantCheck(t, b, "no route", 2, "FAIL routes: no IPv4 route out of "+b.Bridge, "bridge.addresses")
	sh(t, box, "ip", "addr", "add", b.Lab.BoxIP4.String(), "dev", b.Bridge)
	quiet("route restored")

	// 8. Something on the box advertising the bridge as a router (what
	// radvd would send; router lifetime 0, so no lab host takes it as its
	// default router).
	sendRouterAdvert(t, box, b.Bridge, b.Lab.BoxIP6.Addr())
	wantCheck(t, b, "router advert", 1, "WARN router-adverts: "+b.Bridge+" has sent 1 IPv6 router advertisements")

	// 3. The proxy: its port taken; a daemon that owns no tables.
	ln, err := lab.Listen(box, "tcp", "127.0.0.1:9876")
	if err != nil {
		t.Fatal(err)
	}
	wantCheck(t, b, "port taken", 2, "FAIL proxy-port: proxy.tcp_port 9876 taken by another process", "127.0.0.1:9876")
	ln.Close()
	ctl, err := net.Listen("unix", b.ControlSocket())
	if err != nil {
		t.Fatal(err)
	}
	defer ctl.Close()
	go func() { // answers like `ghostwire run`, but owns nothing
		for {
			c, err := ctl.Accept()
			if err != nil {
				return
			}
			bufio.NewReader(c).ReadBytes('\n')
			c.Write([]byte(`{"ok":true,"stats":{}}` + "\n"))
			c.Close()
		}
	}()
	wantCheck(t, b, "daemon without tables", 2, "FAIL proxy: ghostwire run answers on "+b.ControlSocket()+" but owns no diversion tables")

	// 6. Another firewall that drops before ghostwire's hooks.
	sh(t, box, "nft", "add table ip foreignfw; add chain ip foreignfw pre { type filter hook prerouting priority -300; }; add rule ip foreignfw pre tcp dport 80 drop")
	wantCheck(t, b, "foreign table", 2, "WARN foreign-tables: ip foreignfw chain pre (hook prerouting, priority -300): 1 rule(s) that drop or reject", "nft list chain ip foreignfw pre")
	sh(t, box, "nft", "delete table ip foreignfw")

	// 5. IPv6 off on the bridge (last: it drops the bridge's IPv6
	// addresses and routes, which nothing here puts back).
	key := "net.ipv6.conf." + b.Bridge + ".disable_ipv6"
	if err := box.Sysctl(key, "1"); err != nil {
		t.Fatal(err)
	}
	wantCheck(t, b, "IPv6 off", 2, "FAIL ipv6: IPv6 is disabled on "+b.Bridge, "sysctl -w "+key+"=0")
	if err := box.Sysctl(key, "0"); err != nil {
		t.Fatal(err)
	}
}

// sendRouterAdvert sends one ICMPv6 router advertisement to all nodes out
// of ifname, from src, as an RA daemon on the box would.
func sendRouterAdvert(t *testing.T, ns *lab.NS, ifname string, src netip.Addr) {
	t.Helper()
	err := ns.Do(func() error {
		ifi, err := net.InterfaceByName(ifname)
		if err != nil {
			return err
		}
		fd, err := unix.Socket(unix.AF_INET6, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.IPPROTO_ICMPV6)
		if err != nil {
			return fmt.Errorf("opening a raw ICMPv6 socket: %w", err)
		}
		defer unix.Close(fd)
		if err := unix.SetsockoptInt(fd, unix.IPPROTO_IPV6, unix.IPV6_MULTICAST_HOPS, 255); err != nil {
			return fmt.Errorf("setting IPV6_MULTICAST_HOPS: %w", err)
		}
		if err := unix.SetsockoptInt(fd, unix.IPPROTO_IPV6, unix.IPV6_MULTICAST_IF, ifi.Index); err != nil {
			return fmt.Errorf("setting IPV6_MULTICAST_IF: %w", err)
		}
		// The link flaps above restart the address's duplicate address
		// detection: it cannot be bound until that ends.
		err = lab.WaitFor(5*time.Second, func() (bool, error) {
			err := unix.Bind(fd, &unix.SockaddrInet6{Addr: src.As16()})
			return err == nil, ignore(err, unix.EADDRNOTAVAIL)
		})
		if err != nil {
			return fmt.Errorf("binding to %s: %w", src, err)
		}
		// type 134, code 0, checksum (the kernel fills it in), cur hop
		// limit 64, no flags, router lifetime 0, reachable and retrans 0.
		ra := []byte{134, 0, 0, 0, 64, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0}
		allNodes := netip.MustParseAddr("ff02::1").As16()
		return unix.Sendto(fd, ra, 0, &unix.SockaddrInet6{Addr: allNodes, ZoneId: uint32(ifi.Index)})
	})
	if err != nil {
		t.Fatalf("sending a router advertisement out of %s: %v", ifname, err)
	}
}

// ignore is err, or nil if it is target.
func ignore(err error, target error) error {
	if errors.Is(err, target) {
		return nil
	}
	return err
}
