// Package provision makes a box match a desired state (bridge, sysctls, policy routing, nftables diversion), records what it changed, reports drift and undoes it all.
package provision

import (
	"fmt"

	"github.com/google/nftables"
	"github.com/vishvananda/netlink"

	"github.com/ghostwire/ghostwire/bridge"
)

// Box is the kernel ghostwire provisions: the handles are opened by the
// caller in the network namespace it means, so tests can point a Box at a
// throwaway namespace.
type Box struct {
	Netlink *netlink.Handle
	NFT     *nftables.Conn // not needed by Facts
	Sysctl  bridge.SysctlFS
}

// Open opens handles in the calling thread's network namespace.
func Open() (*Box, error) {
	h, err := netlink.NewHandle()
	if err != nil {
		return nil, fmt.Errorf("opening netlink: %w", err)
	}
	c, err := nftables.New()
	if err != nil {
		h.Close()
		return nil, fmt.Errorf("opening nftables netlink: %w", err)
	}
	return &Box{Netlink: h, NFT: c}, nil
}

// Close closes the handles Open opened.
func (b *Box) Close() {
	b.Netlink.Close()
	b.NFT.CloseLasting()
}
