package rules

import (
	"bytes"
	"errors"
	"fmt"
	"maps"
	"reflect"
	"slices"
	"strings"

	"github.com/google/nftables"
	"github.com/google/nftables/binaryutil"
	"github.com/google/nftables/expr"
	"golang.org/x/sys/unix"
)

// TablesState is what exists of ghostwire's tables in the kernel.
type TablesState struct {
	Bridge bool // table bridge NAME exists
	Inet   bool // table inet NAME exists
	Netdev bool // table netdev NAME exists: the tables are an invisible plan's
	// Owned is true if any of the tables is owned by a netlink socket (a running
	// proxy's, see ApplyOwned); OwnerPortID is that socket's port ID.
	Owned       bool
	OwnerPortID uint32
	// Overload is the overload mode of the rules in the tables (see
	// Plan.Overloaded), read from the rules themselves: OverloadBypass if
	// the bridge prerouting chain adds SYNs to a bypass set,
	// OverloadRefuse if the inet prerouting chain rejects (SYNs).
	Overload Overload
	// UDPBypass is true if the rules are a UDPBypass(true) plan's: the
	// bridge prerouting chain looks flows up in a udpflows set.
	UDPBypass bool
}

// Tables reports which of ghostwire's tables named name exist, whether a
// netlink socket owns them, and which overload mode and UDP bypass switch
// their rules are in.
func Tables(c *nftables.Conn, name string) (TablesState, error) {
	existing, err := listOwn(c, name)
	if err != nil {
		return TablesState{}, err
	}
	var st TablesState
	for fam, t := range existing {
		switch fam {
		case nftables.TableFamilyBridge:
			st.Bridge = true
		case nftables.TableFamilyINet:
			st.Inet = true
		case nftables.TableFamilyNetdev:
			st.Netdev = true
		}
		if t.Flags&nftables.TableFlagOwner != 0 {
			st.Owned, st.OwnerPortID = true, t.Owner
		}
	}
	if err := variantOf(c, existing, &st); err != nil {
		return TablesState{}, fmt.Errorf("reading overload mode of nftables tables %s: %w", name, err)
	}
	return st, nil
}

// variantOf sets st's Overload and UDPBypass from the rules only those
// variants have (see bridgeRules, bridgeUDPRules and inetPrerouting).
func variantOf(c *nftables.Conn, existing map[nftables.TableFamily]*nftables.Table, st *TablesState) error {
	type look struct {
		is  func(*nftables.Rule) bool
		set func()
	}
	looks := map[nftables.TableFamily][]look{
		nftables.TableFamilyBridge: {
			// A selection rule adds SYNs to a bypass set too, after a
			// lookup in a selection set, and so does a live bypass
			// rule, after one in a live bypass set: that is no overload.
			{func(r *nftables.Rule) bool {
				return slices.ContainsFunc(r.Exprs, func(e expr.Any) bool {
					d, ok := e.(*expr.Dynset)
					return ok && d.Operation == unix.NFT_DYNSET_OP_ADD
				}) && !slices.ContainsFunc(r.Exprs, func(e expr.Any) bool {
					l, ok := e.(*expr.Lookup)
					return ok && (isSelectionSet(l.SetName) || isHostSet(l.SetName))
				})
			}, func() { st.Overload = OverloadBypass }},
			// A selection rule looks flows up in udpflows too, inverted.
			{anyExpr(func(e expr.Any) bool {
				l, ok := e.(*expr.Lookup)
				return ok && !l.Invert && slices.ContainsFunc(ipFamilies[:], func(f ipFamily) bool { return l.SetName == udpFlowSets.name(f) })
			}), func() { st.UDPBypass = true }},
		},
		nftables.TableFamilyINet: {
			{anyExpr(func(e expr.Any) bool {
				r, ok := e.(*expr.Reject)
				return ok && r.Type == unix.NFT_REJECT_TCP_RST
			}), func() { st.Overload = OverloadRefuse }},
		},
	}
	for _, fam := range families {
		t := existing[fam]
		if t == nil || len(looks[fam]) == 0 {
			continue
		}
		rules, err := c.GetRules(t, &nftables.Chain{Name: chainPrerouting, Table: t})
		if errors.Is(err, unix.ENOENT) {
			continue
		}
		if err != nil {
			return fmt.Errorf("reading rules of chain %s %s %s: %w", familyName(t.Family), t.Name, chainPrerouting, err)
		}
		for _, l := range looks[fam] {
			if slices.ContainsFunc(rules, l.is) {
				l.set()
			}
		}
	}
	return nil
}

