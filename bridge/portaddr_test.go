package bridge

import (
	"net/netip"
	"slices"
	"testing"
)

func prefixes(ss ...string) []netip.Prefix {
	var out []netip.Prefix
	for _, s := range ss {
		out = append(out, netip.MustParsePrefix(s))
	}
	return out
}

func TestLostOnEnslave(t *testing.T) {
	for _, tc := range []struct {
		name     string
		in, want []netip.Prefix
	}{
		{"nothing", nil, nil},
		{"kernel link-local only", prefixes("fe80::a8c1:abff:fe12:3456/64"), nil},
		{"IPv4", prefixes("10.77.0.1/24"), prefixes("10.77.0.1/24")},
		{"IPv4 link-local counts: it was put there", prefixes("169.254.7.7/16"), prefixes("169.254.7.7/16")},
		{"IPv6 global (ULA)", prefixes("fd00:77::1/64"), prefixes("fd00:77::1/64")},
		{"IPv6 global", prefixes("2001:db8::1/64"), prefixes("2001:db8::1/64")},
		{"IPv6 site-local", prefixes("fec0::1/64"), prefixes("fec0::1/64")},
		{"IPv6 link-local anywhere in fe80::/10", prefixes("febf::1/64"), nil},
		{
			"mixed, order kept",
			prefixes("10.77.0.1/24", "fe80::1/64", "fd00:77::1/64", "192.0.2.9/32"),
			prefixes("10.77.0.1/24", "fd00:77::1/64", "192.0.2.9/32"),
		},
	} {
		if got := lostOnEnslave(tc.in); !slices.Equal(got, tc.want) {
			t.Errorf("%s: lostOnEnslave(%v) = %v, want %v", tc.name, tc.in, got, tc.want)
		}
	}
}

func TestPortAddressesError(t *testing.T) {
	one := &PortAddressesError{Ports: []PortAddresses{{Port: 0, NIC: "eth1", Addrs: prefixes("10.77.0.1/24")}}}
	if got, want := one.Error(), "client NIC eth1 carries 10.77.0.1/24: an enslaved port's addresses stop working; "+
		"remove it, or move it to the bridge by listing it under the bridge's addresses"; got != want {
		t.Errorf("generic wording:\n got %s\nwant %s", got, want)
	}

	all := &PortAddressesError{
		Ports: []PortAddresses{
			{Port: 0, NIC: "eth1", Addrs: prefixes("10.77.0.1/24", "fd00:77::1/64")},
			{Port: 1, NIC: "eth2", Addrs: prefixes("10.78.0.1/24")},
		},
		PortNames:     [2]string{"bridge.client_nic", "bridge.server_nic"},
		AddressesName: "bridge.addresses",
	}
	if got, want := all.Error(), "bridge.client_nic eth1 carries 10.77.0.1/24, fd00:77::1/64; bridge.server_nic eth2 carries 10.78.0.1/24: "+
		"an enslaved port's addresses stop working; remove them, or move them to the bridge by listing them under bridge.addresses"; got != want {
		t.Errorf("named wording:\n got %s\nwant %s", got, want)
	}
}
