package provision

import (
	"fmt"
	"strings"

	"github.com/ghostwire/ghostwire/rules"
)

// Mode is what the box is doing with traffic right now.
type Mode string

const (
	// Intercepting: a live proxy owns the diversion.
	Intercepting Mode = "intercepting"
	// OverloadedBypass and OverloadedRefuse: a live proxy owns the
	// diversion but is at its connection limit (or short of fds or
	// memory), so new connections are bridged untouched or reset.
	OverloadedBypass Mode = "overloaded (bypassing new connections)"
	OverloadedRefuse Mode = "overloaded (refusing new connections)"
	// Diverting: apply's static diversion is installed but no proxy owns it;
	// diverted packets are routed by the box (works, but TTL-1 and the box's
	// MAC are visible) unless something listens on the proxy port.
	Diverting Mode = "diverting without ghostwire proxy"
	// Bypassing: provisioned, no diversion: frames are plainly bridged.
	Bypassing Mode = "bypassing (proxy down): traffic is bridged untouched"
	// NotProvisioned: no ghostwire bridge here.
	NotProvisioned Mode = "not provisioned"
)

// Status is what `ghostwire status` reports.
type Status struct {
	Mode   Mode
	Tables rules.TablesState
	Drift  []string // missing or changed pieces of the provisioning
	// BypassedFlows are connections an overload sent across the bridge
	// untouched, remembered so they stay bridged for their whole life.
	BypassedFlows int
	// UDP says the config intercepts UDP ports; UDPFlows are then the UDP
	// flows the bridge has seen a client datagram of within the UDP idle
	// timeout (its udpflows sets): the sessions the proxy relays.
	UDP      bool
	UDPFlows int
}

func (s *Status) String() string {
	var b strings.Builder
	fmt.Fprintf(&b, "ghostwire: %s\n", s.Mode)
	switch {
	case s.Tables.Owned:
		fmt.Fprintf(&b, "diversion: nftables tables owned by the running proxy (netlink port %d); they vanish if it dies\n", s.Tables.OwnerPortID)
	case s.Tables.Bridge || s.Tables.Inet:
		b.WriteString("diversion: static nftables tables installed by apply (no proxy owns them)\n")
	default:
		b.WriteString("diversion: none\n")
	}
	if s.BypassedFlows > 0 {
		fmt.Fprintf(&b, "bypassed flows: %d (crossing the bridge untouched since an overload)\n", s.BypassedFlows)
	}
	if s.UDP {
		fmt.Fprintf(&b, "udp sessions (seen within udp_idle_timeout): %d\n", s.UDPFlows)
	}
	if s.Tables.UDPBypass {
		b.WriteString("udp: at proxy.max_udp_sessions: new UDP flows cross the bridge untouched\n")
	}
	if s.Mode == NotProvisioned {
		return b.String()
	}
	if len(s.Drift) == 0 {
		b.WriteString("provisioning: in place\n")
	}
	for _, d := range s.Drift {
		fmt.Fprintf(&b, "drift: %s\n", d)
	}
	return b.String()
}

// Status compares the kernel, as f read it and d was computed from, with d;
// stateFile says whether the box is provisioned at all.
func (b *Box) Status(d *Desired, f Facts, stateFile string) (*Status, error) {
	st, err := loadState(stateFile)
	if err != nil {
		return nil, err
	}
	ts, err := rules.Tables(b.NFT, d.Tables)
	if err != nil {
		return nil, fmt.Errorf("reading nftables state: %w", err)
	}
	s := &Status{Tables: ts, Mode: mode(st != nil, ts), UDP: d.Rules != nil && len(d.Rules.Config().UDPPorts) > 0}
	if ts.Bridge {
		if s.BypassedFlows, err = rules.BypassedFlows(b.NFT, d.Tables); err != nil {
			return nil, fmt.Errorf("reading bypassed flows: %w", err)
		}
		if s.UDP {
			if s.UDPFlows, err = rules.UDPFlows(b.NFT, d.Tables); err != nil {
				return nil, fmt.Errorf("reading UDP flows: %w", err)
			}
		}
	}
	if st == nil {
		if ts.Bridge || ts.Inet {
			s.Drift = append(s.Drift, "ghostwire nftables tables exist but no state file: run teardown")
		}
		return s, nil
	}
	if s.Drift, err = b.drift(d, f, st, ts); err != nil {
		return nil, err
	}
	return s, nil
}

// mode is what the box does with traffic, given whether it is provisioned
// and which of ghostwire's tables exist.
func mode(provisioned bool, ts rules.TablesState) Mode {
	switch {
	case !provisioned:
		return NotProvisioned
	case ts.Owned && ts.Overload == rules.OverloadBypass:
		return OverloadedBypass
	case ts.Owned && ts.Overload == rules.OverloadRefuse:
		return OverloadedRefuse
	case ts.Owned:
		return Intercepting
	case ts.Bridge || ts.Inet:
		return Diverting
	default:
		return Bypassing
	}
}

// drift lists how the kernel differs from d: the bridge, the sysctls, the
// policy routing the state file recorded, and, when the bridge is in place,
// the diversion's tables in the variant they are in (overload and UDP
// bypass).
func (b *Box) drift(d *Desired, f Facts, st *State, ts rules.TablesState) ([]string, error) {
	drift, err := d.Bridge.Check(b.Netlink, f.Links)
	if err != nil {
		return nil, err
	}
	bridgeDrift := len(drift)
	for _, sc := range d.Sysctls {
		if sc.Absent() || sc.Old == sc.Value {
			continue // Absent: br_netfilter not loaded, nothing to turn off
		}
		drift = append(drift, fmt.Sprintf("sysctl %s is %q, want %s", sc.Key, sc.Old, sc.Value))
	}
	rdrift, err := st.Routing.Check(b.Netlink)
	if err != nil {
		return nil, fmt.Errorf("checking policy routing: %w", err)
	}
	drift = append(drift, rdrift...)
	if (ts.Bridge || ts.Inet) && bridgeDrift == 0 && d.Rules != nil {
		tdrift, err := d.Rules.Overloaded(ts.Overload).UDPBypass(ts.UDPBypass).Check(b.NFT)
		if err != nil {
			return nil, fmt.Errorf("checking nftables diversion: %w", err)
		}
		drift = append(drift, tdrift...)
	}
	if d.Quiet != nil {
		qdrift, err := d.Quiet.Check(b.NFT)
		if err != nil {
			return nil, fmt.Errorf("checking the quiet table: %w", err)
		}
		drift = append(drift, qdrift...)
	}
	return drift, nil
}
