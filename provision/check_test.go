package provision

import (
	"encoding/json"
	"net/netip"
	"strings"
	"testing"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/ghostwire/ghostwire/rules"
)

func healthyFacts() CheckFacts {
	r := rules.Routing{Mark: 0x1, Table: 100, Priority: 1000}
	own := netlink.Rule{Priority: 1000, Mark: 0x1, Table: 100, Goto: -1, Flow: -1, SuppressIfgroup: -1, SuppressPrefixlen: -1}
	local := netlink.Rule{Priority: 0, Table: unix.RT_TABLE_LOCAL, Goto: -1, Flow: -1, SuppressIfgroup: -1, SuppressPrefixlen: -1}
	main := netlink.Rule{Priority: 32766, Table: unix.RT_TABLE_MAIN, Goto: -1, Flow: -1, SuppressIfgroup: -1, SuppressPrefixlen: -1}
	return CheckFacts{
		Bridge: "br0", Ports: []string{"eth0", "eth1"}, Routing: r, ProxyPort: 9876,
		Provisioned: true, StateFile: "/var/lib/ghostwire/state.json",
		Sysctls: map[string]string{"net.bridge.bridge-nf-call-iptables": "0", "net.bridge.bridge-nf-call-ip6tables": "0"},
		Links: map[string]LinkHealth{
			"br0":  {Kind: "bridge", Up: true, Carrier: true, MTU: 1500},
			"eth0": {Kind: "device", Up: true, Carrier: true, MTU: 1500, Master: "br0"},
			"eth1": {Kind: "device", Up: true, Carrier: true, MTU: 1500, Master: "br0"},
		},
		PolicyRules:   map[int][]netlink.Rule{unix.AF_INET: {local, own, main}, unix.AF_INET6: {local, own, main}},
		LocalRoute:    map[int]bool{unix.AF_INET: true, unix.AF_INET6: true},
		Tables:        rules.TablesState{Bridge: true, Inet: true, Owned: true, OwnerPortID: 42},
		ControlSocket: "/run/ghostwire.sock", DaemonAnswers: true,
		Listeners: []Listener{{Addr: "0.0.0.0:9876", PID: 7, Process: "ghostwire"}},
		Reach: []Reach{
			{Side: "client", Family: unix.AF_INET, Via: "br0"}, {Side: "client", Family: unix.AF_INET6, Via: "br0"},
			{Side: "server", Family: unix.AF_INET, Via: "br0"}, {Side: "server", Family: unix.AF_INET6, Via: "br0"},
		},
	}
}

func TestChecksHealthy(t *testing.T) {
	rs := RunChecks(healthyFacts())
	if len(rs) != len(Checks) || ExitStatus(rs) != 0 {
		t.Fatalf("healthy box:\n%s", FormatResults(rs))
	}
	for _, r := range rs {
		if r.Level != OK || r.Fix != "" || !strings.HasPrefix(r.String(), "OK   "+r.Check+": ") {
			t.Errorf("healthy: %q", r)
		}
	}
}

