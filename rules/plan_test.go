package rules

import (
	"flag"
	"github.com/google/nftables"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
)

var update = flag.Bool("update", false, "rewrite testdata golden files from the current output")

func testConfig() Config {
	return Config{
		Name:         "ghostwire",
		Bridge:       "br0",
		ClientPort:   "eth-client",
		ServerPort:   "eth-server",
		BridgeMAC:    net.HardwareAddr{0x02, 0x42, 0xac, 0x11, 0x00, 0x02},
		TCPPorts:     []uint16{443, 80, 443},
		ProxyTCPPort: 3129,
		Mark:         0x1,
		RouteTable:   100,
		RulePriority: 1000,
	}
}

func mustPlan(t *testing.T, cfg Config) *Plan {
	t.Helper()
	p, err := NewPlan(cfg)
	if err != nil {
		t.Fatalf("NewPlan: %v", err)
	}
	return p
}

func TestNewPlanValidation(t *testing.T) {
	tests := []struct {
		name   string
		modify func(*Config)
		want   string // substring of the error: the field and the reason
	}{
		{"empty name", func(c *Config) { c.Name = "" }, "Name: table name is empty"},
		{"name with space", func(c *Config) { c.Name = "ghost wire" }, "Name: table name"},
		{"name starting with digit", func(c *Config) { c.Name = "1gw" }, "Name: table name"},
		{"name too long", func(c *Config) { c.Name = strings.Repeat("g", 65) }, "Name: table name"},
		{"empty bridge", func(c *Config) { c.Bridge = "" }, "Bridge: interface name is empty"},
		{"empty client port", func(c *Config) { c.ClientPort = "" }, "ClientPort: interface name is empty"},
		{"empty server port", func(c *Config) { c.ServerPort = "" }, "ServerPort: interface name is empty"},
		{"long bridge", func(c *Config) { c.Bridge = "br0123456789abcd" }, "Bridge: interface name \"br0123456789abcd\" is longer than 15"},
		{"long client port", func(c *Config) { c.ClientPort = strings.Repeat("c", 16) }, "ClientPort: interface name"},
		{"long server port", func(c *Config) { c.ServerPort = strings.Repeat("s", 16) }, "ServerPort: interface name"},
		{"slash in port", func(c *Config) { c.ServerPort = "eth/1" }, "ServerPort: interface name"},
		{"wildcard in bridge", func(c *Config) { c.Bridge = "br*" }, "Bridge: interface name"},
		{"quote in port", func(c *Config) { c.ClientPort = `eth"1` }, "ClientPort: interface name"},
		{"same ports", func(c *Config) { c.ServerPort = c.ClientPort }, "ServerPort: \"eth-client\" is also the ClientPort"},
		{"bridge is a port", func(c *Config) { c.Bridge = c.ClientPort }, "Bridge: \"eth-client\" is also a bridge port"},
		{"nil MAC", func(c *Config) { c.BridgeMAC = nil }, "BridgeMAC: \"\" is not a 6-byte"},
		{"short MAC", func(c *Config) { c.BridgeMAC = c.BridgeMAC[:5] }, "BridgeMAC: \"02:42:ac:11:00\" is not a 6-byte"},
		{"long MAC", func(c *Config) { c.BridgeMAC = make(net.HardwareAddr, 8) }, "BridgeMAC:"},
		{"multicast MAC", func(c *Config) { c.BridgeMAC = net.HardwareAddr{1, 0, 0x5e, 0, 0, 1} }, "BridgeMAC: 01:00:5e:00:00:01 is a multicast"},
		{"zero MAC", func(c *Config) { c.BridgeMAC = make(net.HardwareAddr, 6) }, "BridgeMAC: 00:00:00:00:00:00 is the zero"},
		{"no ports", func(c *Config) { c.TCPPorts = nil }, "TCPPorts: at least one"},
		{"port 0", func(c *Config) { c.TCPPorts = []uint16{80, 0} }, "TCPPorts: port 0"},
		{"proxy port 0", func(c *Config) { c.ProxyTCPPort = 0 }, "ProxyTCPPort: must be set"},
		{"proxy port intercepted", func(c *Config) { c.ProxyTCPPort = 443 }, "ProxyTCPPort: 443 is also an intercepted port"},
		{"mark 0", func(c *Config) { c.Mark = 0 }, "Mark: must be non-zero"},
		{"table 0", func(c *Config) { c.RouteTable = 0 }, "RouteTable: 0 is out of range"},
		{"table negative", func(c *Config) { c.RouteTable = -5 }, "RouteTable: -5 is out of range"},
		{"table too big", func(c *Config) { c.RouteTable = 1 << 31 }, "RouteTable: 2147483648 is out of range"},
		{"table default", func(c *Config) { c.RouteTable = 253 }, "RouteTable: 253 is the kernel's default table"},
		{"table main", func(c *Config) { c.RouteTable = 254 }, "RouteTable: 254 is the kernel's main table"},
		{"table local", func(c *Config) { c.RouteTable = 255 }, "RouteTable: 255 is the kernel's local table"},
		{"priority 0", func(c *Config) { c.RulePriority = 0 }, "RulePriority: 0 is out of range"},
		{"priority main", func(c *Config) { c.RulePriority = 32766 }, "RulePriority: 32766 is out of range"},
		{"priority negative", func(c *Config) { c.RulePriority = -1 }, "RulePriority: -1 is out of range"},
		{"udp port 0", func(c *Config) { *c = udpConfig(); c.UDPPorts = []uint16{53, 0} }, "UDPPorts: port 0 cannot be intercepted"},
		{"udp proxy port 0", func(c *Config) { *c = udpConfig(); c.ProxyUDPPort = 0 }, "ProxyUDPPort: must be set (got 0) when UDP ports are intercepted"},
		{"udp proxy port intercepted", func(c *Config) { *c = udpConfig(); c.ProxyUDPPort = 4500 },
			"ProxyUDPPort: 4500 is also an intercepted UDP port: the proxy would divert to itself"},
		{"udp session timeout negative", func(c *Config) { *c = udpConfig(); c.UDPSessionTimeout = -time.Second }, "UDPSessionTimeout: -1s is out of range 1s..168h0m0s"},
		{"udp session timeout too long", func(c *Config) { *c = udpConfig(); c.UDPSessionTimeout = 8 * 24 * time.Hour }, "UDPSessionTimeout: 192h0m0s is out of range"},
		{"udp session timeout fraction", func(c *Config) { *c = udpConfig(); c.UDPSessionTimeout = 1500 * time.Millisecond },
			"UDPSessionTimeout: 1.5s is not a whole number of seconds"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg := testConfig()
			tt.modify(&cfg)
			p, err := NewPlan(cfg)
			if err == nil {
				t.Fatalf("NewPlan accepted %+v: %s", cfg, p)
			}
			if !strings.Contains(err.Error(), tt.want) {
				t.Errorf("error %q does not contain %q", err, tt.want)
			}
		})
	}
}

