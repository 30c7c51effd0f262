package provision

import (
	"fmt"
	"strings"

	"github.com/ghostwire/ghostwire/bridge"
	"github.com/ghostwire/ghostwire/rules"
)

// Desired is the whole box as ghostwire wants it: one value that plan
// prints, apply installs, status compares and teardown falls back on, so
// no two commands can disagree about what the box should look like.
type Desired struct {
	Bridge  bridge.Spec
	Sysctls []SysctlChange
	Routing rules.Routing
	Tables  string // name of ghostwire's nftables tables
	// Rules is the diversion (normal variant). It is nil only when the
	// facts give the bridge no MAC (neither it nor the client NIC exists),
	// which Preflight refuses and bridge.Spec.Check reports as drift.
	Rules *rules.Plan
	// Quiet is the table that keeps an invisible bridge silent (apply
	// installs it before the bridge first comes up; it outlives the
	// proxy); nil for a visible bridge, or with no MAC known, like Rules.
	Quiet *rules.Quiet
}

// SysctlChange is a setting with its current value ("" if the key does not
// exist yet, e.g. for the bridge before it is created).
type SysctlChange struct {
	bridge.Sysctl
	Old string
}

// SysctlChanges pairs the sysctls bridge spec needs with their values in
// f.
func SysctlChanges(spec bridge.Spec, f Facts) []SysctlChange {
	var out []SysctlChange
	for _, s := range bridge.Sysctls(spec) {
		out = append(out, SysctlChange{Sysctl: s, Old: f.Sysctls[s.Key]})
	}
	return out
}

// Absent reports a net.bridge.* key that does not exist because
// br_netfilter is not loaded: then bridged frames never reach the IP hooks,
// which is what setting them to 0 is for, so there is nothing to do.
func (s SysctlChange) Absent() bool {
	return s.Old == "" && strings.HasPrefix(s.Key, "net.bridge.")
}

// String is the desired state as `ghostwire plan` prints it (and a golden
// test reads it).
func (d *Desired) String() string {
	var b strings.Builder
	b.WriteString("# links, addresses, routes\n")
	b.WriteString(d.Bridge.String())
	b.WriteString("\n# sysctls (current -> wanted)\n")
	for _, s := range d.Sysctls {
		b.WriteString(s.String())
	}
	b.WriteString("\n# policy routing\n")
	b.WriteString(d.Routing.String())
	b.WriteString("\n# nftables\n")
	if d.Quiet != nil {
		b.WriteString(d.Quiet.String())
	}
	if d.Rules != nil {
		b.WriteString(d.Rules.String())
	}
	return b.String()
}

// String is one line of the plan's sysctl section.
func (s SysctlChange) String() string {
	if s.Absent() {
		return s.Key + ": absent (br_netfilter not loaded: bridged frames skip the IP hooks anyway)\n"
	}
	old := s.Old
	if old == "" {
		old = "(absent)"
	}
	mark := ""
	if old == s.Value {
		mark = " (unchanged)"
	}
	return fmt.Sprintf("%s: %s -> %s%s\n", s.Key, old, s.Value, mark)
}
