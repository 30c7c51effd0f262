package rules

import (
	"errors"
	"fmt"
	"slices"

	"github.com/google/nftables"
	"golang.org/x/sys/unix"
)

// Apply replaces ghostwire's tables with the plan's (bridge and inet, and
// netdev when invisible), whole, in one atomic batch. Packets see either
// the old ruleset or the new one, never a mix, and applying the same plan
// twice leaves an identical ruleset. A netdev table of the plan's name that
// the plan does not have (invisible switched off) is deleted in the same
// batch. The new tables are ordinary ones that outlive the caller. Apply
// fails (changing nothing) if another process owns the tables (see
// ApplyOwned).
//
// A table that exists with the same flags (ordinary over ordinary, or owned
// by the same connection) and whose sets are compatible with the plan's is
// rebuilt in place: its rules, chains and other sets go, the ports sets are
// refilled, the plan's sets it lacks (the UDP ones, when UDP ports are
// added) are made, and the flow sets and neighbour maps keep their
// elements (their timeout follows the plan), so flows bypassed during an
// overload stay bridged through any later plan, the UDP flows the proxy
// relays stay diverted through any switch of variant, and the hosts an
// invisible box learned stay known. Any other table is deleted and built
// again, with empty flow sets and maps.
func (p *Plan) Apply(c *nftables.Conn) error {
	if err := p.replace(c, 0); err != nil {
		return fmt.Errorf("applying nftables tables %s: %w", p.cfg.Name, err)
	}
	return nil
}

// ApplyOwned is Apply with tables owned by c's netlink socket: when that
// socket closes (clean exit, crash or kill -9 of the process holding it) the
// kernel deletes the tables, all of them at once, so frames are bridged
// untouched again (fail-open) and an invisible box's diversion never
// outlives its rewrite. While owned, no other socket can change or delete
// them.
//
// c must come from nftables.New(nftables.AsLasting(), ...) and stay open for
// as long as the diversion should last; ApplyOwned may be called on it again
// (reload, Draining). Existing un-owned tables of the same name (from Apply)
// are replaced in the same batch. If c is not lasting, the tables vanish as
// soon as the batch's socket closes: ApplyOwned checks that they are still
// there and owned by c, and reports an error otherwise.
func (p *Plan) ApplyOwned(c *nftables.Conn) error {
	if err := p.replace(c, nftables.TableFlagOwner); err != nil {
		return fmt.Errorf("applying owned nftables tables %s: %w", p.cfg.Name, err)
	}
	port, err := c.GetPortID()
	if err != nil {
		return fmt.Errorf("reading nftables connection port: %w", err)
	}
	// Only which tables exist and their owner matter here: Tables would
	// also read the rules back for the overload mode.
	existing, err := listOwn(c, p.cfg.Name)
	if err != nil {
		return err
	}
	for _, tb := range p.tables {
		if t := existing[tb.family]; t == nil || t.Flags&nftables.TableFlagOwner == 0 || t.Owner != port {
			return fmt.Errorf("owned nftables table %s %s did not stay with netlink port %d (found %+v): "+
				"the connection must be created with nftables.AsLasting() and kept open", familyName(tb.family), p.cfg.Name, port, t)
		}
	}
	return nil
}

// replace queues and flushes the one batch behind Apply and ApplyOwned.
func (p *Plan) replace(c *nftables.Conn, flags nftables.TableFlags) error {
	existing, err := listOwn(c, p.cfg.Name)
	if err != nil {
		return err
	}
	return replaceTables(c, p.cfg.Name, p.tables, flags, existing)
}