func TestNewPlanReportsAllProblems(t *testing.T) {
	_, err := NewPlan(Config{})
	if err == nil {
		t.Fatal("NewPlan accepted the zero Config")
	}
	for _, field := range []string{"Name:", "Bridge:", "ClientPort:", "ServerPort:", "BridgeMAC:", "TCPPorts:", "ProxyTCPPort:", "Mark:", "RouteTable:", "RulePriority:"} {
		if !strings.Contains(err.Error(), field) {
			t.Errorf("error does not mention %s: %v", field, err)
		}
	}
}

func TestNewPlanBoundaries(t *testing.T) {
	for _, mod := range []func(*Config){
		func(c *Config) { c.RouteTable = 1 },
		func(c *Config) { c.RouteTable = 252 },
		func(c *Config) { c.RouteTable = 256 },
		func(c *Config) { c.RouteTable = 1<<31 - 1 },
		func(c *Config) { c.RulePriority = 1 },
		func(c *Config) { c.RulePriority = 32765 },
		func(c *Config) { c.Bridge = "br0123456789abc" }, // 15 bytes
		func(c *Config) { c.TCPPorts = []uint16{65535} },
		func(c *Config) { c.Mark = 0xffffffff },
		// UDP and TCP ports are separate spaces; without UDP ports the
		// UDP proxy port is unused.
		func(c *Config) { *c = udpConfig(); c.ProxyUDPPort = c.ProxyTCPPort },
		func(c *Config) { *c = udpConfig(); c.ProxyUDPPort = 80 },
		func(c *Config) { *c = udpConfig(); c.UDPPorts = []uint16{80, 443, 3129} },
		func(c *Config) { c.ProxyUDPPort = 0 },
		func(c *Config) { c.ProxyUDPPort = 443; c.UDPSessionTimeout = 7 * 24 * time.Hour },
	} {
		cfg := testConfig()
		mod(&cfg)
		if _, err := NewPlan(cfg); err != nil {
			t.Errorf("NewPlan(%+v): %v", cfg, err)
		}
	}
}

