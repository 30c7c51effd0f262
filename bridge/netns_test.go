package bridge

import (
	"errors"
	"net"
	"slices"
	"testing"

	"github.com/vishvananda/netlink"

	"github.com/ghostwire/ghostwire/lab"
)

// twoNICs is a throwaway namespace (root, not -short) holding a veth pair,
// lan0 and wan0, down and without addresses, and a handle into it.
func twoNICs(t *testing.T) *netlink.Handle {
	t.Helper()
	if testing.Short() {
		t.Skip("kernel round-trip test in a network namespace; skipped with -short")
	}
	h, err := lab.NewNST(t).Netlink()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(h.Close)
	veth := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "lan0"}, PeerName: "wan0"}
	if err := h.LinkAdd(veth); err != nil {
		t.Fatalf("adding veth pair: %v", err)
	}
	return h
}

// Apply refuses on the kernel of the moment by the rules Preflight applies
// to facts: what ReadLinks reads is what Apply decides from.
func TestApplyRunsPreflightOnReadLinks(t *testing.T) {
	h := twoNICs(t)
	spec := Spec{Name: "gw0", Ports: []string{"lan0", "wan0"}}
	lan, err := h.LinkByName("lan0")
	if err != nil {
		t.Fatal(err)
	}
	addr := &netlink.Addr{IPNet: &net.IPNet{IP: net.IPv4(10, 77, 0, 1).To4(), Mask: net.CIDRMask(24, 32)}}
	if err := h.AddrAdd(lan, addr); err != nil {
		t.Fatal(err)
	}
	links, err := ReadLinks(h, spec.LinkNames()...)
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := links["gw0"]; ok || links["lan0"].Kind != "veth" || len(links["lan0"].MAC) != 6 {
		t.Fatalf("ReadLinks = %+v", links)
	}
	want := spec.Preflight(links)
	var pa *PortAddressesError
	if !errors.As(want, &pa) || pa.Ports[0].NIC != "lan0" {
		t.Fatalf("Preflight = %v, want lan0's address refused", want)
	}
	if created, err := spec.Apply(h); created || err == nil || err.Error() != want.Error() {
		t.Fatalf("Apply = %v, %v; want %v", created, err, want)
	}
	if _, err := h.LinkByName("gw0"); err == nil {
		t.Fatal("a refused Apply created the bridge")
	}

	if err := h.AddrDel(lan, addr); err != nil {
		t.Fatal(err)
	}
	if created, err := spec.Apply(h); !created || err != nil {
		t.Fatalf("Apply = %v, %v; want the bridge created", created, err)
	}
	if links, err = ReadLinks(h, spec.LinkNames()...); err != nil {
		t.Fatal(err)
	}
	if drift, err := spec.Check(h, links); err != nil || len(drift) != 0 {
		t.Fatalf("Check after Apply = %q, %v", drift, err)
	}
	if mac, _ := spec.MAC(links); !slices.Equal(mac, links["lan0"].MAC) || links["wan0"].Master != "gw0" || spec.Preflight(links) != nil {
		t.Fatalf("after Apply: links %+v, MAC %v, Preflight %v", links, mac, spec.Preflight(links))
	}
}

// An invisible bridge: Build leaves it down, silent (arp off, no link-local)
// and takes a port that is up with IPv6 down, so that turning the port's
// IPv6 off makes it say nothing; Up brings everything up with no
// link-local address on the bridge; Check sees ARP turned back on.
func TestInvisibleBuildAndUp(t *testing.T) {
	h := twoNICs(t)
	spec := Spec{Name: "gw0", Ports: []string{"lan0", "wan0"}, Invisible: true}
	lan, err := h.LinkByName("lan0")
	if err != nil {
		t.Fatal(err)
	}
	if err := h.LinkSetUp(lan); err != nil {
		t.Fatal(err)
	}
	// A link-local address, as a port with IPv6 on gets once it has
	// carrier (the veth's peer stays down here, so it is added by hand).
	ll := &netlink.Addr{IPNet: &net.IPNet{IP: net.ParseIP("fe80::1"), Mask: net.CIDRMask(64, 128)}}
	if err := h.AddrAdd(lan, ll); err != nil {
		t.Fatal(err)
	}
	if created, err := spec.Build(h); !created || err != nil {
		t.Fatalf("Build = %v, %v", created, err)
	}
	links, err := ReadLinks(h, spec.LinkNames()...)
	if err != nil {
		t.Fatal(err)
	}
	if br := links["gw0"]; br.Up || !br.NoARP || links["lan0"].Up || links["lan0"].Master != "gw0" || links["wan0"].Master != "gw0" {
		t.Fatalf("after Build: %+v", links)
	}
	if err := spec.Up(h); err != nil {
		t.Fatal(err)
	}
	if links, err = ReadLinks(h, spec.LinkNames()...); err != nil {
		t.Fatal(err)
	}
	if drift, err := spec.Check(h, links); err != nil || len(drift) != 0 {
		t.Fatalf("Check after Up = %q, %v (links %+v)", drift, err, links)
	}
	br, err := h.LinkByName("gw0")
	if err != nil {
		t.Fatal(err)
	}
	if err := h.LinkSetARPOn(br); err != nil {
		t.Fatal(err)
	}
	if links, err = ReadLinks(h, spec.LinkNames()...); err != nil {
		t.Fatal(err)
	}
	if drift, _ := spec.Check(h, links); !slices.Contains(drift, "bridge gw0 has ARP on (want arp off)") {
		t.Errorf("Check with ARP on = %q", drift)
	}
}
