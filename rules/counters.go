package rules

import (
	"errors"
	"fmt"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	"github.com/google/nftables/userdata"
	"golang.org/x/sys/unix"
)

// RuleCounter is the counter of one counted rule of ghostwire's tables, as
// the kernel holds it: the packets (and their bytes) the rule acted on.
type RuleCounter struct {
	// Table is the table's family ("bridge", "inet", "netdev"), or "quiet"
	// for the quiet table's (Quiet.Counters).
	Table   string
	Rule    string // the rule's name, its comment
	Packets uint64
	Bytes   uint64
}

// Counters reads the counters of the counted rules (those with a counter
// and a comment, see counted) of ghostwire's tables named name, bridge
// table first, then inet, then netdev (an invisible plan's), each in chain
// and rule order. It only reads: c may be any connection, also while
// another socket owns the tables. Missing tables and chains give no
// counters, not an error.
func Counters(c *nftables.Conn, name string) ([]RuleCounter, error) {
	existing, err := listOwn(c, name)
	if err != nil {
		return nil, err
	}
	return countersOf(c, name, existing, familyName)
}

// countersOf reads the counters of the existing tables called name, each
// labelled by label(its family).
func countersOf(c *nftables.Conn, name string, existing map[nftables.TableFamily]*nftables.Table,
	label func(nftables.TableFamily) string) ([]RuleCounter, error) {
	var out []RuleCounter
	for _, fam := range families {
		t := existing[fam]
		if t == nil {
			continue
		}
		chains, err := c.ListChainsOfTableFamily(fam)
		if err != nil {
			return nil, fmt.Errorf("listing chains of table %s %s: %w", familyName(fam), name, err)
		}
		for _, ch := range chains {
			if ch.Table.Name != name {
				continue
			}
			rules, err := c.GetRules(t, ch)
			if errors.Is(err, unix.ENOENT) {
				continue // gone since the listing
			}
			if err != nil {
				return nil, fmt.Errorf("reading rules of chain %s %s %s: %w", familyName(fam), name, ch.Name, err)
			}
			for _, r := range rules {
				if rc, ok := ruleCounter(r); ok {
					rc.Table = label(fam)
					out = append(out, rc)
				}
			}
		}
	}
	return out, nil
}

// ruleCounter is r's counter and name, if it has both.
func ruleCounter(r *nftables.Rule) (RuleCounter, bool) {
	name, ok := userdata.GetString(r.UserData, userdata.TypeComment)
	if !ok || name == "" {
		return RuleCounter{}, false
	}
	for _, e := range r.Exprs {
		if ctr, ok := e.(*expr.Counter); ok {
			return RuleCounter{Rule: name, Packets: ctr.Packets, Bytes: ctr.Bytes}, true
		}
	}
	return RuleCounter{}, false
}
