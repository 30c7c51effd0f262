package appliance

import (
	"errors"
	"fmt"
	"maps"
	"os"
	"slices"
	"strings"

	"github.com/google/nftables"
	"github.com/vishvananda/netlink"

	"github.com/ghostwire/ghostwire/bridge"
	"github.com/ghostwire/ghostwire/rules"
)

// Box is the kernel ghostwire provisions: the handles are opened by the
// caller in the network namespace it means, so tests can point a Box at a
// throwaway namespace.
type Box struct {
	Netlink *netlink.Handle
	NFT     *nftables.Conn
	Sysctl  bridge.SysctlFS
}

// OpenBox opens handles in the calling thread's network namespace.
func OpenBox() (*Box, error) {
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

func (b *Box) Close() {
	b.Netlink.Close()
	b.NFT.CloseLasting()
}

// Plan is everything apply would do, computed from config and the kernel's
// current state without changing anything.
type Plan struct {
	Bridge  bridge.Spec
	Sysctls []SysctlChange
	Rules   *rules.Plan
}

// Absent reports a net.bridge.* key that does not exist because
// br_netfilter is not loaded: then bridged frames never reach the IP hooks,
// which is what setting them to 0 is for, so there is nothing to do.
func (s SysctlChange) Absent() bool {
	return s.Old == "" && strings.HasPrefix(s.Key, "net.bridge.")
}

// SysctlChange is a setting with its current value ("" if the key does not
// exist yet, e.g. for the bridge before it is created).
type SysctlChange struct {
	bridge.Sysctl
	Old string
}

// Plan validates c against the kernel (missing NICs, NICs in another bridge,
// NICs carrying addresses, a name taken by a non-bridge) and returns what
// apply would do. Apply plans before it writes the state file or touches
// the kernel, so a refusal here leaves the box as it was.
func (b *Box) Plan(c *Config) (*Plan, error) {
	spec, err := c.BridgeSpec()
	if err != nil {
		return nil, err
	}
	if err := spec.Preflight(b.Netlink); err != nil {
		var pa *bridge.PortAddressesError
		if errors.As(err, &pa) {
			// The operator fixes this in the config, so say it in its keys.
			named := *pa
			named.PortNames = [2]string{"bridge.client_nic", "bridge.server_nic"}
			named.AddressesName = "bridge.addresses"
			return nil, &named
		}
		return nil, err
	}
	mac, err := spec.MAC(b.Netlink)
	if err != nil {
		return nil, err
	}
	rp, err := rules.NewPlan(c.RulesConfig(mac))
	if err != nil {
		return nil, fmt.Errorf("building rule plan: %w", err)
	}
	p := &Plan{Bridge: spec, Rules: rp}
	for _, s := range bridge.Sysctls(spec.Name) {
		old, err := b.Sysctl.Get(s.Key)
		if err != nil && !bridge.IsNotExist(err) {
			return nil, err
		}
		p.Sysctls = append(p.Sysctls, SysctlChange{Sysctl: s, Old: old})
	}
	return p, nil
}

// String is the plan as a person (and a golden test) reads it.
func (p *Plan) String() string {
	var b strings.Builder
	b.WriteString("# links, addresses, routes\n")
	b.WriteString(p.Bridge.String())
	b.WriteString("\n# sysctls (current -> wanted)\n")
	for _, s := range p.Sysctls {
		old := s.Old
		if s.Absent() {
			fmt.Fprintf(&b, "%s: absent (br_netfilter not loaded: bridged frames skip the IP hooks anyway)\n", s.Key)
			continue
		}
		if old == "" {
			old = "(absent)"
		}
		mark := ""
		if old == s.Value {
			mark = " (unchanged)"
		}
		fmt.Fprintf(&b, "%s: %s -> %s%s\n", s.Key, old, s.Value, mark)
	}
	b.WriteString("\n# policy routing\n")
	b.WriteString(p.Rules.Routing().String())
	b.WriteString("\n# nftables\n")
	b.WriteString(p.Rules.String())
	return b.String()
}

// ApplyOptions choose what apply installs.
type ApplyOptions struct {
	// NoDiversion leaves the nftables diversion to `ghostwire run`, so the
	// diversion exists only while a live proxy owns it.
	NoDiversion bool
}

// Apply provisions the box. Safe to repeat. If it fails on a box that was
// not provisioned before, everything it did is undone and the error names
// the step; on an already provisioned box a failed re-apply leaves the
// earlier provisioning in place.
func (b *Box) Apply(c *Config, opts ApplyOptions) (err error) {
	plan, err := b.Plan(c)
	if err != nil {
		return err
	}
	st, err := loadState(c.StateFile)
	if err != nil {
		return err
	}
	fresh := st == nil
	if fresh {
		ports, err := bridge.Observe(b.Netlink, plan.Bridge.Ports)
		if err != nil {
			return err
		}
		st = &State{
			Version: stateVersion, Bridge: plan.Bridge.Name, Ports: ports,
			Sysctls: map[string]string{}, Routing: plan.Rules.Routing(), Tables: plan.Rules.Config().Name,
		}
	} else if err := st.compatible(plan); err != nil {
		return err
	}
	st.BridgeSpec = bridgeSpecJSON{Ports: plan.Bridge.Ports, Addresses: c.Bridge.Addresses, Routes: c.Bridge.Routes}
	// The state is on disk before the first change, so a crash at any
	// point leaves enough behind for teardown.
	if err := st.save(c.StateFile); err != nil {
		return err
	}
	defer func() {
		if err == nil || !fresh {
			return
		}
		if rerr := b.teardown(st); rerr != nil {
			err = fmt.Errorf("%w; rolling back also failed: %v", err, rerr)
		} else {
			err = fmt.Errorf("%w (rolled back: nothing was left changed)", err)
			os.Remove(c.StateFile)
		}
	}()

	created, err := plan.Bridge.Apply(b.Netlink)
	if created {
		st.CreatedBridge = true
		if serr := st.save(c.StateFile); serr != nil && err == nil {
			err = serr
		}
	}
	if err != nil {
		return fmt.Errorf("building bridge %s: %w", plan.Bridge.Name, err)
	}
	for _, s := range plan.Sysctls {
		if s.Absent() {
			continue
		}
		if _, ok := st.Sysctls[s.Key]; !ok {
			old, err := b.Sysctl.Get(s.Key)
			if err != nil {
				return fmt.Errorf("setting sysctls: %w", err)
			}
			st.Sysctls[s.Key] = old
			if err := st.save(c.StateFile); err != nil {
				return err
			}
		}
		if err := b.Sysctl.Set(s.Key, s.Value); err != nil {
			return fmt.Errorf("setting sysctls: %w", err)
		}
	}
	if err := plan.Rules.Routing().Apply(b.Netlink); err != nil {
		return fmt.Errorf("adding policy routing: %w", err)
	}
	if opts.NoDiversion {
		return nil
	}
	ts, err := rules.Tables(b.NFT, plan.Rules.Config().Name)
	if err != nil {
		return fmt.Errorf("reading nftables state: %w", err)
	}
	if ts.Owned {
		return nil // a running proxy owns the diversion; it is already in place
	}
	if err := plan.Rules.Apply(b.NFT); err != nil {
		return fmt.Errorf("installing nftables diversion: %w", err)
	}
	return nil
}

// compatible refuses a re-apply that would orphan what the first apply
// built: teardown only knows the state file.
func (st *State) compatible(p *Plan) error {
	if st.Bridge != p.Bridge.Name || strings.Join(st.BridgeSpec.Ports, ",") != strings.Join(p.Bridge.Ports, ",") {
		return fmt.Errorf("box is provisioned as %s over %s; config now says %s over %s: run teardown first",
			st.Bridge, strings.Join(st.BridgeSpec.Ports, "+"), p.Bridge.Name, strings.Join(p.Bridge.Ports, "+"))
	}
	if st.Routing != p.Rules.Routing() {
		return fmt.Errorf("box is provisioned with routing mark %#x table %d priority %d; config changed it: run teardown first",
			st.Routing.Mark, st.Routing.Table, st.Routing.Priority)
	}
	return nil
}

// Teardown removes what apply created and restores what it changed, as the
// state file records. With no state file it still removes ghostwire's own
// nftables tables and policy rules (they are ghostwire's by name) and says
// nothing else was provisioned. Safe to repeat.
func (b *Box) Teardown(c *Config) error {
	st, err := loadState(c.StateFile)
	if err != nil {
		return err
	}
	if st == nil {
		rc := c.RulesConfig(nil)
		r := rules.Routing{Mark: rc.Mark, Table: rc.RouteTable, Priority: rc.RulePriority}
		return errors.Join(b.removeTables(rc.Name), r.Remove(b.Netlink))
	}
	if err := b.teardown(st); err != nil {
		return err
	}
	if err := os.Remove(c.StateFile); err != nil && !os.IsNotExist(err) {
		return fmt.Errorf("removing state file: %w", err)
	}
	return nil
}

// teardown undoes in reverse order of apply and carries on past errors, so
// one stuck object does not keep the others in place.
func (b *Box) teardown(st *State) error {
	// A live proxy's owned tables cannot be deleted (and cutting the bridge
	// under it is not what anyone means): refuse before touching anything.
	if err := b.removeTables(st.Tables); err != nil {
		return err
	}
	var errs []error
	if err := st.Routing.Remove(b.Netlink); err != nil {
		errs = append(errs, fmt.Errorf("removing policy routing: %w", err))
	}
	for _, key := range slices.Sorted(maps.Keys(st.Sysctls)) {
		if err := b.Sysctl.Set(key, st.Sysctls[key]); err != nil && !bridge.IsNotExist(err) {
			errs = append(errs, fmt.Errorf("restoring sysctl: %w", err))
		}
	}
	spec, err := st.spec()
	if err != nil {
		errs = append(errs, fmt.Errorf("state file bridge: %w", err))
	} else if err := spec.Remove(b.Netlink, st.Ports, st.CreatedBridge); err != nil {
		errs = append(errs, fmt.Errorf("removing bridge: %w", err))
	}
	return errors.Join(errs...)
}

func (b *Box) removeTables(name string) error {
	ts, err := rules.Tables(b.NFT, name)
	if err != nil {
		return fmt.Errorf("reading nftables state: %w", err)
	}
	if ts.Owned {
		return fmt.Errorf("the nftables diversion is owned by a running ghostwire proxy: stop it first (systemctl stop ghostwire)")
	}
	if err := rules.RemoveTables(b.NFT, name); err != nil {
		return fmt.Errorf("removing nftables tables: %w", err)
	}
	return nil
}