func TestNewPlanNormalisesAndCopies(t *testing.T) {
	cfg := udpConfig()
	cfg.TCPPorts = []uint16{8080, 443, 80, 443, 8080}
	p := mustPlan(t, cfg)
	if got, want := p.Config().TCPPorts, []uint16{80, 443, 8080}; !slices.Equal(got, want) {
		t.Errorf("TCPPorts = %v, want %v", got, want)
	}
	if got, want := p.Config().UDPPorts, []uint16{53, 443, 4500}; !slices.Equal(got, want) {
		t.Errorf("UDPPorts = %v, want %v", got, want)
	}
	if got := p.Config().UDPSessionTimeout; got != 60*time.Second {
		t.Errorf("default UDPSessionTimeout = %v, want 60s", got)
	}
	// The plan must not alias the caller's slices, nor hand out its own.
	cfg.BridgeMAC[0] = 0xff
	cfg.TCPPorts[0] = 1
	cfg.UDPPorts[0] = 1
	got := p.Config()
	got.TCPPorts[0] = 2
	got.UDPPorts[0] = 2
	got.BridgeMAC[1] = 0xff
	if c := p.Config(); c.BridgeMAC.String() != "02:42:ac:11:00:02" || c.TCPPorts[0] != 80 || c.UDPPorts[0] != 53 {
		t.Errorf("plan changed through aliasing: %+v", c)
	}
	if r := p.Routing(); r != (Routing{Mark: 1, Table: 100, Priority: 1000}) {
		t.Errorf("Routing() = %+v", r)
	}
	if p.IsDraining() || !p.Draining().IsDraining() {
		t.Error("Draining flag")
	}
}

// golden compares got with testdata/name, or rewrites it with -update.
func golden(t *testing.T, name, got string) {
	t.Helper()
	path := filepath.Join("testdata", name)
	if *update {
		if err := os.WriteFile(path, []byte(got), 0o644); err != nil {
			t.Fatal(err)
		}
		return
	}
	want, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("%v (run go test ./rules -update to create it)", err)
	}
	if got != string(want) {
		t.Errorf("%s differs from golden %s (go test ./rules -update rewrites it)\n--- got\n%s--- want\n%s", name, path, got, want)
	}
}

// goldenPlans are the plans whose String() is pinned in testdata; the root
// tests apply each of them to check the goldens are what nft prints.
func goldenPlans(t *testing.T) map[string]*Plan {
	many := testConfig()
	many.Name = "gw_many"
	many.Bridge = "br-lab"
	many.ClientPort = "veth-c"
	many.ServerPort = "veth-s"
	many.BridgeMAC = net.HardwareAddr{0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0x0f}
	many.TCPPorts = []uint16{65535, 1, 22, 25, 80, 110, 143, 443, 465, 587, 993, 995, 8080, 8443}
	many.ProxyTCPPort = 15001
	many.Mark = 0xdead0001
	many.BypassTimeout = 90*time.Minute + 45*time.Second
	base := mustPlan(t, testConfig())
	udp := mustPlan(t, udpConfig())
	sel := selectionConfig()
	selUDP := udpConfig()
	selUDP.ClientCIDRs = []netip.Prefix{netip.MustParsePrefix("10.1.0.0/16"), netip.MustParsePrefix("2001:db8:1::/48")}
	selUDP.ExcludeServerCIDRs = []netip.Prefix{netip.MustParsePrefix("203.0.113.53/32")}
	invSel := selectionConfig()
	invSel.Invisible = true
	invUDP := udpConfig()
	invUDP.Invisible = true
	invUDP.NeighbourTimeout = 90 * time.Second
	return map[string]*Plan{
		"invisible.nft":           mustPlan(t, invisibleConfig()),
		"invisible-udp.nft":       mustPlan(t, invUDP),
		"invisible-selection.nft": mustPlan(t, invSel),
		"selection.nft":           mustPlan(t, sel),
		"selection-udp.nft":       mustPlan(t, selUDP),
		"basic.nft":               base,
		"draining.nft":            base.Draining(),
		"many.nft":                mustPlan(t, many),
		"overload-bypass.nft":     base.Overloaded(OverloadBypass),
		"overload-refuse.nft":     base.Overloaded(OverloadRefuse),
		"udp.nft":                 udp,
		"udp-draining.nft":        udp.Draining(),
		"udp-bypass.nft":          udp.UDPBypass(true),
	}
}

