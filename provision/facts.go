package provision

import (
	"errors"
	"fmt"
	"net"
	"net/netip"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/ghostwire/ghostwire/bridge"
)

// Facts are what the desired state depends on in the kernel, read once:
// the links ghostwire builds on and the sysctls it sets. Plain data, so
// the desired state is a pure function of config and Facts, and tests give
// Facts as fixtures.
type Facts struct {
	// Links are the bridge and the two NICs, by name; a name that is not
	// there is a link that does not exist.
	Links map[string]Link
	// Sysctls are the current values of bridge.Sysctls' keys; a key that
	// is not there does not exist (br_netfilter not loaded, or the bridge
	// not created yet).
	Sysctls map[string]string
}

// Link is one network interface as Preflight and the bridge MAC need it.
type Link struct {
	Kind      string // netlink's type: "bridge", "veth", "device", ...
	MAC       net.HardwareAddr
	Loopback  bool
	Up        bool
	Master    string         // the bridge it is a port of, if any
	Addresses []netip.Prefix // both families, including link-local
}

// Facts reads the links named bridgeName and nics and the sysctls a bridge
// of that name needs. Links and keys that do not exist are left out; other
// read errors are returned.
func (b *Box) Facts(bridgeName string, nics []string) (Facts, error) {
	f := Facts{Links: map[string]Link{}, Sysctls: map[string]string{}}
	for _, name := range append([]string{bridgeName}, nics...) {
		l, ok, err := b.link(name)
		if err != nil {
			return Facts{}, err
		}
		if ok {
			f.Links[name] = l
		}
	}
	for _, s := range bridge.Sysctls(bridgeName) {
		v, err := b.Sysctl.Get(s.Key)
		if bridge.IsNotExist(err) {
			continue
		} else if err != nil {
			return Facts{}, err
		}
		f.Sysctls[s.Key] = v
	}
	return f, nil
}

// link reads one interface; ok is false if it does not exist.
func (b *Box) link(name string) (_ Link, ok bool, _ error) {
	l, err := b.Netlink.LinkByName(name)
	if isNotFound(err) {
		return Link{}, false, nil
	} else if err != nil {
		return Link{}, false, fmt.Errorf("looking up link %s: %w", name, err)
	}
	a := l.Attrs()
	out := Link{
		Kind:     l.Type(),
		MAC:      a.HardwareAddr,
		Loopback: a.Flags&net.FlagLoopback != 0,
		Up:       a.Flags&net.FlagUp != 0,
	}
	if a.MasterIndex != 0 {
		ml, err := b.Netlink.LinkByIndex(a.MasterIndex)
		if err != nil {
			return Link{}, false, fmt.Errorf("looking up master of link %s: %w", name, err)
		}
		out.Master = ml.Attrs().Name
	}
	if out.Addresses, err = b.addresses(l); err != nil {
		return Link{}, false, err
	}
	return out, true, nil
}

// addresses lists the addresses on link, both families.
func (b *Box) addresses(link netlink.Link) ([]netip.Prefix, error) {
	var addrs []netlink.Addr
	var err error
	// A dump the kernel interrupted because addresses changed underneath
	// it is simply asked again.
	for range 5 {
		if addrs, err = b.Netlink.AddrList(link, netlink.FAMILY_ALL); !errors.Is(err, netlink.ErrDumpInterrupted) {
			break
		}
	}
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

func isNotFound(err error) bool {
	var lnf netlink.LinkNotFoundError
	return errors.As(err, &lnf) || errors.Is(err, unix.ENODEV) || errors.Is(err, unix.ENOENT)
}

// BridgeMAC is the Ethernet address the bridge has, or will get from
// bridge.Spec.Apply (the client NIC's, spec.Ports[0]); ok is false if
// neither link exists.
func (f Facts) BridgeMAC(spec bridge.Spec) (_ net.HardwareAddr, ok bool) {
	if l, ok := f.Links[spec.Name]; ok {
		return l.MAC, true
	}
	if l, ok := f.Links[spec.Ports[0]]; ok {
		return l.MAC, true
	}
	return nil, false
}
