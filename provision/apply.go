package provision

import (
	"fmt"
	"os"
	"strings"

	"github.com/ghostwire/ghostwire/bridge"
	"github.com/ghostwire/ghostwire/rules"
)

// ApplyOptions choose what apply installs.
type ApplyOptions struct {
	// NoDiversion leaves the nftables diversion to `ghostwire run`, so the
	// diversion exists only while a live proxy owns it.
	NoDiversion bool
}

// Apply makes the box match d, recording in stateFile what it creates and
// changes before it does so. d must have passed Preflight. Safe to repeat.
// If it fails on a box that was not provisioned before, everything it did
// is undone and the error names the step; on an already provisioned box a
// failed re-apply leaves the earlier provisioning in place.
func (b *Box) Apply(d *Desired, stateFile string, opts ApplyOptions) (err error) {
	st, fresh, err := b.startState(d, stateFile)
	if err != nil {
		return err
	}
	// The state is on disk before the first change, so a crash at any
	// point leaves enough behind for teardown.
	if err := st.save(stateFile); err != nil {
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
			os.Remove(stateFile)
		}
	}()
	// In this order: an invisible bridge's silence (its flags, the quiet
	// table, IPv6 off on its ports) must be in place before it or its
	// ports first come up, or they announce themselves (MLD, DAD).
	if err := b.buildBridge(d, st, stateFile); err != nil {
		return err
	}
	if d.Quiet != nil {
		if err := d.Quiet.Apply(b.NFT); err != nil {
			return fmt.Errorf("installing the quiet table: %w", err)
		}
	}
	if err := b.applySysctls(d, st, stateFile); err != nil {
		return err
	}
	if err := d.Bridge.Up(b.Netlink); err != nil {
		return fmt.Errorf("bringing up bridge %s: %w", d.Bridge.Name, err)
	}
	if err := d.Routing.Apply(b.Netlink); err != nil {
		return fmt.Errorf("adding policy routing: %w", err)
	}
	if opts.NoDiversion {
		return nil
	}
	return b.applyDiversion(d)
}

// startState is the state file's record for applying d: the one on disk,
// or (fresh) a new one holding the NICs as they are now.
func (b *Box) startState(d *Desired, stateFile string) (_ *State, fresh bool, _ error) {
	st, err := loadState(stateFile)
	if err != nil {
		return nil, false, err
	}
	if st == nil {
		if d.Bridge.Invisible {
			if _, err := b.Netlink.LinkByName(d.Bridge.Name); err == nil {
				return nil, false, fmt.Errorf("bridge.invisible: bridge %s already exists and was not made by ghostwire: "+
					"an invisible bridge changes settings (arp off, no link-local address) that teardown could not give back; "+
					"delete it or choose another bridge.name", d.Bridge.Name)
			}
		}
		ports, err := bridge.Observe(b.Netlink, d.Bridge.Ports)
		if err != nil {
			return nil, false, err
		}
		st = &State{
			Version: stateVersion, Bridge: d.Bridge.Name, Ports: ports,
			Sysctls: map[string]string{}, Routing: d.Routing, Tables: d.Tables,
		}
		fresh = true
	} else if err := st.compatible(d); err != nil {
		return nil, false, err
	}
	st.BridgeSpec = newBridgeSpecJSON(d.Bridge)
	return st, fresh, nil
}

func (b *Box) buildBridge(d *Desired, st *State, stateFile string) error {
	created, err := d.Bridge.Build(b.Netlink)
	if created {
		st.CreatedBridge = true
		if serr := st.save(stateFile); serr != nil && err == nil {
			err = serr
		}
	}
	if err != nil {
		return fmt.Errorf("building bridge %s: %w", d.Bridge.Name, err)
	}
	return nil
}

// applySysctls records each key's value before its first change; it reads
// it again rather than trusting the facts because the bridge's own keys
// only exist once the bridge does.
func (b *Box) applySysctls(d *Desired, st *State, stateFile string) error {
	for _, s := range d.Sysctls {
		if s.Absent() {
			continue
		}
		if _, ok := st.Sysctls[s.Key]; !ok {
			old, err := b.Sysctl.Get(s.Key)
			if err != nil {
				return fmt.Errorf("setting sysctls: %w", err)
			}
			st.Sysctls[s.Key] = old
			if err := st.save(stateFile); err != nil {
				return err
			}
		}
		if err := b.Sysctl.Set(s.Key, s.Value); err != nil {
			return fmt.Errorf("setting sysctls: %w", err)
		}
	}
	return nil
}

// applyDiversion installs the static tables unless a running proxy owns
// them: then the diversion is already in place.
func (b *Box) applyDiversion(d *Desired) error {
	ts, err := rules.Tables(b.NFT, d.Tables)
	if err != nil {
		return fmt.Errorf("reading nftables state: %w", err)
	}
	if ts.Owned {
		return nil
	}
	if err := d.Rules.Apply(b.NFT); err != nil {
		return fmt.Errorf("installing nftables diversion: %w", err)
	}
	return nil
}

// compatible refuses a re-apply that would orphan what the first apply
// built: teardown only knows the state file.
func (st *State) compatible(d *Desired) error {
	if st.Bridge != d.Bridge.Name || strings.Join(st.BridgeSpec.Ports, ",") != strings.Join(d.Bridge.Ports, ",") {
		return fmt.Errorf("box is provisioned as %s over %s; config now says %s over %s: run teardown first",
			st.Bridge, strings.Join(st.BridgeSpec.Ports, "+"), d.Bridge.Name, strings.Join(d.Bridge.Ports, "+"))
	}
	if st.BridgeSpec.Invisible != d.Bridge.Invisible {
		return fmt.Errorf("box is provisioned with bridge.invisible %v; config now says %v: run teardown first",
			st.BridgeSpec.Invisible, d.Bridge.Invisible)
	}
	if st.Routing != d.Routing {
		return fmt.Errorf("box is provisioned with routing mark %#x table %d priority %d; config changed it: run teardown first",
			st.Routing.Mark, st.Routing.Table, st.Routing.Priority)
	}
	return nil
}
