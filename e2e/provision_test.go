package e2e

import (
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/ghostwire/ghostwire/lab"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// nftSection is the nftables part of `ghostwire plan` output.
func nftSection(t *testing.T, plan string) string {
	t.Helper()
	_, after, ok := strings.Cut(plan, "# nftables\n")
	if !ok {
		t.Fatalf("plan has no nftables section:\n%s", plan)
	}
	return after
}

func TestApplyMatchesPlanIsIdempotentAndTearsDownExactly(t *testing.T) {
	needRoot(t)
	b := newBox(t, 80, 443)
	before := snapshot(t, b)

	plan, err := b.Ghostwire("plan")
	if err != nil {
		t.Fatal(err)
	}
	if snapshot(t, b) != before {
		t.Fatal("plan changed the kernel's state")
	}
	if _, err := b.Ghostwire("apply"); err != nil {
		t.Fatal(err)
	}
	ruleset := sh(t, b.Lab.Box, "nft", "list", "ruleset")
	if want := nftSection(t, plan); strings.TrimSpace(ruleset) != strings.TrimSpace(want) {
		t.Errorf("nft list ruleset differs from the plan:\n--- kernel\n%s\n--- plan\n%s", ruleset, want)
	}
	for _, want := range []string{"fwmark 0x1 lookup 100"} {
		for _, fam := range []string{"-4", "-6"} {
			if out := sh(t, b.Lab.Box, "ip", fam, "rule"); !strings.Contains(out, "1000:") || !strings.Contains(out, want) {
				t.Errorf("ip %s rule lacks %q at priority 1000:\n%s", fam, want, out)
			}
		}
	}
	if out := sh(t, b.Lab.Box, "ip", "route", "show", "table", "100"); !strings.Contains(out, "local default dev lo") {
		t.Errorf("table 100 lacks the local route:\n%s", out)
	}
	if out := sh(t, b.Lab.Box, "ip", "-6", "route", "show", "table", "100"); !strings.Contains(out, "local default dev lo") {
		t.Errorf("table 100 (v6) lacks the local route:\n%s", out)
	}
	ports := sh(t, b.Lab.Box, "ip", "-o", "link", "show", "master", b.Bridge)
	for _, nic := range []string{b.Lab.ClientNIC, b.Lab.ServerNIC} {
		if !strings.Contains(ports, nic+"@") {
			t.Errorf("%s is not a port of %s:\n%s", nic, b.Bridge, ports)
		}
	}
	for key, want := range map[string]string{
		"net.bridge.bridge-nf-call-iptables":  "0",
		"net.bridge.bridge-nf-call-ip6tables": "0",
		"net.ipv4.ip_forward":                 "1",
		"net.ipv6.conf.all.forwarding":        "1",
		"net.ipv4.conf.all.send_redirects":    "0",
	} {
		if got, err := b.Lab.Box.ReadSysctl(key); err != nil || got != want {
			t.Errorf("sysctl %s = %q (%v), want %s", key, got, err, want)
		}
	}
	if !strings.Contains(plan, "net.ipv4.ip_forward: 0 -> 1") {
		t.Errorf("plan does not show the ip_forward change old -> new:\n%s", plan)
	}

	applied := snapshot(t, b)
	if _, err := b.Ghostwire("apply"); err != nil {
		t.Fatal(err)
	}
	if again := snapshot(t, b); again != applied {
		t.Errorf("second apply changed state:\n--- first\n%s\n--- second\n%s", applied, again)
	}
	if st, _ := b.Status(); st != "ghostwire: diverting without ghostwire proxy" {
		t.Errorf("status after apply = %q", st)
	}

	if _, err := b.Ghostwire("teardown"); err != nil {
		t.Fatal(err)
	}
	if after := snapshot(t, b); after != before {
		t.Errorf("teardown did not restore the namespace:\n--- before\n%s\n--- after\n%s", before, after)
	}
	if _, err := b.Ghostwire("teardown"); err != nil {
		t.Errorf("second teardown: %v", err)
	}
	if st, _ := b.Status(); st != "ghostwire: not provisioned" {
		t.Errorf("status after teardown = %q", st)
	}
}

func TestApplyFailureMidwayLeavesNothing(t *testing.T) {
	needRoot(t)
	b := newBox(t, 80)
	// The gateway is on no connected subnet: the route step fails after the
	// bridge and sysctls are in place.
	if err := b.WriteConfig([]int{80}, ""); err != nil {
		t.Fatal(err)
	}
	cfg, _ := os.ReadFile(b.Config)
	bad := strings.Replace(string(cfg), "intercept:", "  routes: [\"198.51.100.0/24 via 203.0.113.1\"]\nintercept:", 1)
	if err := os.WriteFile(b.Config, []byte(bad), 0o644); err != nil {
		t.Fatal(err)
	}
	before := snapshot(t, b)
	out, err := b.Ghostwire("apply")
	if err == nil {
		t.Fatalf("apply with an unreachable gateway succeeded:\n%s", out)
	}
	for _, want := range []string{"route 198.51.100.0/24 via 203.0.113.1", "rolled back"} {
		if !strings.Contains(out, want) {
			t.Errorf("apply error lacks %q:\n%s", want, out)
		}
	}
	if after := snapshot(t, b); after != before {
		t.Errorf("failed apply left changes:\n--- before\n%s\n--- after\n%s", before, after)
	}
	if _, err := os.Stat(filepath.Join(b.Dir, "state.json")); !os.IsNotExist(err) {
		t.Errorf("state file left behind: %v", err)
	}
}

func TestApplyRefusesAndChangesNothing(t *testing.T) {
	needRoot(t)
	b := newBox(t, 80)
	h, err := b.Lab.Box.Netlink()
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	// addAddrs puts operator addresses on a box NIC and returns their removal.
	addAddrs := func(nic string, prefixes ...string) func() {
		l, err := h.LinkByName(nic)
		if err != nil {
			t.Fatal(err)
		}
		var added []*netlink.Addr
		for _, p := range prefixes {
			a, err := netlink.ParseAddr(p)
			if err != nil {
				t.Fatal(err)
			}
			a.Flags = unix.IFA_F_NODAD
			if err := h.AddrAdd(l, a); err != nil {
				t.Fatalf("adding %s to %s: %v", p, nic, err)
			}
			added = append(added, a)
		}
		return func() {
			for _, a := range added {
				h.AddrDel(l, a)
			}
		}
	}
	base, _ := os.ReadFile(b.Config)
	for _, tc := range []struct {
		name  string
		setup func() func()
		edit  func(string) string
		want  []string
	}{
		{
			name: "missing NIC",
			edit: func(c string) string { return strings.Replace(c, b.Lab.ServerNIC, b.Lab.Prefix+"nope", 1) },
			want: []string{`NIC "` + b.Lab.Prefix + `nope" does not exist`},
		},
		{
			name: "bridge name taken by a non-bridge",
			setup: func() func() {
				// This kernel has no dummy links; a veth is as much "not a bridge".
				d := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: b.Bridge}, PeerName: b.Lab.Prefix + "vp"}
				if err := h.LinkAdd(d); err != nil {
					t.Fatal(err)
				}
				return func() { h.LinkDel(d) }
			},
			want: []string{`bridge name "` + b.Bridge + `" is already used by a veth interface`},
		},
		{
			name: "NIC enslaved to another bridge",
			setup: func() func() {
				other := &netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: b.Lab.Prefix + "ob"}}
				if err := h.LinkAdd(other); err != nil {
					t.Fatal(err)
				}
				nic, _ := h.LinkByName(b.Lab.ClientNIC)
				if err := h.LinkSetMaster(nic, other); err != nil {
					t.Fatal(err)
				}
				return func() { h.LinkDel(other) }
			},
			want: []string{`NIC "` + b.Lab.ClientNIC + `" is already enslaved to "` + b.Lab.Prefix + `ob"`},
		},
		{
			// Enslaving would silently take the management address off the network.
			name:  "IPv4 address on the client NIC",
			setup: func() func() { return addAddrs(b.Lab.ClientNIC, "10.77.0.1/24") },
			want: []string{
				"bridge.client_nic " + b.Lab.ClientNIC + " carries 10.77.0.1/24: an enslaved port's addresses stop working",
				"move it to the bridge by listing it under bridge.addresses",
			},
		},
		{
			name:  "IPv6 global address on the client NIC",
			setup: func() func() { return addAddrs(b.Lab.ClientNIC, "fd00:77::1/64") },
			want: []string{
				"bridge.client_nic " + b.Lab.ClientNIC + " carries fd00:77::1/64:",
				"bridge.addresses",
			},
		},
		{
			name: "addresses on both NICs, all named at once",
			setup: func() func() {
				undoClient := addAddrs(b.Lab.ClientNIC, "10.77.0.1/24", "fd00:77::1/64")
				undoServer := addAddrs(b.Lab.ServerNIC, "10.78.0.1/24")
				return func() { undoServer(); undoClient() }
			},
			want: []string{
				"bridge.client_nic " + b.Lab.ClientNIC + " carries 10.77.0.1/24, fd00:77::1/64; " +
					"bridge.server_nic " + b.Lab.ServerNIC + " carries 10.78.0.1/24: ",
				"move them to the bridge by listing them under bridge.addresses",
			},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := string(base)
			if tc.edit != nil {
				cfg = tc.edit(cfg)
			}
			if err := os.WriteFile(b.Config, []byte(cfg), 0o644); err != nil {
				t.Fatal(err)
			}
			if tc.setup != nil {
				defer tc.setup()()
			}
			before := snapshot(t, b)
			// plan and --dry-run refuse too: a plan that apply would
			// refuse is no plan.
			for _, args := range [][]string{{"apply"}, {"apply", "--dry-run"}, {"plan"}} {
				out, err := b.Ghostwire(args...)
				if err == nil {
					t.Fatalf("ghostwire %s succeeded, want a refusal:\n%s", strings.Join(args, " "), out)
				}
				for _, want := range tc.want {
					if !strings.Contains(out, want) {
						t.Errorf("ghostwire %s output lacks %q:\n%s", strings.Join(args, " "), want, out)
					}
				}
			}
			if after := snapshot(t, b); after != before {
				t.Errorf("refused apply changed state:\n--- before\n%s\n--- after\n%s", before, after)
			}
			if _, err := os.Stat(filepath.Join(b.Dir, "state.json")); !os.IsNotExist(err) {
				t.Errorf("refused apply wrote a state file: %v", err)
			}
		})
	}
}

