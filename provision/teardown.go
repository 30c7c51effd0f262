package provision

import (
	"errors"
	"fmt"
	"maps"
	"os"
	"slices"

	"github.com/ghostwire/ghostwire/bridge"
	"github.com/ghostwire/ghostwire/rules"
)

// Teardown removes what apply created and restores what it changed, as
// stateFile records. With no state file it still removes d's nftables
// tables and policy rules (they are ghostwire's by name) and says nothing
// else was provisioned. Safe to repeat.
func (b *Box) Teardown(d *Desired, stateFile string) error {
	st, err := loadState(stateFile)
	if err != nil {
		return err
	}
	if st == nil {
		return errors.Join(b.removeTables(d.Tables), d.Routing.Remove(b.Netlink), b.removeQuiet(d.Tables))
	}
	if err := b.teardown(st); err != nil {
		return err
	}
	if err := os.Remove(stateFile); err != nil && !os.IsNotExist(err) {
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
	// Last: until the bridge is gone, it would speak without it.
	if err := b.removeQuiet(st.Tables); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// removeQuiet removes the quiet table of an invisible bridge; there is
// none on a visible one, which is fine.
func (b *Box) removeQuiet(tables string) error {
	if err := (rules.Quiet{Name: tables}).Remove(b.NFT); err != nil {
		return fmt.Errorf("removing the quiet table: %w", err)
	}
	return nil
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
