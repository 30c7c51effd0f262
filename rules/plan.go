// Package rules builds ghostwire's nftables diversion ruleset and policy routing, and applies them atomically.
//
// A Plan comes in four variants of the same tables: normal (new connections
// are TPROXYed to the proxy), Draining (new connections are routed past it)
// and the two overloads (Overloaded: new connections are bridged untouched,
// or refused with a reset). Every variant keeps the bridge table's bypass
// sets and lets the flows recorded in them through first, so a plan change
// never pulls a bypassed flow back into the box. With UDP ports, UDPBypass
// is a switch orthogonal to those variants: new UDP flows cross the bridge
// untouched while those the proxy relays stay diverted.
//
// With Config.Invisible a plan has a third table, netdev, that hides the box
// at layer 2 (invisible.go); Quiet is the separate, persistent table that
// drops whatever the box would still say with its own MAC (quiet.go).
package rules

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"time"

	"github.com/google/nftables"

	"github.com/ghostwire/ghostwire/bridge"
)

// Config is everything the diversion needs, in plain values.
type Config struct {
	Name       string           // nft table name used in both families, e.g. "ghostwire"
	Bridge     string           // bridge device, e.g. "br0" (inet rules match iifname Bridge)
	ClientPort string           // bridge port toward clients
	ServerPort string           // bridge port toward servers
	BridgeMAC  net.HardwareAddr // written as destination MAC into diverted frames
	TCPPorts   []uint16         // intercepted TCP ports (NewPlan sorts + dedups)
	// LingerPorts are ports no longer intercepted whose proxied connections
	// are still open (after a reload dropped them). Their frames are still
	// redirected to the box, so those flows live on; their new connections
	// are not proxied (routed through). Overlap with TCPPorts is dropped.
	LingerPorts  []uint16
	ProxyTCPPort uint16 // local TPROXY port
	Mark         uint32 // fwmark for policy routing (non-zero)
	RouteTable   int    // policy routing table (1..2^31-1, not 253/254/255 default/main/local)
	RulePriority int    // ip rule priority ghostwire owns (1..32765: before the main table)
	// BypassTimeout is how long a flow bypassed during an overload
	// (OverloadBypass) stays in the bypass set without a frame from its
	// client; every client frame starts it again. Once it runs out, the
	// flow's frames are diverted like any other (a proxied port's then
	// routed through the box, not bridged). 0 means 5 minutes; otherwise
	// it must be a whole number of seconds from 1s to 7 days.
	BypassTimeout time.Duration
	// UDPPorts are the intercepted UDP ports (NewPlan sorts + dedups). With
	// none, the tables hold nothing of UDP (and list as a TCP-only plan).
	UDPPorts []uint16
	// ProxyUDPPort is the local TPROXY port for UDP: required when
	// UDPPorts is not empty, and not one of them.
	ProxyUDPPort uint16
	// UDPSessionTimeout is how long a UDP flow stays in the bridge table's
	// udpflows sets without a frame from its client; every client frame
	// starts it again. The sets are what keeps a relayed flow diverted
	// under UDPBypass, so it should be at least the proxy's UDP idle
	// timeout. 0 means 60s; otherwise it must be a whole number of
	// seconds from 1s to 7 days.
	UDPSessionTimeout time.Duration
	// ClientCIDRs and ServerCIDRs select the flows that are proxied: a new
	// flow is only if its client (server) address is in one of the
	// prefixes, or the list is empty. ExcludeClientCIDRs and
	// ExcludeServerCIDRs take flows out again. Every other flow crosses
	// the bridge untouched (see selection.go). IPv4 and IPv6 mix freely;
	// NewPlan masks, sorts and deduplicates them and drops prefixes inside
	// others. With all four empty the tables hold nothing of selection.
	ClientCIDRs, ServerCIDRs               []netip.Prefix
	ExcludeClientCIDRs, ExcludeServerCIDRs []netip.Prefix
	// Invisible hides the box at layer 2 (invisible.go): a third table,
	// netdev Name, learns the hosts' MACs from the frames it diverts and
	// rewrites both MACs of every frame the box sends out of Bridge, and
	// the bridge table lifts only what it learned. It lives and dies with
	// the other two (owned, applied, removed and checked with them); a
	// plan without it removes a netdev table of that name. The box's
	// other frames are the quiet table's to drop (Quiet). The mark bits
	// InvisibleMarks are then the mode's: Mark must not overlap them.
	Invisible bool
	// NeighbourTimeout is how long a learned host stays in the invisible
	// mode's neighbour maps: an entry is never refreshed (a MAC is only
	// replaced by a new entry or the host's own ARP/NDP), so it is
	// re-learned from the next diverted frame after it expires. 0 means
	// 60s; otherwise it must be a whole number of seconds from 1s to 7
	// days. Unused without Invisible.
	NeighbourTimeout time.Duration
}

