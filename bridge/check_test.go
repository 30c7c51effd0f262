package bridge

import (
	"slices"
	"testing"
)

func TestLinkDrift(t *testing.T) {
	spec := Spec{Name: "br0", Ports: []string{"eth0", "eth1"}, Addresses: prefixes("10.1.2.3/16", "fd00::3/64")}
	built := func() Links {
		return Links{
			"br0":  {Kind: "bridge", Up: true, Addresses: prefixes("fe80::1/64", "10.1.2.3/16", "fd00::3/64")},
			"eth0": {Kind: "device", Up: true, Master: "br0"},
			"eth1": {Kind: "device", Up: true, Master: "br0"},
		}
	}
	for _, tc := range []struct {
		name   string
		mod    func(Links)
		want   []string
		wantOK bool
	}{
		{"in place", func(Links) {}, nil, true},
		{"no bridge", func(l Links) { delete(l, "br0") }, []string{"bridge br0 is missing"}, false},
		{"not a bridge", func(l Links) { l["br0"] = Link{Kind: "veth"} }, []string{"br0 is a veth, not a bridge"}, false},
		{"everything off", func(l Links) {
			l["br0"] = Link{Kind: "bridge", Addresses: prefixes("10.1.2.3/24")}
			delete(l, "eth0")
			l["eth1"] = Link{Kind: "device", Master: "br0"}
		}, []string{
			"bridge br0 is down", "NIC eth0 is missing", "NIC eth1 is down",
			"address 10.1.2.3/16 missing on br0", "address fd00::3/64 missing on br0",
		}, true},
		{"released port", func(l Links) { l["eth1"] = Link{Kind: "device", Up: true} }, []string{"NIC eth1 is not a port of br0"}, true},
	} {
		links := built()
		tc.mod(links)
		got, ok := spec.linkDrift(links)
		if !slices.Equal(got, tc.want) || ok != tc.wantOK {
			t.Errorf("%s: linkDrift = %q, %v; want %q, %v", tc.name, got, ok, tc.want, tc.wantOK)
		}
	}
}