// The addresses check must not refuse what is normal: the kernel's IPv6
// link-local address on every NIC that is up, and, on re-apply, ports that
// ghostwire's own bridge already holds.
func TestApplyAcceptsLinkLocalAndItsOwnPorts(t *testing.T) {
	needRoot(t)
	b := newBox(t, 80)
	for _, nic := range []string{b.Lab.ClientNIC, b.Lab.ServerNIC} {
		if out := sh(t, b.Lab.Box, "ip", "-6", "-o", "addr", "show", "dev", nic, "scope", "link"); !strings.Contains(out, "fe80::") {
			t.Fatalf("%s has no kernel link-local address, so this test proves nothing:\n%s", nic, out)
		}
	}
	if out, err := b.Ghostwire("apply"); err != nil {
		t.Fatalf("apply refused NICs with only link-local addresses: %v\n%s", err, out)
	}
	t.Cleanup(func() { b.Ghostwire("teardown") })

	// An address put on a port after apply stopped working then, not on a
	// re-apply, which must stay possible (it is how config changes land).
	sh(t, b.Lab.Box, "ip", "addr", "add", "10.77.0.1/24", "dev", b.Lab.ClientNIC)
	if out, err := b.Ghostwire("apply"); err != nil {
		t.Fatalf("re-apply refused its own bridge's port: %v\n%s", err, out)
	}
}