// Plan is a validated Config: the nftables tables (bridge and inet, and
// netdev when Invisible) and the policy routing ghostwire installs, as values that can be printed, applied and checked.
// A Plan is immutable; its methods are safe for concurrent use.
type Plan struct {
	cfg Config
	variant
	// tables is the ruleset of this variant, described once (see describe).
	tables []table
}

// variant is which of the plan's variants the tables are.
type variant struct {
	// draining replaces the TPROXY of new connections with a plain accept
	// (see Draining).
	draining bool
	// overload bypasses or refuses new connections (see Overloaded); it
	// is OverloadNone when draining.
	overload Overload
	// udpBypass lets new UDP flows cross the bridge untouched (see
	// UDPBypass); only ever set with UDP ports.
	udpBypass bool
}

// newPlan is the plan for a validated cfg in variant v.
func newPlan(cfg Config, v variant) *Plan {
	p := &Plan{cfg: cfg, variant: v}
	p.tables = p.describe()
	return p
}

// Limits the kernel and iproute2 put on the values in Config.
const (
	maxTableName    = 64 // well below NFT_NAME_MAXLEN; nft names are for humans
	maxRouteTable   = 1<<31 - 1
	maxRulePrio     = 32765 // 32766 is the main table's rule: ours must come first
	setName         = "tcp_ports"
	udpSetName      = "udp_ports"
	chainPrerouting = "prerouting"
	chainInput      = "input"
)

// Routing tables the kernel reserves (unspec is 0, rejected by the range check).
var reservedTables = map[int]string{253: "default", 254: "main", 255: "local"}

// NewPlan validates cfg without touching the kernel and returns its Plan.
// TCPPorts and UDPPorts are sorted and deduplicated, the selection's
// prefixes normalised (see Config.ClientCIDRs); BridgeMAC and the
// ports are copied; a zero BypassTimeout becomes the default (5m), a zero
// UDPSessionTimeout and NeighbourTimeout their own (60s).
// Every error names the offending Config field; all problems are reported
// together.
func NewPlan(cfg Config) (*Plan, error) {
	cfg = cfg.normalised()
	if err := cfg.check(true); err != nil {
		return nil, err
	}
	return newPlan(cfg, variant{}), nil
}

// Validate checks everything NewPlan checks except BridgeMAC, which comes
// from the kernel: a caller can refuse a bad config before it reads the
// kernel at all (appliance does, at load).
func (cfg Config) Validate() error { return cfg.normalised().check(false) }

// normalised sorts and deduplicates the ports, copies the slices and fills
// in the default timeouts.
func (cfg Config) normalised() Config {
	cfg.BridgeMAC = slices.Clone(cfg.BridgeMAC)
	cfg.TCPPorts = slices.Compact(slices.Sorted(slices.Values(cfg.TCPPorts)))
	cfg.LingerPorts = minus(slices.Compact(slices.Sorted(slices.Values(cfg.LingerPorts))), cfg.TCPPorts)
	cfg.UDPPorts = slices.Compact(slices.Sorted(slices.Values(cfg.UDPPorts)))
	if cfg.BypassTimeout == 0 {
		cfg.BypassTimeout = defaultBypassTimeout
	}
	if cfg.UDPSessionTimeout == 0 {
		cfg.UDPSessionTimeout = defaultUDPSessionTimeout
	}
	if cfg.NeighbourTimeout == 0 {
		cfg.NeighbourTimeout = defaultNeighbourTimeout
	}
	for _, s := range selections {
		l := cfg.list(s)
		*l = normalisePrefixes(*l)
	}
	return cfg
}

