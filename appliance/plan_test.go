package appliance

import (
	"flag"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/ghostwire/ghostwire/bridge"
	"github.com/ghostwire/ghostwire/provision"
)

var update = flag.Bool("update", false, "rewrite testdata/plan/*.golden from the current output")

// planFacts are the kernels the golden configs are planned against: what
// provision.Box.Facts would read, as fixtures.
var planFacts = map[string]func() provision.Facts{
	"v4v6-routes": freshBox,
	"minimal":     func() provision.Facts { return withoutBrNetfilter(freshBox()) },
	"reapply":     provisionedBox,
	"udp":         freshBox,
	"selection":   freshBox,
	"invisible": func() provision.Facts {
		f := freshBox()
		for _, k := range []string{"net.ipv6.conf.eth0.disable_ipv6", "net.ipv6.conf.eth1.disable_ipv6"} {
			f.Sysctls[k] = "0"
		}
		return f
	},
	"refuse-addresses":   addressedNICs,
	"refuse-missing-nic": freshBox,
	"refuse-enslaved": func() provision.Facts {
		f := freshBox()
		nic := f.Links["eth1"]
		nic.Master = "other0"
		f.Links["eth1"] = nic
		return f
	},
	"refuse-name-taken": func() provision.Facts {
		f := freshBox()
		f.Links["veth7"] = bridge.Link{Kind: "veth", MAC: mac("02:00:00:00:07:07")}
		return f
	},
}

func mac(s string) net.HardwareAddr {
	m, err := net.ParseMAC(s)
	if err != nil {
		panic(err)
	}
	return m
}

func prefixes(ss ...string) []netip.Prefix {
	var out []netip.Prefix
	for _, s := range ss {
		out = append(out, netip.MustParsePrefix(s))
	}
	return out
}

// freshBox has two NICs (the client one up, with its kernel link-local
// address) and the kernel's default sysctls with br_netfilter loaded.
func freshBox() provision.Facts {
	return provision.Facts{
		Links: map[string]bridge.Link{
			"eth0": {Kind: "device", MAC: mac("52:54:00:12:34:56"), Up: true, Addresses: prefixes("fe80::5054:ff:fe12:3456/64")},
			"eth1": {Kind: "device", MAC: mac("52:54:00:65:43:21")},
		},
		Sysctls: map[string]string{
			"net.bridge.bridge-nf-call-iptables":   "1",
			"net.bridge.bridge-nf-call-ip6tables":  "1",
			"net.bridge.bridge-nf-call-arptables":  "1",
			"net.ipv4.ip_forward":                  "0",
			"net.ipv6.conf.all.forwarding":         "0",
			"net.ipv4.conf.all.send_redirects":     "1",
			"net.ipv4.conf.default.send_redirects": "1",
		},
	}
}

func withoutBrNetfilter(f provision.Facts) provision.Facts {
	for k := range f.Sysctls {
		if strings.HasPrefix(k, "net.bridge.") {
			delete(f.Sysctls, k)
		}
	}
	return f
}

// provisionedBox is reapply.yaml's box after apply: the bridge's MAC is
// not its client NIC's (it kept the one it was created with).
func provisionedBox() provision.Facts {
	return provision.Facts{
		Links: map[string]bridge.Link{
			"gw0":  {Kind: "bridge", MAC: mac("02:42:ac:11:00:02"), Up: true, Addresses: prefixes("10.1.2.3/16")},
			"lan0": {Kind: "device", MAC: mac("52:54:00:aa:00:01"), Up: true, Master: "gw0", Addresses: prefixes("172.16.0.9/24")},
			"wan0": {Kind: "device", MAC: mac("52:54:00:aa:00:02"), Up: true, Master: "gw0"},
		},
		Sysctls: map[string]string{
			"net.bridge.bridge-nf-call-iptables":  "0",
			"net.bridge.bridge-nf-call-ip6tables": "0",
			"net.bridge.bridge-nf-call-arptables": "0",
			"net.ipv4.ip_forward":                 "1",
			"net.ipv6.conf.all.forwarding":        "1",
			"net.ipv4.conf.all.send_redirects":    "0",
			"net.ipv4.conf.gw0.send_redirects":    "0",
		},
	}
}

