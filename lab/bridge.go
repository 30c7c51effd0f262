//go:build linux

package lab

import (
	"errors"
	"fmt"
	"os"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// PlainBridge bridges the box's two ports with a bridge called name and
// nothing else: the baseline ghostwire is measured against. It also turns
// off bridge-nf-call-{iptables,ip6tables,arptables} in the box, which default
// to 1 in every namespace and would push bridged frames through the IP hooks.
// An existing bridge called name is reused; any other link called name is an
// error.
func (l *Lab) PlainBridge(name string) error {
	for _, key := range []string{"bridge-nf-call-iptables", "bridge-nf-call-ip6tables", "bridge-nf-call-arptables"} {
		// Without br_netfilter the keys are absent and there is nothing to turn off.
		if err := l.Box.Sysctl("net/bridge/"+key, "0"); err != nil && !errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("adding bridge %s: %w", name, err)
		}
	}
	h, err := l.Box.Netlink()
	if err != nil {
		return fmt.Errorf("adding bridge %s: %w", name, err)
	}
	defer h.Close()
	br := &netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: name, TxQLen: -1}}
	if err := h.LinkAdd(br); err != nil && !errors.Is(err, unix.EEXIST) {
		return fmt.Errorf("adding bridge %s: %w", name, err)
	}
	link, err := h.LinkByName(name)
	if err != nil {
		return fmt.Errorf("reading back bridge %s: %w", name, err)
	}
	if _, ok := link.(*netlink.Bridge); !ok {
		return fmt.Errorf("adding bridge %s: a %s link by that name already exists", name, link.Type())
	}
	for _, port := range []string{l.ClientNIC, l.ServerNIC} {
		pl, err := h.LinkByName(port)
		if err != nil {
			return fmt.Errorf("finding bridge port %s: %w", port, err)
		}
		if err := h.LinkSetMaster(pl, link); err != nil {
			return fmt.Errorf("adding %s to bridge %s: %w", port, name, err)
		}
		if err := h.LinkSetUp(pl); err != nil {
			return fmt.Errorf("setting %s up: %w", port, err)
		}
	}
	if err := h.LinkSetUp(link); err != nil {
		return fmt.Errorf("setting bridge %s up: %w", name, err)
	}
	return nil
}

// DeleteBridge deletes the bridge called name from the box, releasing its
// ports (they stay up). A missing bridge is not an error; a link by that name
// that is not a bridge is left alone and reported.
func (l *Lab) DeleteBridge(name string) error {
	h, err := l.Box.Netlink()
	if err != nil {
		return fmt.Errorf("deleting bridge %s: %w", name, err)
	}
	defer h.Close()
	link, err := h.LinkByName(name)
	if _, ok := err.(netlink.LinkNotFoundError); ok {
		return nil
	}
	if err != nil {
		return fmt.Errorf("finding bridge %s: %w", name, err)
	}
	if _, ok := link.(*netlink.Bridge); !ok {
		return fmt.Errorf("deleting bridge %s: it is a %s link, not a bridge", name, link.Type())
	}
	if err := h.LinkDel(link); err != nil && !errors.Is(err, unix.ENODEV) {
		return fmt.Errorf("deleting bridge %s: %w", name, err)
	}
	return nil
}