// check is the one place of rules.Config's validation; withMAC includes
// BridgeMAC.
func (cfg Config) check(withMAC bool) error {
	var errs []error
	bad := func(field, format string, a ...any) { errs = append(errs, fieldErr(field, format, a...)) }
	checkNames(cfg, bad)
	if withMAC {
		checkMAC(cfg.BridgeMAC, bad)
	}
	checkNumbers(cfg, bad)
	if len(errs) > 0 {
		return fmt.Errorf("invalid rules config: %w", errors.Join(errs...))
	}
	return nil
}

// checkNames reports, through bad, what is wrong with cfg's table name
// and interfaces.
func checkNames(cfg Config, bad func(field, format string, a ...any)) {
	if err := validTableName(cfg.Name); err != nil {
		bad("Name", "%w", err)
	}
	for _, f := range []struct{ field, name string }{
		{"Bridge", cfg.Bridge}, {"ClientPort", cfg.ClientPort}, {"ServerPort", cfg.ServerPort},
	} {
		if err := bridge.ValidIfName(f.name); err != nil {
			bad(f.field, "%w", err)
		}
	}
	if cfg.ClientPort != "" && cfg.ClientPort == cfg.ServerPort {
		bad("ServerPort", "%q is also the ClientPort; the two bridge ports must differ", cfg.ServerPort)
	}
	if cfg.Bridge != "" && (cfg.Bridge == cfg.ClientPort || cfg.Bridge == cfg.ServerPort) {
		bad("Bridge", "%q is also a bridge port", cfg.Bridge)
	}
}

// checkMAC reports, through bad, a bridge MAC the redirect cannot write.
func checkMAC(mac net.HardwareAddr, bad func(field, format string, a ...any)) {
	switch {
	case len(mac) != 6:
		bad("BridgeMAC", "%q is not a 6-byte Ethernet address", mac.String())
	case mac[0]&1 != 0:
		bad("BridgeMAC", "%s is a multicast address", mac)
	case slices.Equal(mac, make(net.HardwareAddr, 6)):
		bad("BridgeMAC", "%s is the zero address", mac)
	}
}

// checkNumbers reports, through bad, what is wrong with cfg's ports, mark,
// routing and timeout.
func checkNumbers(cfg Config, bad func(field, format string, a ...any)) {
	if len(cfg.TCPPorts) == 0 {
		bad("TCPPorts", "at least one intercepted port is needed")
	} else if cfg.TCPPorts[0] == 0 {
		bad("TCPPorts", "port 0 cannot be intercepted")
	}
	switch {
	case cfg.ProxyTCPPort == 0:
		bad("ProxyTCPPort", "must be set (got 0)")
	case slices.Contains(cfg.TCPPorts, cfg.ProxyTCPPort):
		// The input chain refuses direct connections to the proxy port;
		// intercepting it too would make the proxy relay to itself.
		bad("ProxyTCPPort", "%d is also an intercepted port: the proxy would divert to itself", cfg.ProxyTCPPort)
	}
	checkUDP(cfg, bad)
	checkSelection(cfg, bad)
	for _, fe := range Fields(cfg.routing().validate()) {
		bad(fe.Field, "%w", fe.Err)
	}
	if err := validFlowTimeout(cfg.BypassTimeout); err != nil {
		bad("BypassTimeout", "%w", err)
	}
	if err := validFlowTimeout(cfg.UDPSessionTimeout); err != nil {
		bad("UDPSessionTimeout", "%w", err)
	}
	if err := validFlowTimeout(cfg.NeighbourTimeout); err != nil {
		bad("NeighbourTimeout", "%w", err)
	}
	if cfg.Invisible && cfg.Mark&InvisibleMarks != 0 {
		bad("Mark", "%#x overlaps the mark bits 0x%08x the invisible mode uses (InvisibleMarks)", cfg.Mark, InvisibleMarks)
	}
}

