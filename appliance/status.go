package appliance

import (
	"fmt"
	"strings"

	"github.com/ghostwire/ghostwire/bridge"
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

// Status compares the kernel with what c asks for.
func (b *Box) Status(c *Config) (*Status, error) {
	st, err := loadState(c.StateFile)
	if err != nil {
		return nil, err
	}
	rc := c.RulesConfig(nil)
	ts, err := rules.Tables(b.NFT, rc.Name)
	if err != nil {
		return nil, fmt.Errorf("reading nftables state: %w", err)
	}
	s := &Status{Tables: ts}
	if ts.Bridge {
		if s.BypassedFlows, err = rules.BypassedFlows(b.NFT, rc.Name); err != nil {
			return nil, fmt.Errorf("reading bypassed flows: %w", err)
		}
	}
	spec, err := c.BridgeSpec()
	if err != nil {
		return nil, err
	}
	if st == nil {
		s.Mode = NotProvisioned
		if ts.Bridge || ts.Inet {
			s.Drift = append(s.Drift, "ghostwire nftables tables exist but no state file: run teardown")
		}
		return s, nil
	}
	drift, err := spec.Check(b.Netlink)
	if err != nil {
		return nil, err
	}
	s.Drift = append(s.Drift, drift...)
	for _, sc := range bridge.Sysctls(spec.Name) {
		v, err := b.Sysctl.Get(sc.Key)
		if bridge.IsNotExist(err) && strings.HasPrefix(sc.Key, "net.bridge.") {
			continue // br_netfilter not loaded: nothing to turn off
		}
		if err != nil || v != sc.Value {
			s.Drift = append(s.Drift, fmt.Sprintf("sysctl %s is %q, want %s", sc.Key, v, sc.Value))
		}
	}
	rdrift, err := st.Routing.Check(b.Netlink)
	if err != nil {
		return nil, fmt.Errorf("checking policy routing: %w", err)
	}
	s.Drift = append(s.Drift, rdrift...)
	switch {
	case ts.Owned && ts.Overload == rules.OverloadBypass:
		s.Mode = OverloadedBypass
	case ts.Owned && ts.Overload == rules.OverloadRefuse:
		s.Mode = OverloadedRefuse
	case ts.Owned:
		s.Mode = Intercepting
	case ts.Bridge || ts.Inet:
		s.Mode = Diverting
	default:
		s.Mode = Bypassing
	}
	if (ts.Bridge || ts.Inet) && len(drift) == 0 {
		if mac, err := spec.MAC(b.Netlink); err == nil {
			if plan, err := rules.NewPlan(c.RulesConfig(mac)); err == nil {
				tdrift, err := plan.Overloaded(ts.Overload).Check(b.NFT)
				if err != nil {
					return nil, fmt.Errorf("checking nftables diversion: %w", err)
				}
				s.Drift = append(s.Drift, tdrift...)
			}
		}
	}
	return s, nil
}