// A port that is not intercepted is bridged straight through: the client
// reaches the server and the server sees the client.
func TestPlainTrafficCrossesProvisionedBridge(t *testing.T) {
	needRoot(t)
	b := newBox(t, 80)
	if _, err := b.Ghostwire("apply"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { b.Ghostwire("teardown") })
	for _, addr := range []string{
		net.JoinHostPort(b.Lab.ServerIP4.String(), "8080"),
		net.JoinHostPort(b.Lab.ServerIP6.String(), "8080"),
	} {
		ln, err := lab.Listen(b.Lab.Server, "tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		peers := make(chan string, 1)
		go func() {
			c, err := ln.Accept()
			if err != nil {
				peers <- err.Error()
				return
			}
			defer c.Close()
			peers <- c.RemoteAddr().(*net.TCPAddr).IP.String()
			io.Copy(c, c)
		}()
		c, err := lab.Dial(b.Lab.Client, "tcp", addr, 5*time.Second)
		if err != nil {
			t.Fatalf("client → %s across the bridge: %v", addr, err)
		}
		if _, err := c.Write([]byte("ping")); err != nil {
			t.Fatal(err)
		}
		buf := make([]byte, 4)
		c.SetDeadline(time.Now().Add(5 * time.Second))
		if _, err := io.ReadFull(c, buf); err != nil || string(buf) != "ping" {
			t.Fatalf("echo via %s: %q, %v", addr, buf, err)
		}
		c.Close()
		ln.Close()
		peer := <-peers
		want := b.Lab.ClientIP4.String()
		if strings.Contains(addr, "[") {
			want = b.Lab.ClientIP6.String()
		}
		if peer != want {
			t.Errorf("server saw %s, want the client %s", peer, want)
		}
	}
}