// checkUDP reports, through bad, what is wrong with cfg's UDP ports. UDP
// and TCP ports are separate spaces: ProxyUDPPort may equal ProxyTCPPort
// or an intercepted TCP port.
func checkUDP(cfg Config, bad func(field, format string, a ...any)) {
	if len(cfg.UDPPorts) == 0 {
		return // ProxyUDPPort is then unused
	}
	if cfg.UDPPorts[0] == 0 {
		bad("UDPPorts", "port 0 cannot be intercepted")
	}
	switch {
	case cfg.ProxyUDPPort == 0:
		bad("ProxyUDPPort", "must be set (got 0) when UDP ports are intercepted")
	case slices.Contains(cfg.UDPPorts, cfg.ProxyUDPPort):
		// As for TCP: the input chain refuses datagrams to the proxy
		// port; intercepting it would make the proxy relay to itself.
		bad("ProxyUDPPort", "%d is also an intercepted UDP port: the proxy would divert to itself", cfg.ProxyUDPPort)
	}
}

// validTableName keeps names to what nft prints and parses back unquoted.
func validTableName(name string) error {
	if name == "" {
		return errors.New("table name is empty")
	}
	if len(name) > maxTableName {
		return fmt.Errorf("table name %q is longer than %d bytes", name, maxTableName)
	}
	for i, r := range name {
		letter := r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z'
		if !letter && (i == 0 || !(r >= '0' && r <= '9' || r == '_')) {
			return fmt.Errorf("table name %q must be a letter followed by letters, digits or '_'", name)
		}
	}
	return nil
}

// Config returns a copy of the validated (sorted, deduplicated) config.
func (p *Plan) Config() Config {
	c := p.cfg
	c.BridgeMAC = slices.Clone(c.BridgeMAC)
	c.TCPPorts = slices.Clone(c.TCPPorts)
	c.LingerPorts = slices.Clone(c.LingerPorts)
	c.UDPPorts = slices.Clone(c.UDPPorts)
	for _, s := range selections {
		l := c.list(s)
		*l = slices.Clone(*l)
	}
	return c
}

// redirectPorts are the ports whose frames the bridge table sends up to
// the box: the intercepted ones and the lingering ones.
func (p *Plan) redirectPorts() []uint16 {
	return slices.Sorted(slices.Values(append(slices.Clone(p.cfg.TCPPorts), p.cfg.LingerPorts...)))
}

// portsFor is the content of the tcp_ports set in the table of family fam
// (the udp_ports set is UDPPorts in both).
func (p *Plan) portsFor(fam nftables.TableFamily) []uint16 {
	if fam == nftables.TableFamilyBridge {
		return p.redirectPorts()
	}
	return p.cfg.TCPPorts
}

// Draining returns the plan for a proxy that is shutting down: new TCP
// connections (pure SYNs) are accepted untouched instead of TPROXYed, so they
// are routed past the proxy, while established proxied flows keep matching
// the socket rule until they finish. Accepting the SYN explicitly (rather
// than dropping the rule) keeps it away from the socket rule, which would
// match the proxy's own TIME_WAIT sockets (see docs/kernel.md#l3-diversion).
// New UDP flows are accepted likewise (routed), while those of the proxy's
// sessions keep reaching its sockets. A draining plan is never overloaded:
// Draining of an overloaded plan drains. Its UDPBypass is p's.
func (p *Plan) Draining() *Plan {
	return newPlan(p.Config(), variant{draining: true, udpBypass: p.udpBypass})
}

// IsDraining reports whether p comes from Draining.
func (p *Plan) IsDraining() bool { return p.draining }

// Routing returns the policy routing the plan needs.
func (p *Plan) Routing() Routing { return p.cfg.routing() }

// routing is the policy routing of cfg's Mark, RouteTable and RulePriority.
func (cfg Config) routing() Routing {
	return Routing{Mark: cfg.Mark, Table: cfg.RouteTable, Priority: cfg.RulePriority}
}
