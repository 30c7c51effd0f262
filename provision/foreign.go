package provision

import (
	"fmt"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
)

// ForeignChain is another table's base chain that sees diverted packets
// before ghostwire's own hook does and can drop them.
type ForeignChain struct {
	Family, Table, Chain, Hook string
	Priority                   int32
	PolicyDrop                 bool
	DropRules                  int // rules ending in drop (or reject)
}

func (f ForeignChain) String() string {
	what := fmt.Sprintf("%d rule(s) that drop or reject", f.DropRules)
	if f.PolicyDrop {
		what = "policy drop"
		if f.DropRules > 0 {
			what += fmt.Sprintf(" and %d rule(s) that drop or reject", f.DropRules)
		}
	}
	return fmt.Sprintf("%s %s chain %s (hook %s, priority %d): %s", f.Family, f.Table, f.Chain, f.Hook, f.Priority, what)
}

// ourHooks are where ghostwire's tables see a diverted packet, by family:
// the bridge table at prerouting dstnat (-300), the inet table at
// prerouting mangle (-150) and input filter (0). A chain of another
// table on the same path with a lower priority number runs first; a drop
// there means the packet never reaches the diversion (an accept does not
// end the other base chains: nftables evaluates each).
var ourHooks = []struct {
	fams     []nftables.TableFamily
	hook     *nftables.ChainHook
	hookName string
	prio     int32
}{
	{[]nftables.TableFamily{nftables.TableFamilyBridge}, nftables.ChainHookPrerouting, "prerouting", -300},
	{[]nftables.TableFamily{nftables.TableFamilyINet, nftables.TableFamilyIPv4, nftables.TableFamilyIPv6}, nftables.ChainHookPrerouting, "prerouting", -150},
	{[]nftables.TableFamily{nftables.TableFamilyINet, nftables.TableFamilyIPv4, nftables.TableFamilyIPv6}, nftables.ChainHookInput, "input", 0},
}

var familyNames = map[nftables.TableFamily]string{
	nftables.TableFamilyBridge: "bridge", nftables.TableFamilyINet: "inet",
	nftables.TableFamilyIPv4: "ip", nftables.TableFamilyIPv6: "ip6",
}

// foreignChains walks every base chain of the other tables on the
// diverted packets' path, in priority order per hook, and returns those
// that run before ghostwire's and can drop (iptables-nft's chains
// included: they are nftables chains too).
func foreignChains(c *nftables.Conn, ours string) ([]ForeignChain, error) {
	chains, err := c.ListChains()
	if err != nil {
		return nil, fmt.Errorf("listing nftables chains: %w", err)
	}
	var out []ForeignChain
	for _, ch := range chains {
		if ch.Table == nil || ch.Table.Name == ours || ch.Hooknum == nil || ch.Priority == nil {
			continue
		}
		for _, h := range ourHooks {
			if *ch.Hooknum != *h.hook || int32(*ch.Priority) >= h.prio || !hasFamily(h.fams, ch.Table.Family) {
				continue
			}
			fc := ForeignChain{Family: familyNames[ch.Table.Family], Table: ch.Table.Name, Chain: ch.Name, Hook: h.hookName,
				Priority: int32(*ch.Priority), PolicyDrop: ch.Policy != nil && *ch.Policy == nftables.ChainPolicyDrop}
			rs, err := c.GetRules(ch.Table, ch)
			if err != nil {
				return nil, fmt.Errorf("listing rules of %s %s %s: %w", fc.Family, fc.Table, fc.Chain, err)
			}
			for _, r := range rs {
				if dropsOrRejects(r) {
					fc.DropRules++
				}
			}
			if fc.PolicyDrop || fc.DropRules > 0 {
				out = append(out, fc)
			}
		}
	}
	return out, nil
}

func hasFamily(fams []nftables.TableFamily, f nftables.TableFamily) bool {
	for _, x := range fams {
		if x == f {
			return true
		}
	}
	return false
}

// dropsOrRejects reports whether r ends in a drop verdict or a reject
// (nft's reject, or iptables-nft's REJECT/DROP targets through xt).
func dropsOrRejects(r *nftables.Rule) bool {
	for _, e := range r.Exprs {
		switch x := e.(type) {
		case *expr.Verdict:
			if x.Kind == expr.VerdictDrop {
				return true
			}
		case *expr.Reject:
			return true
		case *expr.Target:
			if x.Name == "REJECT" || x.Name == "DROP" {
				return true
			}
		}
	}
	return false
}

// checkForeignTables: another firewall that drops diverted packets before
// ghostwire's hooks makes interception fail silently.
func checkForeignTables(f CheckFacts) []Result {
	if len(f.Foreign) == 0 {
		return []Result{{Found: "no other table drops diverted packets before ghostwire's hooks"}}
	}
	var out []Result
	for _, fc := range f.Foreign {
		out = append(out, Result{Level: Warn,
			Found: fmt.Sprintf("%s runs before ghostwire's %s hook and may drop intercepted traffic", fc, fc.Hook),
			Fix:   fmt.Sprintf("nft list chain %s %s %s; let intercepted ports through there", fc.Family, fc.Table, fc.Chain)})
	}
	return out
}
