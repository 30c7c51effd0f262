//go:build linux

package lab

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"regexp"
	"sync"
	"syscall"
	"testing"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// maxPrefix keeps the longest interface name, Prefix+"lan", within IFNAMSIZ-1.
const maxPrefix = unix.IFNAMSIZ - 1 - len("lan")

// prefixRE keeps names usable as interface names and in dotted sysctl keys.
var prefixRE = regexp.MustCompile(`^[A-Za-z0-9_-]+$`)

// Lab is one client–box–server topology. Its exported fields describe it and
// must not be changed.
type Lab struct {
	Prefix              string
	Client, Box, Server *NS

	// ClientNIC and ServerNIC are the box's two ports: the "NICs" ghostwire
	// bridges. They start up and not enslaved.
	ClientNIC, ServerNIC string
	// ClientIf and ServerIf are their peers in the client and server
	// namespaces, carrying the addresses below.
	ClientIf, ServerIf   string
	ClientMAC, ServerMAC net.HardwareAddr

	ClientIP4, ServerIP4 netip.Addr
	ClientIP6, ServerIP6 netip.Addr
	Subnet4, Subnet6     netip.Prefix
	// BoxIP4 and BoxIP6 are suggested management addresses for the box's
	// bridge; the lab does not assign them.
	BoxIP4, BoxIP6 netip.Prefix

	// MTU of every veth; 0 means the kernel default.
	MTU int
	// SilentPorts: the box's ports came up with IPv6 off (WithSilentPorts).
	SilentPorts bool

	mu      sync.Mutex
	created []*NS // namespaces this lab created, in creation order
	procs   []*Process
	closed  bool
}

// Option changes how New builds the lab.
type Option func(*options)

type options struct {
	mtu         int
	silentPorts bool
}

// WithMTU sets the MTU of all four veth ends.
func WithMTU(mtu int) Option { return func(o *options) { o.mtu = mtu } }

// WithSilentPorts brings the box's ports up with IPv6 off, as the OS of
// an invisible box must (a port with IPv6 sends MLD and router
// solicitations from its own MAC when it comes up, before ghostwire runs):
// captures from the start then see only what ghostwire makes the box say.
func WithSilentPorts() Option { return func(o *options) { o.silentPorts = true } }

// UniquePrefix returns "gw" and six random hex digits, short enough for New.
func UniquePrefix() string {
	b := make([]byte, 3)
	_, _ = rand.Read(b) // crypto/rand.Read never fails on Linux
	return "gw" + hex.EncodeToString(b)
}

// NewT builds a lab named UniquePrefix() for a test and closes it in
// tb.Cleanup. Without root it skips the test; any other failure is fatal.
func NewT(tb testing.TB, opts ...Option) *Lab {
	tb.Helper()
	if os.Geteuid() != 0 {
		tb.Skip("needs root (CAP_NET_ADMIN, CAP_SYS_ADMIN): run as root, e.g. sudo go test")
	}
	l, err := New(UniquePrefix(), opts...)
	if errors.Is(err, syscall.EPERM) {
		tb.Skipf("needs root (CAP_NET_ADMIN, CAP_SYS_ADMIN): %v", err)
	}
	if err != nil {
		tb.Fatalf("building lab: %v", err)
	}
	tb.Cleanup(func() {
		if err := l.Close(); err != nil {
			tb.Errorf("closing lab %s: %v", l.Prefix, err)
		}
	})
	return l
}

// NewNST creates one throwaway namespace named UniquePrefix() with lo up,
// for tests that need a kernel of their own but no topology, and deletes
// it in tb.Cleanup. Without root it skips the test.
func NewNST(tb testing.TB) *NS {
	tb.Helper()
	if os.Geteuid() != 0 {
		tb.Skip("needs root (CAP_NET_ADMIN, CAP_SYS_ADMIN): run as root, e.g. sudo go test")
	}
	ns, err := createNS(UniquePrefix())
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() {
		if err := deleteNS(ns); err != nil {
			tb.Errorf("deleting %v", err)
		}
	})
	h, err := ns.Netlink()
	if err != nil {
		tb.Fatal(err)
	}
	defer h.Close()
	if err := upLinks(h, ns, "lo"); err != nil {
		tb.Fatalf("setting lo up in %s: %v", ns.Name, err)
	}
	return ns
}

