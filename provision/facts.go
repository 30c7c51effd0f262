package provision

import (
	"fmt"

	"github.com/ghostwire/ghostwire/bridge"
)

// Facts are what the desired state depends on in the kernel, read once:
// the links ghostwire builds on and the sysctls it sets. Plain data, so
// the desired state is a pure function of config and Facts, and tests give
// Facts as fixtures.
type Facts struct {
	// Links are the bridge and the two NICs, as bridge.ReadLinks reads
	// them: what bridge.Spec.Preflight and bridge.Spec.MAC decide from.
	Links bridge.Links
	// Sysctls are the current values of bridge.Sysctls' keys; a key that
	// is not there does not exist (br_netfilter not loaded, or the bridge
	// not created yet).
	Sysctls map[string]string
}

// Facts reads spec's links (spec.LinkNames) and the sysctls its bridge
// needs. Links and keys that do not exist are left out; other read errors
// are returned.
func (b *Box) Facts(spec bridge.Spec) (Facts, error) {
	links, err := bridge.ReadLinks(b.Netlink, spec.LinkNames()...)
	if err != nil {
		return Facts{}, err
	}
	f := Facts{Links: links, Sysctls: map[string]string{}}
	for _, s := range bridge.Sysctls(spec) {
		v, err := b.Sysctl.Get(s.Key)
		if bridge.IsNotExist(err) {
			continue
		} else if err != nil {
			return Facts{}, fmt.Errorf("reading the sysctls of bridge %s: %w", spec.Name, err)
		}
		f.Sysctls[s.Key] = v
	}
	return f, nil
}