// anyExpr is a rule test: one of the rule's expressions is.
func anyExpr(is func(expr.Any) bool) func(*nftables.Rule) bool {
	return func(r *nftables.Rule) bool { return slices.ContainsFunc(r.Exprs, is) }
}

// Check compares the kernel's ghostwire tables with the plan and describes
// every difference, one per string: missing (or, the netdev one of a plan
// that is not invisible, unexpected) tables, chains, hooks, set elements,
// rule counts and rules that differ. Empty means the plan is in place
// (owned or not). A netdev chain's device is not compared:
// github.com/google/nftables does not read it back.
func (p *Plan) Check(c *nftables.Conn) ([]string, error) {
	existing, err := listOwn(c, p.cfg.Name)
	if err != nil {
		return nil, fmt.Errorf("checking nftables tables %s: %w", p.cfg.Name, err)
	}
	drift, err := checkTables(c, p.cfg.Name, p.tables, existing)
	if err != nil {
		return nil, err
	}
	for _, fam := range families {
		if existing[fam] != nil && !slices.ContainsFunc(p.tables, func(tb table) bool { return tb.family == fam }) {
			drift = append(drift, fmt.Sprintf("table %s %s is not in the plan", familyName(fam), p.cfg.Name))
		}
	}
	return drift, nil
}

// checkTables compares the existing tables called name with tables.
func checkTables(c *nftables.Conn, name string, tables []table, existing map[nftables.TableFamily]*nftables.Table) ([]string, error) {
	var drift []string
	for _, tb := range tables {
		t := existing[tb.family]
		where := fmt.Sprintf("table %s %s", familyName(tb.family), name)
		if t == nil {
			drift = append(drift, where+" is missing")
			continue
		}
		d, err := checkTable(c, t, tb, where)
		if err != nil {
			return nil, fmt.Errorf("checking %s: %w", where, err)
		}
		drift = append(drift, d...)
	}
	return drift, nil
}

// checkTable compares table t, read from the kernel, with the plan's tb.
func checkTable(c *nftables.Conn, t *nftables.Table, tb table, where string) ([]string, error) {
	var drift []string
	for _, spec := range tb.sets {
		d, err := checkSet(c, t, spec, where)
		if err != nil {
			return nil, err
		}
		drift = append(drift, d...)
	}

	chains, err := c.ListChainsOfTableFamily(t.Family)
	if err != nil {
		return nil, fmt.Errorf("listing chains: %w", err)
	}
	got := map[string]*nftables.Chain{}
	for _, ch := range chains {
		if ch.Table.Name == t.Name {
			got[ch.Name] = ch
		}
	}
	for _, ch := range tb.chains {
		d, err := checkChain(c, t, ch, got[ch.name])
		if err != nil {
			return nil, err
		}
		drift = append(drift, d...)
		delete(got, ch.name)
	}
	for _, name := range slices.Sorted(maps.Keys(got)) {
		drift = append(drift, fmt.Sprintf("%s: unexpected chain %s", where, name))
	}
	return drift, nil
}