func TestChecksFindings(t *testing.T) {
	for _, tc := range []struct {
		name   string
		break_ func(*CheckFacts)
		level  Level
		want   []string // substrings of the one line
	}{
		{"nf-call", func(f *CheckFacts) { f.Sysctls["net.bridge.bridge-nf-call-ip6tables"] = "1" },
			Fail, []string{"FAIL bridge-nf: net.bridge.bridge-nf-call-ip6tables = 1", "fix: sysctl -w net.bridge.bridge-nf-call-ip6tables=0"}},
		{"rule missing", func(f *CheckFacts) { f.PolicyRules[unix.AF_INET6] = f.PolicyRules[unix.AF_INET6][:1] },
			Fail, []string{"FAIL routing: IPv6 policy rule fwmark 0x1 lookup 100 pref 1000 missing", "fix: ghostwire apply"}},
		{"route missing", func(f *CheckFacts) { f.LocalRoute[unix.AF_INET] = false },
			Fail, []string{"IPv4 local default route in table 100 missing"}},
		{"shadowed", func(f *CheckFacts) {
			f.PolicyRules[unix.AF_INET] = append([]netlink.Rule{{Priority: 500, Table: unix.RT_TABLE_MAIN, Goto: -1, Flow: -1, SuppressIfgroup: -1, SuppressPrefixlen: -1}}, f.PolicyRules[unix.AF_INET]...)
		}, Fail, []string{`IPv4 policy rule "from all lookup main" at pref 500 shadows`, "routing.priority"}},
		{"proxy down", func(f *CheckFacts) { f.Tables, f.DaemonAnswers, f.Listeners = rules.TablesState{}, false, nil },
			Warn, []string{"WARN proxy: proxy not running: traffic is bridged untouched; fix: systemctl start ghostwire"}},
		{"daemon without tables", func(f *CheckFacts) { f.Tables, f.Listeners = rules.TablesState{}, nil },
			Fail, []string{"FAIL proxy: ghostwire run answers on /run/ghostwire.sock but owns no diversion tables"}},
		{"port down", func(f *CheckFacts) { f.Links["eth1"] = LinkHealth{Kind: "device", MTU: 1500, Master: "br0"} },
			Fail, []string{"FAIL links: port eth1 is down; fix: ip link set dev eth1 up"}},
		{"no carrier", func(f *CheckFacts) { f.Links["eth1"] = LinkHealth{Kind: "device", Up: true, MTU: 1500, Master: "br0"} },
			Fail, []string{"port eth1 has no carrier"}},
		{"mtu", func(f *CheckFacts) {
			f.Links["eth0"] = LinkHealth{Kind: "device", Up: true, Carrier: true, MTU: 9000, Master: "br0"}
		},
			Fail, []string{"MTU differs between ports: eth0 9000, eth1 1500; fix: ip link set dev eth0 mtu 1500"}},
		{"not enslaved", func(f *CheckFacts) { f.Links["eth0"] = LinkHealth{Kind: "device", Up: true, Carrier: true, MTU: 1500} },
			Fail, []string{"port eth0 is not enslaved to br0; fix: ghostwire apply"}},
		{"no route out of the bridge", func(f *CheckFacts) { f.Reach[1].Via = "" },
			Fail, []string{"FAIL routes: no IPv6 route out of br0: the proxy cannot answer clients, so IPv6 flows", "fix: bridge.addresses"}},
		{"no route to a selected prefix", func(f *CheckFacts) {
			f.Reach[2] = Reach{Side: "server", Family: unix.AF_INET, Prefix: netip.MustParsePrefix("198.51.100.0/24")}
		}, Fail, []string{"FAIL routes: no route to server side 198.51.100.0/24 (intercept.server_cidrs)", "fix: bridge.routes: add 198.51.100.0/24"}},
		{"selected prefix routed elsewhere", func(f *CheckFacts) {
			f.Reach[0] = Reach{Side: "client", Family: unix.AF_INET, Prefix: netip.MustParsePrefix("10.1.0.0/16"), Via: "eth2"}
		}, Fail, []string{"FAIL routes: the route to client side 10.1.0.0/16 (intercept.client_cidrs) goes out of eth2, not br0"}},
		{"invisible, speaking", func(f *CheckFacts) { f.Invisible, f.Speaking = true, []string{"bridge br0 has ARP on (want arp off)"} },
			Fail, []string{"FAIL invisible: bridge br0 has ARP on (want arp off): the box can send frames of its own; fix: ghostwire apply"}},
		{"router advertisements", func(f *CheckFacts) { f.RouterAdverts = 3 },
			Warn, []string{"WARN router-adverts: br0 has sent 3 IPv6 router advertisements since it was created", "fix: remove br0 from"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := healthyFacts()
			tc.break_(&f)
			rs := RunChecks(f)
			if got := ExitStatus(rs); got != int(tc.level) {
				t.Errorf("exit %d, want %d", got, tc.level)
			}
			out := FormatResults(rs)
			for _, w := range tc.want {
				if !strings.Contains(out, w) {
					t.Errorf("output lacks %q:\n%s", w, out)
				}
			}
		})
	}
}

func TestShadowingIgnoresSelectors(t *testing.T) {
	f := healthyFacts()
	mask := uint32(0xff00)
	f.PolicyRules[unix.AF_INET] = append([]netlink.Rule{
		{Priority: 100, Table: unix.RT_TABLE_MAIN, IifName: "lo", Goto: -1, Flow: -1, SuppressIfgroup: -1, SuppressPrefixlen: -1},
		{Priority: 101, Table: unix.RT_TABLE_MAIN, Mark: 0x100, Mask: &mask, Goto: -1, Flow: -1, SuppressIfgroup: -1, SuppressPrefixlen: -1},
		{Priority: 102, Table: unix.RT_TABLE_MAIN, SuppressPrefixlen: 0, Goto: -1, Flow: -1, SuppressIfgroup: -1},
	}, f.PolicyRules[unix.AF_INET]...)
	if rs := RunChecks(f); ExitStatus(rs) != 0 {
		t.Errorf("rules that marked packets miss count as shadowing:\n%s", FormatResults(rs))
	}
}

