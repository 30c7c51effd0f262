package bridge

import (
	"errors"
	"fmt"
	"net"
	"net/netip"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// Link is what ghostwire needs to know of one network interface, the
// bridge or a NIC, to decide whether Apply may build on it (Preflight)
// and which MAC the bridge gets (Spec.MAC). Plain data, so the decision is
// a pure function of it and tests give it as fixtures.
type Link struct {
	Index     int    // the kernel's ifindex; 0 in fixtures, where nothing needs it
	Kind      string // netlink's type: "bridge", "veth", "device", ...
	MAC       net.HardwareAddr
	Loopback  bool
	Up        bool
	NoARP     bool           // IFF_NOARP: the link resolves no neighbours
	Master    string         // the bridge it is a port of, if any
	Addresses []netip.Prefix // both families, including link-local
}

// Links are links by name; a name that is not there is a link that does
// not exist.
type Links map[string]Link

// ReadLinks is the one way the kernel's links are read: the named ones
// through h, leaving out those that do not exist. Other errors are
// returned.
func ReadLinks(h *netlink.Handle, names ...string) (Links, error) {
	links := Links{}
	for _, name := range names {
		l, ok, err := readLink(h, name)
		if err != nil {
			return nil, err
		}
		if ok {
			links[name] = l
		}
	}
	return links, nil
}

// readLink reads one interface; ok is false if it does not exist.
func readLink(h *netlink.Handle, name string) (_ Link, ok bool, _ error) {
	l, err := h.LinkByName(name)
	if isNotFound(err) {
		return Link{}, false, nil
	} else if err != nil {
		return Link{}, false, fmt.Errorf("looking up link %s: %w", name, err)
	}
	a := l.Attrs()
	out := Link{
		Index:    a.Index,
		Kind:     l.Type(),
		MAC:      a.HardwareAddr,
		Loopback: a.Flags&net.FlagLoopback != 0,
		Up:       a.Flags&net.FlagUp != 0,
		NoARP:    a.RawFlags&unix.IFF_NOARP != 0,
	}
	if a.MasterIndex != 0 {
		ml, err := h.LinkByIndex(a.MasterIndex)
		if err != nil {
			return Link{}, false, fmt.Errorf("looking up master of link %s: %w", name, err)
		}
		out.Master = ml.Attrs().Name
	}
	if out.Addresses, err = addresses(h, l); err != nil {
		return Link{}, false, err
	}
	return out, true, nil
}

// addresses lists the addresses on link, both families.
func addresses(h *netlink.Handle, link netlink.Link) ([]netip.Prefix, error) {
	addrs, err := RetryDump(func() ([]netlink.Addr, error) { return h.AddrList(link, netlink.FAMILY_ALL) })
	if err != nil {
		return nil, fmt.Errorf("listing addresses of %s: %w", link.Attrs().Name, err)
	}
	var out []netip.Prefix
	for _, a := range addrs {
		if a.IPNet == nil {
			continue
		}
		if ip, ok := netip.AddrFromSlice(a.IPNet.IP); ok {
			bits, _ := a.IPNet.Mask.Size()
			out = append(out, netip.PrefixFrom(ip.Unmap(), bits))
		}
	}
	return out, nil
}

// PortState is what a NIC looked like before ghostwire touched it, so that
// Remove can put it back.
type PortState struct {
	Name   string `json:"name"`
	Up     bool   `json:"up"`
	Master string `json:"master,omitempty"` // bridge it was already in, if any
}

// Observe records the current state of the named NICs.
func Observe(h *netlink.Handle, names []string) ([]PortState, error) {
	links, err := ReadLinks(h, names...)
	if err != nil {
		return nil, fmt.Errorf("recording the NICs' state: %w", err)
	}
	var out []PortState
	for _, n := range names {
		l, ok := links[n]
		if !ok {
			return nil, fmt.Errorf("recording the NICs' state: NIC %s does not exist", n)
		}
		out = append(out, PortState{Name: n, Up: l.Up, Master: l.Master})
	}
	return out, nil
}

func isNotFound(err error) bool {
	var lnf netlink.LinkNotFoundError
	return errors.As(err, &lnf) || errors.Is(err, unix.ENODEV) || errors.Is(err, unix.ENOENT)
}