// checkChain compares chain have of table t, read from the kernel (nil if
// missing), with the plan's ch: hook, type, priority, policy and rules.
func checkChain(c *nftables.Conn, t *nftables.Table, ch chain, have *nftables.Chain) ([]string, error) {
	where := fmt.Sprintf("chain %s %s %s", familyName(t.Family), t.Name, ch.name)
	if have == nil {
		return []string{where + " is missing"}, nil
	}
	var drift []string
	// The device of a netdev chain cannot be compared: the library does
	// not decode NFTA_HOOK_DEV (Apply always makes chains anew).
	if have.Hooknum == nil || *have.Hooknum != *ch.hook.num || have.Priority == nil || *have.Priority != *ch.prio.num ||
		have.Type != nftables.ChainTypeFilter || have.Policy == nil || *have.Policy != nftables.ChainPolicyAccept {
		drift = append(drift, fmt.Sprintf("%s: hook, type, priority or policy differ from plan (filter hook %d priority %d policy accept)",
			where, *ch.hook.num, *ch.prio.num))
	}
	rules, err := c.GetRules(t, have)
	if err != nil {
		return nil, fmt.Errorf("reading rules of chain %s: %w", ch.name, err)
	}
	if len(rules) != len(ch.rules) {
		return append(drift, fmt.Sprintf("%s has %d rules, plan has %d", where, len(rules), len(ch.rules))), nil
	}
	// Compare against rules built with unnumbered sets: the kernel reports
	// lookups and dynsets by set name only, and names anonymous sets itself
	// (their elements are compared apart).
	unnumbered := func(name string) *nftables.Set { return &nftables.Set{Name: name} }
	for i, r := range rules {
		var anons []anonSet
		anon := func(kt nftables.SetDatatype, els []nftables.SetElement) *nftables.Set {
			anons = append(anons, anonSet{kt, els})
			return &nftables.Set{Name: anonSetName, Anonymous: true}
		}
		same := sameExprs(r.Exprs, ch.rules[i].exprs(t.Family, unnumbered, anon)) && bytes.Equal(r.UserData, ch.rules[i].userData())
		if same {
			if same, err = sameAnonSets(c, t, r.Exprs, anons); err != nil {
				return nil, fmt.Errorf("reading rule %d of chain %s: %w", i+1, ch.name, err)
			}
		}
		if !same {
			drift = append(drift, fmt.Sprintf("%s: rule %d differs from plan", where, i+1))
		}
	}
	return drift, nil
}

// anonSetName is the name github.com/google/nftables gives an anonymous
// set; the kernel numbers it ("__set0").
const anonSetName = "__set%d"

// isAnonSet reports whether name is an anonymous set's, planned or as the
// kernel names it.
func isAnonSet(name string) bool { return strings.HasPrefix(name, "__set") }

// anonSet is a planned anonymous set: its key type and elements.
type anonSet struct {
	keyType  nftables.SetDatatype
	elements []nftables.SetElement
}

// sameAnonSets compares the anonymous sets the lookups of a rule read
// back from table t use, in order, with the planned ones.
func sameAnonSets(c *nftables.Conn, t *nftables.Table, got []expr.Any, want []anonSet) (bool, error) {
	var names []string
	for _, e := range got {
		if l, ok := e.(*expr.Lookup); ok && isAnonSet(l.SetName) {
			names = append(names, l.SetName)
		}
	}
	if len(names) != len(want) {
		return false, nil
	}
	for i, name := range names {
		els, err := c.GetSetElements(&nftables.Set{Table: t, Name: name, KeyType: want[i].keyType, Anonymous: true, Constant: true})
		if err != nil {
			return false, fmt.Errorf("reading set %s: %w", name, err)
		}
		if !slices.Equal(elementKeys(els), elementKeys(want[i].elements)) {
			return false, nil
		}
	}
	return true, nil
}

// elementKeys are the keys of els, sorted, as strings.
func elementKeys(els []nftables.SetElement) []string {
	keys := make([]string, len(els))
	for i, e := range els {
		keys[i] = string(e.Key)
	}
	slices.Sort(keys)
	return keys
}