// New builds the lab: namespaces PREFIX-client, PREFIX-box and PREFIX-server
// and the two veth pairs between them. prefix must be 1–12 characters of
// [A-Za-z0-9_-]. On failure New removes everything it created; it never
// touches a namespace that already existed (that is an error, not reuse).
func New(prefix string, opts ...Option) (*Lab, error) {
	if len(prefix) == 0 || len(prefix) > maxPrefix || !prefixRE.MatchString(prefix) {
		return nil, fmt.Errorf("invalid lab prefix %q: want 1-%d characters of [A-Za-z0-9_-]", prefix, maxPrefix)
	}
	var o options
	for _, opt := range opts {
		opt(&o)
	}
	l := &Lab{
		Prefix:      prefix,
		ClientNIC:   prefix + "lan",
		ServerNIC:   prefix + "wan",
		ClientIf:    prefix + "c",
		ServerIf:    prefix + "s",
		ClientIP4:   netip.MustParseAddr("192.0.2.1"),
		ServerIP4:   netip.MustParseAddr("192.0.2.2"),
		ClientIP6:   netip.MustParseAddr("2001:db8:1::1"),
		ServerIP6:   netip.MustParseAddr("2001:db8:1::2"),
		Subnet4:     netip.MustParsePrefix("192.0.2.0/24"),
		Subnet6:     netip.MustParsePrefix("2001:db8:1::/64"),
		BoxIP4:      netip.MustParsePrefix("192.0.2.254/24"),
		BoxIP6:      netip.MustParsePrefix("2001:db8:1::fe/64"),
		MTU:         o.mtu,
		SilentPorts: o.silentPorts,
	}
	success := false
	defer func() {
		if !success {
			_ = l.Close()
		}
	}()
	if err := l.build(); err != nil {
		return nil, fmt.Errorf("building lab %s: %w", prefix, err)
	}
	success = true
	return l, nil
}

func (l *Lab) build() error {
	for _, ns := range []struct {
		dst    **NS
		suffix string
	}{{&l.Client, "-client"}, {&l.Box, "-box"}, {&l.Server, "-server"}} {
		created, err := createNS(l.Prefix + ns.suffix)
		if err != nil {
			return err
		}
		*ns.dst = created
		l.mu.Lock()
		l.created = append(l.created, created)
		l.mu.Unlock()
	}

	box, err := l.Box.Netlink()
	if err != nil {
		return err
	}
	defer box.Close()
	if err := l.addVeth(box, l.ClientNIC, l.Client, l.ClientIf); err != nil {
		return err
	}
	if err := l.addVeth(box, l.ServerNIC, l.Server, l.ServerIf); err != nil {
		return err
	}

	// Sysctls go in before links come up so that no DAD or router
	// solicitation starts: IPv6 is usable at once and captures stay quiet.
	boxSysctls := [][2]string{}
	for _, port := range []string{l.ClientNIC, l.ServerNIC} {
		boxSysctls = append(boxSysctls,
			[2]string{"net/ipv6/conf/" + port + "/accept_dad", "0"},
			[2]string{"net/ipv6/conf/" + port + "/router_solicitations", "0"})
		if l.SilentPorts {
			boxSysctls = append(boxSysctls, [2]string{"net/ipv6/conf/" + port + "/disable_ipv6", "1"})
		}
	}
	if err := l.Box.sysctls(boxSysctls); err != nil {
		return err
	}
	if err := upLinks(box, l.Box, "lo", l.ClientNIC, l.ServerNIC); err != nil {
		return err
	}

	ip4len, ip6len := l.Subnet4.Bits(), l.Subnet6.Bits()
	for _, end := range []struct {
		ns       *NS
		ifname   string
		ip4, ip6 netip.Addr
		mac      *net.HardwareAddr
	}{
		{l.Client, l.ClientIf, l.ClientIP4, l.ClientIP6, &l.ClientMAC},
		{l.Server, l.ServerIf, l.ServerIP4, l.ServerIP6, &l.ServerMAC},
	} {
		mac, err := l.setupHost(end.ns, end.ifname,
			netip.PrefixFrom(end.ip4, ip4len), netip.PrefixFrom(end.ip6, ip6len))
		if err != nil {
			return err
		}
		*end.mac = mac
	}
	return nil
}

// addVeth creates a veth pair with name in the box and peer directly in ns,
// so nothing ever has to be moved between namespaces.
func (l *Lab) addVeth(box *netlink.Handle, name string, ns *NS, peer string) error {
	fd, err := ns.open()
	if err != nil {
		return err
	}
	defer fd.Close()
	veth := &netlink.Veth{
		LinkAttrs:     netlink.LinkAttrs{Name: name, MTU: l.MTU, TxQLen: -1},
		PeerName:      peer,
		PeerNamespace: netlink.NsFd(fd),
		PeerTxQLen:    -1,
		PeerMTU:       uint32(l.MTU),
	}
	if err := box.LinkAdd(veth); err != nil {
		return fmt.Errorf("adding veth %s (peer %s in %s): %w", name, peer, ns.Name, err)
	}
	return nil
}