// selectionConfig is testConfig with all four selection lists: IPv4 and
// IPv6, bare addresses, host bits set, duplicates, a prefix inside
// another, adjacent prefixes, and the ends of the address space.
func selectionConfig() Config {
	cfg := testConfig()
	pp := func(ss ...string) []netip.Prefix {
		var out []netip.Prefix
		for _, s := range ss {
			out = append(out, netip.MustParsePrefix(s))
		}
		return out
	}
	cfg.ClientCIDRs = pp("192.0.2.0/24", "10.0.0.0/8", "10.20.0.0/16", "2001:db8::/32", "198.51.100.7/32", "10.0.0.0/8",
		"172.16.0.0/13", "172.24.0.0/13", "2001:db8:ffff::1/128", "fd00::/8")
	cfg.ServerCIDRs = pp("0.0.0.0/1", "128.0.0.0/1", "::/0")
	cfg.ExcludeClientCIDRs = pp("10.9.9.9/32", "192.0.2.77/24")
	cfg.ExcludeServerCIDRs = pp("255.255.255.255/32", "2001:db8:dead::/48", "0.0.0.0/32")
	return cfg
}

// invisibleConfig is testConfig in the invisible mode.
func invisibleConfig() Config {
	cfg := testConfig()
	cfg.Invisible = true
	return cfg
}

// udpConfig is testConfig intercepting UDP too.
func udpConfig() Config {
	cfg := testConfig()
	cfg.UDPPorts = []uint16{4500, 53, 443, 53}
	cfg.ProxyUDPPort = 3130
	return cfg
}

func TestPlanStringGolden(t *testing.T) {
	for name, p := range goldenPlans(t) {
		t.Run(name, func(t *testing.T) { golden(t, name, p.String()) })
	}
}

func TestRoutingStringGolden(t *testing.T) {
	golden(t, "routing.txt", mustPlan(t, testConfig()).Routing().String())
}

func TestRoutingRejectsInvalidWithoutKernel(t *testing.T) {
	// A nil handle proves validation happens before any netlink call.
	for _, r := range []Routing{{}, {Mark: 1, Table: 254, Priority: 100}, {Mark: 1, Table: 100, Priority: 0}} {
		if err := r.Apply(nil); err == nil {
			t.Errorf("Apply(%+v) accepted", r)
		}
		if err := r.Remove(nil); err == nil {
			t.Errorf("Remove(%+v) accepted", r)
		}
		if _, err := r.Check(nil); err == nil {
			t.Errorf("Check(%+v) accepted", r)
		}
	}
}

// Lingering ports stay in the bridge redirect set but not in the TPROXY set.
func TestLingerPorts(t *testing.T) {
	cfg := testConfig()
	cfg.TCPPorts = []uint16{8080}
	cfg.LingerPorts = []uint16{80, 8080, 80}
	p, err := NewPlan(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if got := p.Config().LingerPorts; !slices.Equal(got, []uint16{80}) {
		t.Errorf("LingerPorts = %v, want [80] (sorted, deduplicated, minus intercepted)", got)
	}
	if got := p.portsFor(nftables.TableFamilyBridge); !slices.Equal(got, []uint16{80, 8080}) {
		t.Errorf("bridge set = %v, want [80 8080]", got)
	}
	if got := p.portsFor(nftables.TableFamilyINet); !slices.Equal(got, []uint16{8080}) {
		t.Errorf("inet set = %v, want [8080]", got)
	}
	text := p.String()
	bridge, inet, _ := strings.Cut(text, "table inet")
	if !strings.Contains(bridge, "elements = { 80, 8080 }") || !strings.Contains(inet, "elements = { 8080 }") {
		t.Errorf("rendered sets wrong:\n%s", text)
	}
}

// Every problem comes back as a FieldError naming its field, so a caller
// can restate it in its own terms.
func TestNewPlanFieldErrors(t *testing.T) {
	cfg := testConfig()
	cfg.ClientPort = `eth"1`
	cfg.RouteTable = 254
	cfg.ProxyTCPPort = 443
	_, err := NewPlan(cfg)
	var got []string
	for _, fe := range Fields(err) {
		got = append(got, fe.Field)
	}
	if want := []string{"ClientPort", "ProxyTCPPort", "RouteTable"}; !slices.Equal(got, want) {
		t.Errorf("Fields(%v) = %v, want %v", err, got, want)
	}
	cfg = udpConfig()
	cfg.UDPPorts = append(cfg.UDPPorts, 0)
	cfg.ProxyUDPPort = 53
	cfg.UDPSessionTimeout = -time.Minute
	_, err = NewPlan(cfg)
	got = nil
	for _, fe := range Fields(err) {
		got = append(got, fe.Field)
	}
	if want := []string{"UDPPorts", "ProxyUDPPort", "UDPSessionTimeout"}; !slices.Equal(got, want) {
		t.Errorf("Fields(%v) = %v, want %v", err, got, want)
	}
	if Fields(nil) != nil {
		t.Error("Fields(nil) is not empty")
	}
}