func TestExitStatusAndJSON(t *testing.T) {
	rs := []Result{{Check: "a", Found: "fine"}, {Level: Warn, Check: "b", Found: "meh", Fix: "do x"}}
	if ExitStatus(nil) != 0 || ExitStatus(rs) != 1 || ExitStatus(append(rs, Result{Level: Fail})) != 2 {
		t.Error("exit status is not the worst level")
	}
	js, err := ResultsJSON(rs)
	if err != nil {
		t.Fatal(err)
	}
	var got []map[string]string
	if err := json.Unmarshal(js, &got); err != nil {
		t.Fatal(err)
	}
	if len(got) != 2 || got[0]["status"] != "OK" || got[0]["check"] != "a" || got[0]["found"] != "fine" || got[0]["fix"] != "" ||
		got[1]["status"] != "WARN" || got[1]["fix"] != "do x" {
		t.Errorf("JSON: %s", js)
	}
	if js, _ := ResultsJSON(nil); string(js) != "[]" {
		t.Errorf("no results: %s, want []", js)
	}
	if s := FormatResults(rs); s != "OK   a: fine\nWARN b: meh; fix: do x\n" {
		t.Errorf("text: %q", s)
	}
}

func TestProcAddr(t *testing.T) {
	if got := procAddr("0100007F"); got != "127.0.0.1" {
		t.Errorf("v4: %s", got)
	}
	if got := procAddr("00000000000000000000000001000000"); got != "::1" {
		t.Errorf("v6: %s", got)
	}
}

// A daemon that had to restore something says so: the box works, but
// something keeps removing what it relies on.
func TestCheckProxyReportsRestorations(t *testing.T) {
	f := CheckFacts{Tables: rules.TablesState{Owned: true, OwnerPortID: 7}, DaemonAnswers: true, ControlSocket: "/run/x.sock"}
	if r := checkProxy(f); len(r) != 1 || r[0].Level != OK {
		t.Fatalf("healthy: %+v", r)
	}
	f.Restored = map[string]int{"ip rule fwmark 0x1 lookup 100 pref 1000": 2}
	r := checkProxy(f)
	if len(r) != 1 || r[0].Level != Warn || !strings.Contains(r[0].Found, "restored since it started: ip rule fwmark 0x1 lookup 100 pref 1000 (2×)") {
		t.Errorf("after restorations: %+v", r)
	}
}

func TestCheckRPFilterAndIPv6(t *testing.T) {
	f := CheckFacts{Bridge: "br0", RPFilter: 1}
	if r := checkRPFilter(f); len(r) != 1 || r[0].Level != Fail || !strings.Contains(r[0].Found, "no IPv4 route via br0") {
		t.Errorf("strict, no routes: %+v", r)
	}
	f.BridgeRoutes = true
	if r := checkRPFilter(f); len(r) != 1 || r[0].Level != OK {
		t.Errorf("strict, routes: %+v", r)
	}
	f.RPFilter = 2
	if r := checkRPFilter(f); len(r) != 1 || r[0].Level != OK {
		t.Errorf("loose: %+v", r)
	}
	if r := checkIPv6(CheckFacts{Bridge: "br0", IPv6Disabled: true}); len(r) != 1 || r[0].Level != Fail || !strings.Contains(r[0].Fix, "net.ipv6.conf.br0.disable_ipv6=0") {
		t.Errorf("IPv6 off: %+v", r)
	}
	if r := checkIPv6(CheckFacts{Bridge: "br0"}); len(r) != 1 || r[0].Level != OK {
		t.Errorf("IPv6 on: %+v", r)
	}
}

func TestSampleHost(t *testing.T) {
	for in, want := range map[string]string{
		"10.1.0.0/16": "10.1.0.1", "10.1.2.3/16": "10.1.0.1", "192.0.2.7/32": "192.0.2.7",
		"192.0.2.6/31": "192.0.2.6", "2001:db8::/32": "2001:db8::1", "::/0": "::1",
	} {
		if got := sampleHost(netip.MustParsePrefix(in)); got.String() != want {
			t.Errorf("sampleHost(%s) = %s, want %s", in, got, want)
		}
	}
}