// replaceTables queues tables, named name, with flags over the existing
// ones (see Apply), deletes the other existing ones, and flushes the batch.
func replaceTables(c *nftables.Conn, name string, tables []table, flags nftables.TableFlags,
	existing map[nftables.TableFamily]*nftables.Table) error {
	planned := map[nftables.TableFamily]bool{}
	for _, tb := range tables {
		planned[tb.family] = true
		var kept map[string]bool
		if old := existing[tb.family]; old != nil && old.Flags == flags {
			var err error
			if kept, err = queueClear(c, old, tb.sets); err != nil {
				return fmt.Errorf("reading table %s %s: %w", familyName(tb.family), name, err)
			}
		}
		if kept == nil {
			queueDelete(c, name, tb.family, existing[tb.family])
		}
		t := c.AddTable(&nftables.Table{Name: name, Family: tb.family, Flags: flags})
		if err := tb.queue(c, t, kept); err != nil {
			return fmt.Errorf("table %s %s: %w", familyName(tb.family), name, err)
		}
	}
	for _, fam := range families {
		if old := existing[fam]; old != nil && !planned[fam] {
			queueDelete(c, name, fam, old)
		}
	}
	if err := c.Flush(); err != nil {
		return explainOwned(err, existing)
	}
	return nil
}

// batch is the part of *nftables.Conn that builds a table; the no-root
// tests record what is queued through it.
type batch interface {
	FlushSet(*nftables.Set)
	AddSet(*nftables.Set, []nftables.SetElement) error
	AddChain(*nftables.Chain) *nftables.Chain
	AddRule(*nftables.Rule) *nftables.Rule
}

// queue queues the sets, chains and rules of tb into t, just added to b.
// kept names the sets of tb that t holds when t exists and queueClear has
// emptied it but for them (nil for a new table): those that are ports sets
// are refilled, the flow sets and maps keep their elements, and the sets t
// lacks are made. A rule's anonymous sets are queued right before it.
func (tb table) queue(b batch, t *nftables.Table, kept map[string]bool) error {
	sets := map[string]*nftables.Set{}
	for _, spec := range tb.sets {
		s := spec.nftSet(t)
		if kept[spec.name] && !spec.dynamic && !spec.live {
			b.FlushSet(s)
		}
		// On a set that exists, AddSet updates it (the timeout of a
		// flow set) and keeps its elements. It only fails on a
		// malformed set or element, which a validated plan cannot
		// produce; the half-queued batch is then left unflushed.
		// AddSet numbers the set: the rules refer to it by that ID.
		if err := b.AddSet(s, spec.elements()); err != nil {
			return fmt.Errorf("adding set %s: %w", spec.name, err)
		}
		sets[spec.name] = s
	}
	var anonErr error
	anon := func(kt nftables.SetDatatype, els []nftables.SetElement) *nftables.Set {
		s := &nftables.Set{Table: t, Anonymous: true, Constant: true, KeyType: kt}
		if err := b.AddSet(s, els); err != nil && anonErr == nil {
			anonErr = fmt.Errorf("adding an anonymous %s set: %w", kt.Name, err)
		}
		return s
	}
	for _, ch := range tb.chains {
		nch := b.AddChain(ch.nftChain(t))
		for _, r := range ch.rules {
			exprs := r.exprs(tb.family, func(name string) *nftables.Set { return sets[name] }, anon)
			if anonErr != nil {
				return anonErr
			}
			b.AddRule(&nftables.Rule{Table: t, Chain: nch, Exprs: exprs, UserData: r.userData()})
		}
	}
	return nil
}

