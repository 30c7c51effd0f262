package appliance

import (
	"fmt"
	"slices"
	"time"

	"github.com/ghostwire/ghostwire/provision"
	"github.com/ghostwire/ghostwire/proxy"
	"github.com/ghostwire/ghostwire/rules"
)

// diversion is the diversion `run` owns: the rules of cfg's desired state
// (the one plan prints and apply installs), keeping linger's ports
// redirected. It refuses a box apply has not built.
func diversion(box *provision.Box, cfg *Config, linger []uint16) (*rules.Plan, error) {
	f, err := Facts(box, cfg)
	if err != nil {
		return nil, err
	}
	d, err := Desire(cfg, f)
	if err != nil {
		return nil, err
	}
	if drift, err := d.Bridge.Check(box.Netlink, f.Links); err != nil {
		return nil, err
	} else if len(drift) > 0 {
		return nil, fmt.Errorf("box is not provisioned (%s): run `ghostwire apply` first", drift[0])
	}
	// No drift means the bridge exists, so Desire had its MAC: d.Rules is set.
	return withLinger(d.Rules, linger)
}

// withLinger is plan keeping linger's ports redirected (rules.Config.LingerPorts).
func withLinger(plan *rules.Plan, linger []uint16) (*rules.Plan, error) {
	c := plan.Config()
	if slices.Equal(c.LingerPorts, linger) {
		return plan, nil
	}
	c.LingerPorts = linger
	p, err := rules.NewPlan(c)
	if err != nil {
		return nil, fmt.Errorf("building rule plan: %w", err)
	}
	return p, nil
}

// lingerCheck is how often ports dropped by a reload are re-examined.
const lingerCheck = 2 * time.Second

// lingering are the ports the old plan diverted that still carry proxied
// connections: a reload must not strand them (their frames would be
// bridged past the proxy that both ends are talking to).
func lingering(old *rules.Plan, p *proxy.Proxy) []uint16 {
	c := old.Config()
	diverted := append(c.TCPPorts, c.LingerPorts...)
	var out []uint16
	for _, port := range p.ActivePorts() {
		if slices.Contains(diverted, port) {
			out = append(out, port)
		}
	}
	return out
}

// overloadPlan is plan as the diversion must be now: while the proxy is
// overloaded, new connections bypass it or are refused (proxy.overload);
// while it is at proxy.max_udp_sessions, new UDP flows bypass it (UDP has
// no refusal). plan itself is always the normal variant.
func (s *session) overloadPlan(plan *rules.Plan) *rules.Plan {
	if s.p.Overloaded() {
		plan = plan.Overloaded(s.cfg.overload())
	}
	return plan.UDPBypass(s.p.UDPOverloaded())
}

// shrinkLinger drops lingering ports whose last proxied connection ended.
func (s *session) shrinkLinger() error {
	c := s.plan.Config()
	if len(c.LingerPorts) == 0 {
		return nil
	}
	active := s.p.ActivePorts()
	keep := slices.DeleteFunc(slices.Clone(c.LingerPorts), func(port uint16) bool { return !slices.Contains(active, port) })
	if len(keep) == len(c.LingerPorts) {
		return nil
	}
	dropped := slices.DeleteFunc(slices.Clone(c.LingerPorts), func(port uint16) bool { return slices.Contains(keep, port) })
	nplan, err := withLinger(s.plan, keep)
	if err != nil {
		return err
	}
	if err := s.overloadPlan(nplan).ApplyOwned(s.nft); err != nil {
		return err
	}
	s.plan = nplan
	s.r.Logger.Info("stopped diverting ports with no proxied connections left", "ports", dropped, "lingering", keep)
	return nil
}
