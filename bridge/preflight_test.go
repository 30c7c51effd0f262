package bridge

import (
	"errors"
	"net"
	"testing"
)

func mustMAC(s string) net.HardwareAddr {
	m, err := net.ParseMAC(s)
	if err != nil {
		panic(err)
	}
	return m
}

// freshLinks are two NICs, the client one up with its kernel link-local
// address, and no bridge yet.
func freshLinks() Links {
	return Links{
		"eth0": {Kind: "device", MAC: mustMAC("52:54:00:12:34:56"), Up: true, Addresses: prefixes("fe80::5054:ff:fe12:3456/64")},
		"eth1": {Kind: "device", MAC: mustMAC("52:54:00:65:43:21")},
	}
}

func TestPreflight(t *testing.T) {
	spec := Spec{Name: "br0", Ports: []string{"eth0", "eth1"}}
	for _, tc := range []struct {
		name string
		mod  func(Links)
		want string // "" accepts
	}{
		{"fresh box", func(Links) {}, ""},
		{"re-apply: own ports keep their addresses", func(l Links) {
			l["br0"] = Link{Kind: "bridge", MAC: mustMAC("52:54:00:12:34:56"), Up: true}
			for _, n := range []string{"eth0", "eth1"} {
				nic := l[n]
				nic.Master, nic.Addresses = "br0", prefixes("10.0.0.1/24")
				l[n] = nic
			}
		}, ""},
		{"name taken", func(l Links) { l["br0"] = Link{Kind: "veth"} }, `bridge name "br0" is already used by a veth interface, not a bridge`},
		{"missing NIC", func(l Links) { delete(l, "eth1") }, `NIC "eth1" does not exist`},
		{"NIC is a bridge", func(l Links) { l["eth0"] = Link{Kind: "bridge", MAC: mustMAC("02:00:00:00:00:01")} }, `NIC "eth0" is itself a bridge`},
		{"loopback", func(l Links) { l["eth0"] = Link{Kind: "device", Loopback: true} }, `NIC "eth0" is a loopback interface`},
		{"no MAC", func(l Links) { l["eth1"] = Link{Kind: "tun"} }, `NIC "eth1" has no Ethernet address (type tun)`},
		{"enslaved elsewhere", func(l Links) {
			nic := l["eth1"]
			nic.Master = "other0"
			l["eth1"] = nic
		}, `NIC "eth1" is already enslaved to "other0"`},
	} {
		links := freshLinks()
		tc.mod(links)
		if got := errString(spec.Preflight(links)); got != tc.want {
			t.Errorf("%s: Preflight = %q, want %q", tc.name, got, tc.want)
		}
	}
	// The spec is refused before anything is looked up in the links.
	bad := Spec{Name: "br0", Ports: []string{"eth0", "eth0"}}
	if got, want := errString(bad.Preflight(nil)), `client NIC and server NIC are the same interface "eth0"`; got != want {
		t.Errorf("invalid spec: Preflight = %q, want %q", got, want)
	}
}

// Addresses are refused last, all NICs at once.
func TestPreflightAddressedNICs(t *testing.T) {
	links := freshLinks()
	links["eth0"] = Link{Kind: "device", MAC: mustMAC("52:54:00:12:34:56"), Addresses: prefixes("10.77.0.1/24", "fe80::1/64")}
	links["eth1"] = Link{Kind: "device", MAC: mustMAC("52:54:00:65:43:21"), Addresses: prefixes("2001:db8::1/64")}
	err := Spec{Name: "br0", Ports: []string{"eth0", "eth1"}}.Preflight(links)
	var pa *PortAddressesError
	if !errors.As(err, &pa) || len(pa.Ports) != 2 || pa.Ports[0].NIC != "eth0" || len(pa.Ports[0].Addrs) != 1 || pa.Ports[1].Port != 1 {
		t.Fatalf("Preflight = %#v, want both NICs' non-link-local addresses", err)
	}
	delete(links, "eth1")
	if got, want := errString(Spec{Name: "br0", Ports: []string{"eth0", "eth1"}}.Preflight(links)), `NIC "eth1" does not exist`; got != want {
		t.Errorf("with a NIC missing too: %q, want %q", got, want)
	}
}

func TestSpecMAC(t *testing.T) {
	spec := Spec{Name: "br0", Ports: []string{"eth0", "eth1"}}
	links := freshLinks()
	if mac, ok := spec.MAC(links); !ok || mac.String() != "52:54:00:12:34:56" {
		t.Errorf("before the bridge: %v, %v; want the client NIC's", mac, ok)
	}
	links["br0"] = Link{Kind: "bridge", MAC: mustMAC("02:42:ac:11:00:02")}
	if mac, ok := spec.MAC(links); !ok || mac.String() != "02:42:ac:11:00:02" {
		t.Errorf("with the bridge: %v, %v; want the bridge's", mac, ok)
	}
	if mac, ok := spec.MAC(Links{}); ok {
		t.Errorf("without links: %v, want none", mac)
	}
}

func errString(err error) string {
	if err == nil {
		return ""
	}
	return err.Error()
}