// queueClear empties table t for an in-place rebuild: it keeps the sets of
// specs that t holds in a form AddSet can update and that are the first of
// specs, in order (those after them are then made after them, and nft
// lists sets in the order they were made, so the table still lists as
// planned). It queues the flush of all rules and the deletion of every
// chain and of every other named set, and returns the names of the sets it
// keeps (not nil). A static set of specs that t holds out of that order
// (a selection set, when a set before it is new) is deleted too, to be
// made again in its place; if a flow set would have to be, the table
// cannot be rebuilt in place: queueClear queues nothing and returns nil.
func queueClear(c *nftables.Conn, t *nftables.Table, specs []setSpec) (map[string]bool, error) {
	have, err := c.GetSets(t)
	if err != nil {
		return nil, fmt.Errorf("listing sets: %w", err)
	}
	kept := map[string]bool{}
	for _, s := range have {
		i := slices.IndexFunc(specs, func(spec setSpec) bool { return spec.name == s.Name })
		if i < 0 {
			continue
		}
		if i == len(kept) && specs[i].fits(s) {
			kept[s.Name] = true
			continue
		}
		if specs[i].dynamic {
			return nil, nil
		}
	}
	chains, err := c.ListChainsOfTableFamily(t.Family)
	if err != nil {
		return nil, fmt.Errorf("listing chains: %w", err)
	}
	// Rules first: with none left, nothing refers to a chain or set.
	c.FlushTable(t)
	for _, ch := range chains {
		if ch.Table.Name == t.Name {
			c.DelChain(&nftables.Chain{Name: ch.Name, Table: t})
		}
	}
	for _, s := range have {
		// Anonymous sets went with the rules that own them.
		if !kept[s.Name] && !s.Anonymous {
			c.DelSet(&nftables.Set{Name: s.Name, Table: t})
		}
	}
	return kept, nil
}

// RemoveTables deletes ghostwire's tables named name (bridge, inet and
// netdev) in one batch. Tables that do not exist are fine, so it is safe
// to repeat. Tables owned by
// another netlink socket (a running proxy) cannot be removed: the error says
// so and wraps unix.EPERM.
func RemoveTables(c *nftables.Conn, name string) error {
	if err := validTableName(name); err != nil {
		return fmt.Errorf("removing nftables tables: %w", err)
	}
	existing, err := listOwn(c, name)
	if err != nil {
		return fmt.Errorf("removing nftables tables %s: %w", name, err)
	}
	if len(existing) == 0 {
		return nil
	}
	for _, fam := range families {
		if t, ok := existing[fam]; ok {
			queueDelete(c, name, fam, t)
		}
	}
	if err := c.Flush(); err != nil {
		return fmt.Errorf("removing nftables tables %s: %w", name, explainOwned(err, existing))
	}
	return nil
}

// queueDelete queues "add table; delete table". The add makes the delete
// safe if the table vanished since it was listed (its owner died). It must
// carry the existing table's flags: the kernel refuses to add or drop the
// owner flag on an existing table (EOPNOTSUPP).
func queueDelete(c *nftables.Conn, name string, fam nftables.TableFamily, old *nftables.Table) {
	var flags nftables.TableFlags
	if old != nil {
		flags = old.Flags
	}
	t := &nftables.Table{Name: name, Family: fam, Flags: flags}
	c.AddTable(t)
	c.DelTable(t)
}

// listOwn returns ghostwire's existing tables by family.
func listOwn(c *nftables.Conn, name string) (map[nftables.TableFamily]*nftables.Table, error) {
	return listTables(c, name, families[:])
}

// listTables returns the existing tables called name of families fams,
// by family.
func listTables(c *nftables.Conn, name string, fams []nftables.TableFamily) (map[nftables.TableFamily]*nftables.Table, error) {
	all, err := c.ListTables()
	if err != nil {
		return nil, fmt.Errorf("listing nftables tables: %w", err)
	}
	out := map[nftables.TableFamily]*nftables.Table{}
	for _, t := range all {
		if t.Name == name && slices.Contains(fams, t.Family) {
			out[t.Family] = t
		}
	}
	return out, nil
}

// explainOwned turns the kernel's bare EPERM for a table owned by another
// socket into something an operator can act on.
func explainOwned(err error, existing map[nftables.TableFamily]*nftables.Table) error {
	if !errors.Is(err, unix.EPERM) {
		return err
	}
	for _, fam := range families {
		if t := existing[fam]; t != nil && t.Flags&nftables.TableFlagOwner != 0 {
			return fmt.Errorf("table %s %s is owned by netlink port %d (a running ghostwire proxy?): %w",
				familyName(fam), t.Name, t.Owner, err)
		}
	}
	return err
}

func ref[T any](v T) *T { return &v }