// checkSet compares one set with the plan: a ports set's elements, a flow
// set's type, flags, size and timeout (its elements are traffic, not plan),
// a live bypass set's type and flags (its elements are not plan either).
func checkSet(c *nftables.Conn, t *nftables.Table, spec setSpec, where string) ([]string, error) {
	set, err := c.GetSetByName(t, spec.name)
	switch {
	case errors.Is(err, unix.ENOENT):
		return []string{fmt.Sprintf("%s: %s %s is missing", where, spec.kind(), spec.name)}, nil
	case err != nil:
		return nil, fmt.Errorf("reading set %s: %w", spec.name, err)
	}
	if spec.dynamic {
		if !spec.fits(set) || set.Size != spec.size() || set.Timeout != spec.timeout {
			return []string{fmt.Sprintf("%s: %s %s differs from plan (type %s; size %d; flags dynamic,timeout; timeout %s)",
				where, spec.kind(), spec.name, spec.typeName(), spec.size(), nftDuration(spec.timeout))}, nil
		}
		return nil, nil
	}
	if spec.live {
		// Its elements are the live bypass list, not plan.
		if !spec.fits(set) {
			return []string{fmt.Sprintf("%s: set %s differs from plan (type %s; flags interval,timeout)", where, spec.name, spec.keyType.Name)}, nil
		}
		return nil, nil
	}
	if spec.interval != set.Interval || spec.interval && set.KeyType.Name != spec.keyType.Name {
		return []string{fmt.Sprintf("%s: set %s differs from plan (type %s; flags interval: %v)", where, spec.name, spec.keyType.Name, spec.interval)}, nil
	}
	els, err := c.GetSetElements(set)
	if err != nil {
		return nil, fmt.Errorf("reading set %s: %w", spec.name, err)
	}
	if spec.interval {
		return checkPrefixes(spec, elementsPrefixes(els), where), nil
	}
	var got []uint16
	for _, e := range els {
		if len(e.Key) == 2 {
			got = append(got, binaryutil.BigEndian.Uint16(e.Key))
		}
	}
	slices.Sort(got)
	var drift []string
	if missing := minus(spec.ports, got); len(missing) > 0 {
		drift = append(drift, fmt.Sprintf("%s: set %s lacks ports %v", where, spec.name, missing))
	}
	if extra := minus(got, spec.ports); len(extra) > 0 {
		drift = append(drift, fmt.Sprintf("%s: set %s has unexpected ports %v", where, spec.name, extra))
	}
	return drift, nil
}

// checkPrefixes compares an interval set's elements, read back as
// prefixes, with the plan's.
func checkPrefixes(spec setSpec, got []string, where string) []string {
	want := make([]string, len(spec.prefixes))
	for i, p := range spec.prefixes {
		want[i] = prefixString(p)
	}
	var drift []string
	if missing := slices.DeleteFunc(slices.Clone(want), func(s string) bool { return slices.Contains(got, s) }); len(missing) > 0 {
		drift = append(drift, fmt.Sprintf("%s: set %s lacks %v", where, spec.name, missing))
	}
	if extra := slices.DeleteFunc(slices.Clone(got), func(s string) bool { return slices.Contains(want, s) }); len(extra) > 0 {
		drift = append(drift, fmt.Sprintf("%s: set %s has unexpected %v", where, spec.name, extra))
	}
	return drift
}

// sameExprs compares a rule read back from the kernel with the planned one.
// The kernel names the set of a lookup or dynset but not the batch-local set
// ID (and names an anonymous set itself: sameAnonSets compares those), a
// counter's counts are not compared, and google/nftables silently skips expressions it cannot decode,
// tproxy and socket among them: those are left out of the comparison. What
// feeds them (the port loaded for tproxy, the compare after socket) is
// still compared.
func sameExprs(got, want []expr.Any) bool {
	want = slices.DeleteFunc(slices.Clone(want), func(e expr.Any) bool {
		switch e.(type) {
		case *expr.TProxy, *expr.Socket:
			return true
		}
		return false
	})
	if len(got) != len(want) {
		return false
	}
	for i := range got {
		g := got[i]
		switch e := g.(type) {
		case *expr.Lookup:
			ec := *e
			ec.SetID = 0
			if isAnonSet(ec.SetName) {
				ec.SetName = anonSetName
			}
			g = &ec
		case *expr.Dynset:
			ec := *e
			ec.SetID = 0
			g = &ec
		case *expr.Counter:
			// The counts are traffic, not plan.
			g = &expr.Counter{}
		}
		if !reflect.DeepEqual(g, want[i]) {
			return false
		}
	}
	return true
}

// minus returns the elements of a (sorted) not in b.
func minus(a, b []uint16) []uint16 {
	var out []uint16
	for _, x := range a {
		if !slices.Contains(b, x) {
			out = append(out, x)
		}
	}
	return out
}