// setupHost configures one end host (client or server) and returns its MAC.
func (l *Lab) setupHost(ns *NS, ifname string, ip4, ip6 netip.Prefix) (net.HardwareAddr, error) {
	err := ns.sysctls([][2]string{
		// Many short connections in benchmarks and tests would otherwise
		// run out of ports to TIME_WAIT.
		{"net/ipv4/tcp_tw_reuse", "1"},
		{"net/ipv4/ip_local_port_range", "1024 65000"},
		// The proxy's own ports (TCP ProxyPort, UDP the one after it, the
		// default): the box listens on them, so a client connection from
		// one cannot keep its port upstream and falls back to another.
		// That fallback is tested on purpose; elsewhere a test expects
		// the client's port kept, and the kernel must not pick these.
		{"net/ipv4/ip_local_reserved_ports", fmt.Sprintf("%d-%d", ProxyPort, ProxyPort+1)},
		{"net/ipv6/conf/" + ifname + "/accept_dad", "0"},
		{"net/ipv6/conf/" + ifname + "/router_solicitations", "0"},
	})
	if err != nil {
		return nil, err
	}
	h, err := ns.Netlink()
	if err != nil {
		return nil, err
	}
	defer h.Close()
	link, err := h.LinkByName(ifname)
	if err != nil {
		return nil, fmt.Errorf("finding %s in %s: %w", ifname, ns.Name, err)
	}
	for _, p := range []netip.Prefix{ip4, ip6} {
		addr := &netlink.Addr{
			IPNet: &net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())},
			// No DAD: the address is usable the moment the link is up.
			Flags: unix.IFA_F_NODAD,
		}
		if err := h.AddrAdd(link, addr); err != nil {
			return nil, fmt.Errorf("adding address %s to %s in %s: %w", p, ifname, ns.Name, err)
		}
	}
	if err := upLinks(h, ns, "lo", ifname); err != nil {
		return nil, err
	}
	return link.Attrs().HardwareAddr, nil
}

func upLinks(h *netlink.Handle, ns *NS, names ...string) error {
	for _, name := range names {
		link, err := h.LinkByName(name)
		if err != nil {
			return fmt.Errorf("finding %s in %s: %w", name, ns.Name, err)
		}
		if err := h.LinkSetUp(link); err != nil {
			return fmt.Errorf("setting %s up in %s: %w", name, ns.Name, err)
		}
	}
	return nil
}

// Close stops every process started with Start (SIGTERM, then SIGKILL after
// a bounded wait), deletes the box's veths (which deletes their peers) and
// then the namespaces, with anything else in them such as a bridge. Only
// namespaces this lab created are deleted. Calling Close again does nothing
// and returns nil.
func (l *Lab) Close() error {
	l.mu.Lock()
	if l.closed {
		l.mu.Unlock()
		return nil
	}
	l.closed = true
	procs := l.procs
	l.procs = nil
	created := l.created
	l.mu.Unlock()

	var errs []error
	var wg sync.WaitGroup
	for _, p := range procs {
		wg.Go(func() { _ = p.Stop(syscall.SIGTERM, closeGrace) })
	}
	wg.Wait()
	for _, p := range procs {
		select {
		case <-p.Done():
		default:
			errs = append(errs, fmt.Errorf("stopping %s (pid %d): still running after SIGKILL", p.name, p.PID()))
		}
	}

	// Deleting the links explicitly makes them disappear now, even if a
	// leftover socket keeps a namespace alive after its bind mount is gone.
	if l.Box != nil && containsNS(created, l.Box) {
		errs = append(errs, l.deleteVeths())
	}
	for i := len(created) - 1; i >= 0; i-- {
		errs = append(errs, deleteNS(created[i]))
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("closing lab %s: %w", l.Prefix, err)
	}
	return nil
}

func (l *Lab) deleteVeths() error {
	h, err := l.Box.Netlink()
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil
		}
		return err
	}
	defer h.Close()
	var errs []error
	for _, name := range []string{l.ClientNIC, l.ServerNIC} {
		link, err := h.LinkByName(name)
		if _, ok := err.(netlink.LinkNotFoundError); ok {
			continue
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("finding %s to delete: %w", name, err))
			continue
		}
		if err := h.LinkDel(link); err != nil && !errors.Is(err, unix.ENODEV) {
			errs = append(errs, fmt.Errorf("deleting %s: %w", name, err))
		}
	}
	return errors.Join(errs...)
}

func containsNS(list []*NS, ns *NS) bool {
	for _, n := range list {
		if n == ns {
			return true
		}
	}
	return false
}