func addressedNICs() provision.Facts {
	f := freshBox()
	f.Links["eth0"] = bridge.Link{Kind: "device", MAC: mac("52:54:00:12:34:56"), Up: true,
		Addresses: prefixes("10.77.0.1/24", "fe80::5054:ff:fe12:3456/64", "fd00:77::1/64")}
	f.Links["eth1"] = bridge.Link{Kind: "device", MAC: mac("52:54:00:65:43:21"), Up: true,
		Addresses: prefixes("fe80::5054:ff:fe65:4321/64", "2001:db8:77::1/64")}
	return f
}

// planText is what `ghostwire plan -c path` prints on a box with facts f:
// the plan, or the refusal as main reports it.
func planText(t *testing.T, path string, f provision.Facts) string {
	t.Helper()
	c, err := Load(path, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := Preflight(c, f); err != nil {
		return "ghostwire: " + err.Error() + "\n"
	}
	d, err := Desire(c, f)
	if err != nil {
		return "ghostwire: " + err.Error() + "\n"
	}
	return d.String()
}

// TestPlanGolden compares `ghostwire plan` output for testdata/plan/*.yaml
// against its .golden file. go test -run TestPlanGolden -update rewrites them.
func TestPlanGolden(t *testing.T) {
	configs, err := filepath.Glob("testdata/plan/*.yaml")
	if err != nil || len(configs) == 0 {
		t.Fatalf("no golden configs: %v", err)
	}
	for _, path := range configs {
		name := strings.TrimSuffix(filepath.Base(path), ".yaml")
		t.Run(name, func(t *testing.T) {
			facts, ok := planFacts[name]
			if !ok {
				t.Fatalf("no facts fixture for %s", name)
			}
			got := planText(t, path, facts())
			golden := strings.TrimSuffix(path, ".yaml") + ".golden"
			if *update {
				if err := os.WriteFile(golden, []byte(got), 0o644); err != nil {
					t.Fatal(err)
				}
			}
			want, err := os.ReadFile(golden)
			if err != nil {
				t.Fatal(err)
			}
			if got != string(want) {
				t.Errorf("plan for %s differs from %s:\n--- got\n%s--- want\n%s", path, golden, got, want)
			}
		})
	}
}

// A diversion the rules refuse is reported in the config's keys (or, for
// the MAC, the kernel fact it comes from).
func TestDesireSaysRuleErrorsInConfigKeys(t *testing.T) {
	c, err := Load("testdata/plan/minimal.yaml", nil)
	if err != nil {
		t.Fatal(err)
	}
	f := freshBox()
	nic := f.Links["eth0"]
	nic.MAC = mac("01:00:5e:00:00:01")
	f.Links["eth0"] = nic
	_, err = Desire(c, f)
	want := "building rule plan: the bridge's MAC (the existing bridge's, else bridge.client_nic's): 01:00:5e:00:00:01 is a multicast address"
	if err == nil || err.Error() != want {
		t.Errorf("Desire error = %v\nwant %s", err, want)
	}
}

// Without the bridge or the client NIC there is no MAC to divert to: the
// rest of the desired state stands (status and teardown use it), the
// diversion is left out.
func TestDesireWithoutBridgeMAC(t *testing.T) {
	c, err := Load("testdata/plan/minimal.yaml", nil)
	if err != nil {
		t.Fatal(err)
	}
	d, err := Desire(c, provision.Facts{})
	if err != nil {
		t.Fatal(err)
	}
	if d.Rules != nil || d.Tables != "ghostwire" || d.Routing.Table != 100 || len(d.Sysctls) != 7 {
		t.Errorf("desired = %+v", d)
	}
}
