package appliance

import (
	"errors"
	"fmt"
	"slices"

	"github.com/ghostwire/ghostwire/bridge"
	"github.com/ghostwire/ghostwire/provision"
	"github.com/ghostwire/ghostwire/rules"
)

// Desire is the whole box c asks for, given the kernel facts f: the bridge,
// the sysctls with their current values, the policy routing and the
// diversion. It reads nothing but its arguments, so plan, apply, run,
// status and teardown all see the same box, and golden tests need no
// kernel. The diversion is left out (nil) only when f holds neither the
// bridge nor the client NIC, to take the bridge MAC from.
func Desire(c *Config, f provision.Facts) (*provision.Desired, error) {
	spec, err := c.BridgeSpec()
	if err != nil {
		return nil, err
	}
	rc := c.RulesConfig(nil)
	d := &provision.Desired{
		Bridge:  spec,
		Sysctls: provision.SysctlChanges(spec, f),
		Routing: rules.Routing{Mark: rc.Mark, Table: rc.RouteTable, Priority: rc.RulePriority},
		Tables:  rc.Name,
	}
	if mac, ok := spec.MAC(f.Links); ok {
		rc.BridgeMAC = mac
		if d.Rules, err = rules.NewPlan(rc); err != nil {
			return nil, fmt.Errorf("building rule plan: %w", inConfigKeys(err))
		}
		if spec.Invisible {
			d.Quiet = &rules.Quiet{Name: rc.Name, Bridge: spec.Name, BridgeMAC: mac}
		}
	}
	return d, nil
}

// Preflight says, from f alone, why apply would refuse c: missing NICs,
// NICs in another bridge, NICs carrying addresses, a name taken by a
// non-bridge. Plan and apply refuse before anything is written, so a
// refusal leaves the box as it was.
func Preflight(c *Config, f provision.Facts) error {
	spec, err := c.BridgeSpec()
	if err != nil {
		return err
	}
	err = spec.Preflight(f.Links)
	var pa *bridge.PortAddressesError
	if errors.As(err, &pa) {
		// The operator fixes this in the config, so say it in its keys.
		named := *pa
		named.PortNames = [2]string{"bridge.client_nic", "bridge.server_nic"}
		named.AddressesName = "bridge.addresses"
		return &named
	}
	return err
}

// inConfigKeys restates rules.Config's field errors in the config keys
// they come from, leaving out those of the fields named in skip (reported
// elsewhere); an error with no field errors passes through.
func inConfigKeys(err error, skip ...string) error {
	fields := rules.Fields(err)
	if len(fields) == 0 {
		return err
	}
	var errs []error
	for _, fe := range fields {
		if !slices.Contains(skip, fe.Field) {
			errs = append(errs, fmt.Errorf("%s: %w", ruleKey(fe.Field), fe.Err))
		}
	}
	return errors.Join(errs...)
}

// ruleKey is the config key (or kernel fact) a rules.Config field is made from.
func ruleKey(field string) string {
	switch field {
	case "Bridge":
		return "bridge.name"
	case "ClientPort":
		return "bridge.client_nic"
	case "ServerPort":
		return "bridge.server_nic"
	case "BridgeMAC":
		return "the bridge's MAC (the existing bridge's, else bridge.client_nic's)"
	case "TCPPorts":
		return "intercept.tcp_ports"
	case "ProxyTCPPort":
		return "proxy.tcp_port"
	case "Mark":
		return "routing.mark"
	case "RouteTable":
		return "routing.table"
	case "RulePriority":
		return "routing.priority"
	case "BypassTimeout":
		return "proxy.idle_timeout"
	case "UDPPorts":
		return "intercept.udp_ports"
	case "ProxyUDPPort":
		return "proxy.udp_port"
	case "UDPSessionTimeout":
		return "proxy.udp_idle_timeout"
	case "ClientCIDRs":
		return "intercept.client_cidrs"
	case "ServerCIDRs":
		return "intercept.server_cidrs"
	case "ExcludeClientCIDRs":
		return "intercept.exclude_client_cidrs"
	case "ExcludeServerCIDRs":
		return "intercept.exclude_server_cidrs"
	case "Invisible":
		return "bridge.invisible"
	case "NeighbourTimeout":
		return "bridge.neighbour_timeout"
	}
	return "rules " + field // Name and LingerPorts are ghostwire's own, not configured
}
