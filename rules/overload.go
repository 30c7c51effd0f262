package rules

import (
	"errors"
	"fmt"
	"time"

	"github.com/google/nftables"
	"golang.org/x/sys/unix"
)

// Overload is what the diversion does with new connections while the proxy
// is at its connection limit (see Plan.Overloaded). Flows the proxy already
// carries are diverted as usual in every mode.
type Overload int

const (
	// OverloadNone diverts new connections to the proxy: the normal plan.
	OverloadNone Overload = iota
	// OverloadBypass lets new connections to intercepted ports cross the
	// bridge untouched (layer 2, as if the proxy were down) for their
	// whole life, also after the overload ends: their first SYN puts the
	// flow into the bridge table's bypass sets, and every plan lets flows
	// in those sets through before it redirects anything.
	OverloadBypass
	// OverloadRefuse answers new connections (pure SYNs to intercepted
	// ports) with a TCP reset from the kernel.
	OverloadRefuse
)

// String is the mode as ParseOverload reads it, or "none".
func (o Overload) String() string {
	switch o {
	case OverloadNone:
		return "none"
	case OverloadBypass:
		return "bypass"
	case OverloadRefuse:
		return "refuse"
	}
	return fmt.Sprintf("Overload(%d)", int(o))
}

// ParseOverload reads an operator's overload mode: "bypass" or "refuse".
func ParseOverload(s string) (Overload, error) {
	switch s {
	case "bypass":
		return OverloadBypass, nil
	case "refuse":
		return OverloadRefuse, nil
	}
	return OverloadNone, fmt.Errorf("overload mode %q is neither %q nor %q", s, "bypass", "refuse")
}

// Overloaded returns the plan for a proxy at its connection limit: new
// connections are bypassed or refused as mode says (see Overload), while
// flows already proxied keep being diverted to it. OverloadNone gives the
// normal plan back. Draining takes precedence: Overloaded of a draining plan
// is that draining plan, and Draining of an overloaded plan drains. The
// UDPBypass switch is kept. Overloaded panics on a mode that is not one of
// the three constants.
func (p *Plan) Overloaded(mode Overload) *Plan {
	switch mode {
	case OverloadNone, OverloadBypass, OverloadRefuse:
	default:
		panic(fmt.Sprintf("rules: Plan.Overloaded(%v): not an Overload mode", mode))
	}
	if p.draining {
		return p.Draining()
	}
	return newPlan(p.Config(), variant{overload: mode, udpBypass: p.udpBypass})
}

// Overload reports the plan's overload mode (OverloadNone unless it comes
// from Overloaded).
func (p *Plan) Overload() Overload { return p.overload }

// The bridge table's flow sets (see flowSets): bypass4/bypass6 record the
// TCP flows that cross the bridge untouched, udpflows4/udpflows6 the UDP
// flows the proxy relays.
const (
	// flowSetSize bounds each flow set; once full, further flows are not
	// recorded (the add or update fails and the rule stops there): a
	// bypass SYN then takes the normal path, and a new UDP flow's
	// datagrams are not redirected (crossing the bridge untouched) until
	// entries time out.
	flowSetSize = 65536

	defaultBypassTimeout = 5 * time.Minute
	minBypassTimeout     = time.Second
	maxBypassTimeout     = 7 * 24 * time.Hour
)

// ipFamily is what differs between the IPv4 and the IPv6 flow rules.
type ipFamily struct {
	nft     string // payload protocol as nft spells it: "ip", "ip6"
	suffix  string // of its flow sets' names: "4", "6"
	ethType uint16 // the meta protocol nft checks before an ip/ip6 payload load
	keyType nftables.SetDatatype
	// addrType is the type of a set of the family's addresses (the
	// selection's interval sets).
	addrType nftables.SetDatatype
	// Offsets in the network header, address length, and the registers
	// nft loads the concatenation saddr . daddr . sport . dport into.
	saddr, daddr, addrLen uint32
	regs                  [4]uint32
}

var ipFamilies = [...]ipFamily{
	{
		nft: "ip", suffix: "4", ethType: unix.ETH_P_IP,
		keyType:  nftables.MustConcatSetType(nftables.TypeIPAddr, nftables.TypeIPAddr, nftables.TypeInetService, nftables.TypeInetService),
		addrType: nftables.TypeIPAddr,
		saddr:    12, daddr: 16, addrLen: 4,
		regs: [4]uint32{unix.NFT_REG_1, unix.NFT_REG32_01, unix.NFT_REG32_02, unix.NFT_REG32_03},
	},
	{
		nft: "ip6", suffix: "6", ethType: unix.ETH_P_IPV6,
		keyType:  nftables.MustConcatSetType(nftables.TypeIP6Addr, nftables.TypeIP6Addr, nftables.TypeInetService, nftables.TypeInetService),
		addrType: nftables.TypeIP6Addr,
		saddr:    8, daddr: 24, addrLen: 16,
		regs: [4]uint32{unix.NFT_REG_1, unix.NFT_REG_2, unix.NFT_REG_3, unix.NFT_REG32_09},
	},
}

// validFlowTimeout checks Config.BypassTimeout or UDPSessionTimeout once 0
// has become the default.
func validFlowTimeout(d time.Duration) error {
	switch {
	case d < minBypassTimeout || d > maxBypassTimeout:
		return fmt.Errorf("%v is out of range %v..%v", d, minBypassTimeout, maxBypassTimeout)
	case d%time.Second != 0:
		return fmt.Errorf("%v is not a whole number of seconds", d)
	}
	return nil
}

// BypassedFlows counts the flows currently in the bypass sets of the bridge
// table called name (IPv4 and IPv6 together): connections that cross the
// bridge untouched because they started during a bypass overload. It is 0 if
// the table or its sets do not exist. It dumps every element, so it costs in
// proportion to the count (at most 2 × 65536).
func BypassedFlows(c *nftables.Conn, name string) (int, error) {
	return countFlows(c, name, bypassSets, "bypassed flows")
}

// countFlows counts the elements of the flow sets sets (IPv4 and IPv6
// together) in the bridge table called name; what names them in errors.
func countFlows(c *nftables.Conn, name string, sets flowSets, what string) (int, error) {
	if err := validTableName(name); err != nil {
		return 0, fmt.Errorf("counting %s: %w", what, err)
	}
	existing, err := listOwn(c, name)
	if err != nil {
		return 0, fmt.Errorf("counting %s in table bridge %s: %w", what, name, err)
	}
	t := existing[nftables.TableFamilyBridge]
	if t == nil {
		return 0, nil
	}
	n := 0
	for _, f := range ipFamilies {
		set, err := c.GetSetByName(t, sets.name(f))
		if errors.Is(err, unix.ENOENT) {
			continue
		}
		if err != nil {
			return 0, fmt.Errorf("counting %s: reading set %s of table bridge %s: %w", what, sets.name(f), name, err)
		}
		els, err := c.GetSetElements(set)
		if err != nil {
			return 0, fmt.Errorf("counting %s: reading elements of set %s of table bridge %s: %w", what, sets.name(f), name, err)
		}
		n += len(els)
	}
	return n, nil
}
