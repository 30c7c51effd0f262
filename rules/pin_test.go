package rules

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/google/nftables"
	"github.com/google/nftables/binaryutil"
	"github.com/google/nftables/expr"
	"golang.org/x/sys/unix"
)

// These tests pin the netlink side of the ruleset to its text without a
// kernel: the objects Apply queues, recorded and decompiled, must list as
// String() does. The root tests (TestApplyListsAsString, ...) pin String()
// to what the kernel and nft make of those objects.

// recorder is a batch that keeps what is queued, numbering sets as a Conn
// does (from an arbitrary start, so a set ID of 0 or 1 is caught).
type recorder struct {
	nextID uint32
	sets   []*nftables.Set
	elems  map[*nftables.Set][]nftables.SetElement
	chains []*nftables.Chain
	rules  []*nftables.Rule
}

func (r *recorder) FlushSet(*nftables.Set) {}

func (r *recorder) AddSet(s *nftables.Set, els []nftables.SetElement) error {
	if s.ID == 0 {
		r.nextID++
		s.ID = r.nextID
		if s.Anonymous {
			s.Name = "__set%d" // as Conn.AddSet names it
		}
	}
	r.sets = append(r.sets, s)
	r.elems[s] = els
	return nil
}

func (r *recorder) AddChain(c *nftables.Chain) *nftables.Chain {
	r.chains = append(r.chains, c)
	return c
}

func (r *recorder) AddRule(rule *nftables.Rule) *nftables.Rule {
	r.rules = append(r.rules, rule)
	return rule
}

// record queues table tb of plan p as Apply does (not in place).
func record(t *testing.T, p *Plan, tb table) (*recorder, *nftables.Table) {
	t.Helper()
	return recordTable(t, p.cfg.Name, tb)
}

// recordTable queues table tb called name as Apply does (not in place).
func recordTable(t *testing.T, name string, tb table) (*recorder, *nftables.Table) {
	t.Helper()
	tbl := &nftables.Table{Name: name, Family: tb.family}
	rec := &recorder{nextID: 100, elems: map[*nftables.Set][]nftables.SetElement{}}
	if err := tb.queue(rec, tbl, nil); err != nil {
		t.Fatal(err)
	}
	return rec, tbl
}

func (r *recorder) setsByName() setIndex {
	idx := setIndex{byName: map[string]*nftables.Set{}, anon: map[uint32]*nftables.Set{}, elems: r.elems}
	for _, s := range r.sets {
		if s.Anonymous {
			idx.anon[s.ID] = s
			continue
		}
		idx.byName[s.Name] = s
	}
	return idx
}

// rulesOf are the recorded rules of chain ch, in order.
func (r *recorder) rulesOf(ch *nftables.Chain) []*nftables.Rule {
	return slices.DeleteFunc(slices.Clone(r.rules), func(rule *nftables.Rule) bool { return rule.Chain != ch })
}

// Names nft prints for the hooks and priorities the package uses.
// (Hook numbers overlap between families: netdev ingress is 0, as is
// prerouting; netdev egress is 1, as is input.)
var (
	hookNames = map[nftables.TableFamily]map[nftables.ChainHook]string{
		nftables.TableFamilyBridge: {*nftables.ChainHookPrerouting: "prerouting", *nftables.ChainHookOutput: "output"},
		nftables.TableFamilyINet:   {*nftables.ChainHookPrerouting: "prerouting", *nftables.ChainHookInput: "input"},
		nftables.TableFamilyNetdev: {*nftables.ChainHookIngress: "ingress", *nftables.ChainHookEgress: "egress"},
	}
	prioNames = map[nftables.TableFamily]map[nftables.ChainPriority]string{
		nftables.TableFamilyBridge: {-300: "dstnat", -200: "filter"},
		nftables.TableFamilyINet:   {-150: "mangle", 0: "filter"},
		nftables.TableFamilyNetdev: {0: "filter", 100: "100"},
	}
	tableFamilies = map[nftables.TableFamily]string{nftables.TableFamilyBridge: "bridge", nftables.TableFamilyINet: "inet", nftables.TableFamilyNetdev: "netdev"}
)

// listing prints the recorded table t as nft lists it, from the netlink
// objects alone.
func (r *recorder) listing(t *nftables.Table) (string, error) {
	var b strings.Builder
	fmt.Fprintf(&b, "table %s %s {\n", tableFamilies[t.Family], t.Name)
	for _, s := range r.sets {
		if s.Anonymous {
			continue // listed in the rule that uses it
		}
		if err := r.listSet(&b, t, s); err != nil {
			return "", fmt.Errorf("set %s: %w", s.Name, err)
		}
	}
	for i, ch := range r.chains {
		if i > 0 {
			b.WriteString("\n")
		}
		if err := r.listChain(&b, t, ch); err != nil {
			return "", fmt.Errorf("chain %s: %w", ch.Name, err)
		}
	}
	b.WriteString("}\n")
	return b.String(), nil
}

func (r *recorder) listSet(b *strings.Builder, t *nftables.Table, s *nftables.Set) error {
	if s.Table != t || s.Anonymous || s.Constant {
		return fmt.Errorf("not a plain named set of the table: %+v", s)
	}
	if s.IsMap {
		// Only the neighbour maps: address -> MAC, dynamic, no elements.
		if s.DataType.Name != nftables.TypeEtherAddr.Name || s.DataType.Bytes != 6 || !s.Dynamic || !s.HasTimeout ||
			s.Interval || len(r.elems[s]) > 0 || (s.KeyType.Name != "ipv4_addr" && s.KeyType.Name != "ipv6_addr") {
			return fmt.Errorf("a map the package does not make: %+v", s)
		}
		fmt.Fprintf(b, "\tmap %s {\n\t\ttype %s : %s\n\t\tsize %d\n\t\tflags dynamic,timeout\n\t\ttimeout %s\n\t}\n\n",
			s.Name, s.KeyType.Name, s.DataType.Name, s.Size, nftDuration(s.Timeout))
		return nil
	}
	fmt.Fprintf(b, "\tset %s {\n\t\ttype %s\n", s.Name, s.KeyType.Name)
	if s.Interval {
		if s.Dynamic || s.Timeout != 0 || s.Size != 0 || (s.KeyType.Name != "ipv4_addr" && s.KeyType.Name != "ipv6_addr") ||
			s.HasTimeout != strings.HasPrefix(s.Name, "bypass_hosts") {
			return fmt.Errorf("an interval set the package does not make: %+v", s)
		}
		if s.HasTimeout {
			b.WriteString("\t\tflags interval,timeout\n")
		} else {
			b.WriteString("\t\tflags interval\n")
		}
		for _, e := range r.elems[s] {
			if len(e.Key) != int(s.KeyType.Bytes) {
				return fmt.Errorf("element %x is not a %s", e.Key, s.KeyType.Name)
			}
		}
		renderElements(b, elementsPrefixes(r.elems[s]))
		b.WriteString("\t}\n\n")
		return nil
	}
	switch {
	case s.Dynamic && s.HasTimeout:
		fmt.Fprintf(b, "\t\tsize %d\n\t\tflags dynamic,timeout\n\t\ttimeout %s\n", s.Size, nftDuration(s.Timeout))
	case s.Dynamic || s.HasTimeout || s.Size != 0 || s.Timeout != 0:
		return fmt.Errorf("flags the package does not use: %+v", s)
	}
	var ports []uint16
	for _, e := range r.elems[s] {
		if len(e.Key) != 2 || s.KeyType.Name != nftables.TypeInetService.Name {
			return fmt.Errorf("element %x is not a port", e.Key)
		}
		ports = append(ports, binaryutil.BigEndian.Uint16(e.Key))
	}
	slices.Sort(ports)
	renderPorts(b, ports)
	b.WriteString("\t}\n\n")
	return nil
}

func (r *recorder) listChain(b *strings.Builder, t *nftables.Table, ch *nftables.Chain) error {
	hook, prio := hookNames[t.Family][*ch.Hooknum], prioNames[t.Family][*ch.Priority]
	if ch.Table != t || ch.Type != nftables.ChainTypeFilter || ch.Policy == nil || *ch.Policy != nftables.ChainPolicyAccept ||
		hook == "" || prio == "" || (ch.Device != "") != (t.Family == nftables.TableFamilyNetdev) {
		return fmt.Errorf("not a filter base chain of the table with policy accept (and a device in netdev): %+v", ch)
	}
	device := ""
	if ch.Device != "" {
		device = fmt.Sprintf(" device %q", ch.Device)
	}
	fmt.Fprintf(b, "\tchain %s {\n\t\ttype filter hook %s%s priority %s; policy accept;\n", ch.Name, hook, device, prio)
	for i, rule := range r.rulesOf(ch) {
		text, err := decompileRule(t.Family, r.setsByName(), rule)
		if err != nil || rule.Table != t {
			return fmt.Errorf("rule %d: %v (table %v)", i+1, err, rule.Table)
		}
		fmt.Fprintf(b, "\t\t%s\n", text)
	}
	b.WriteString("\t}\n")
	return nil
}

// pinnedPlans are the golden plans, the variants of the one with other
// values, lingering ports (a bridge set that differs from the inet one),
// and that one with UDP in every variant.
func pinnedPlans(t *testing.T) map[string]*Plan {
	plans := goldenPlans(t)
	many := plans["many.nft"]
	plans["many draining"] = many.Draining()
	plans["many bypass"] = many.Overloaded(OverloadBypass)
	plans["many refuse"] = many.Overloaded(OverloadRefuse)
	cfg := many.Config()
	cfg.LingerPorts = []uint16{8, 9, 10, 11, 12, 13, 14, 15}
	plans["linger"] = mustPlan(t, cfg)
	cfg.UDPPorts = []uint16{53, 123, 443, 500, 4500, 51820}
	cfg.ProxyUDPPort = 15002
	cfg.UDPSessionTimeout = 2*time.Hour + 30*time.Second
	udp := mustPlan(t, cfg)
	for _, q := range []*Plan{udp, udp.UDPBypass(true)} {
		name := map[bool]string{false: "udp", true: "udp bypass"}[q.IsUDPBypass()]
		plans["many "+name] = q
		plans["many "+name+" draining"] = q.Draining()
		plans["many "+name+" overload bypass"] = q.Overloaded(OverloadBypass)
		plans["many "+name+" overload refuse"] = q.Overloaded(OverloadRefuse)
	}
	// Selection in every variant, with and without UDP.
	for name, cfg := range map[string]Config{"selection": selectionConfig(), "selection udp": func() Config {
		c := selectionConfig()
		c.UDPPorts, c.ProxyUDPPort = []uint16{53, 443}, 3130
		return c
	}()} {
		q := mustPlan(t, cfg)
		plans[name] = q
		plans[name+" draining"] = q.Draining()
		plans[name+" overload bypass"] = q.Overloaded(OverloadBypass)
		plans[name+" overload refuse"] = q.Overloaded(OverloadRefuse)
		plans[name+" udp bypass"] = q.UDPBypass(true)
	}
	// Invisible in every variant, with UDP, lingering ports and a
	// selection.
	inv := invisibleConfig()
	inv.LingerPorts = []uint16{8, 9}
	inv.UDPPorts, inv.ProxyUDPPort = []uint16{53, 443}, 3130
	inv.ClientCIDRs = []netip.Prefix{netip.MustParsePrefix("10.1.0.0/16")}
	q := mustPlan(t, inv)
	plans["invisible all"] = q
	plans["invisible all draining"] = q.Draining()
	plans["invisible all overload bypass"] = q.Overloaded(OverloadBypass)
	plans["invisible all overload refuse"] = q.Overloaded(OverloadRefuse)
	plans["invisible all udp bypass"] = q.UDPBypass(true)
	return plans
}

// pinMismatches records the batch of p, lets mutate change each rule's
// expressions, and describes every rule that does not decompile to its
// item's text. It also reports how many rules mutate changed.
func pinMismatches(t *testing.T, p *Plan, mutate func([]expr.Any) bool) (mismatches []string, mutated int) {
	t.Helper()
	return pinTablesMismatches(t, p.cfg.Name, p.tables, mutate)
}

// pinTablesMismatches is pinMismatches for tables called name.
func pinTablesMismatches(t *testing.T, name string, tables []table, mutate func([]expr.Any) bool) (mismatches []string, mutated int) {
	t.Helper()
	for _, tb := range tables {
		rec, tbl := recordTable(t, name, tb)
		if len(rec.chains) != len(tb.chains) {
			t.Fatalf("table %s: %d chains queued, %d described", tableFamilies[tb.family], len(rec.chains), len(tb.chains))
		}
		for i, ch := range tb.chains {
			queued := rec.rulesOf(rec.chains[i])
			if len(queued) != len(ch.rules) {
				t.Fatalf("chain %s: %d rules queued, %d described", ch.name, len(queued), len(ch.rules))
			}
			for j, r := range ch.rules {
				if mutate != nil && mutate(queued[j].Exprs) {
					mutated++
				}
				got, err := decompileRule(tbl.Family, rec.setsByName(), queued[j])
				if want := r.String(); err != nil || got != want {
					mismatches = append(mismatches, fmt.Sprintf("%s %s rule %d:\n  text  %s\n  exprs %s (%v)",
						tableFamilies[tb.family], ch.name, j+1, want, got, err))
				}
			}
		}
	}
	return mismatches, mutated
}

// TestExprsDecompileToText: for every plan variant, each rule's queued
// expressions decompile to the rule's text, and the whole batch (sets,
// elements, chains, rules) lists as String() does.
func TestExprsDecompileToText(t *testing.T) {
	for name, p := range pinnedPlans(t) {
		t.Run(name, func(t *testing.T) {
			if mismatches, _ := pinMismatches(t, p, nil); len(mismatches) > 0 {
				t.Fatalf("expressions and text disagree:\n%s", strings.Join(mismatches, "\n"))
			}
			var listing strings.Builder
			for _, tb := range p.tables {
				rec, tbl := record(t, p, tb)
				text, err := rec.listing(tbl)
				if err != nil {
					t.Fatalf("table %s: %v", tableFamilies[tb.family], err)
				}
				listing.WriteString(text)
			}
			if got := listing.String(); got != p.String() {
				t.Errorf("the queued batch lists differently from String\n--- batch\n%s--- String\n%s", got, p)
			}
		})
	}
}

// first is a mutation of the first expression of type T in a rule that
// matches.
func first[T expr.Any](match func(T) bool, change func(T)) func([]expr.Any) bool {
	return func(exprs []expr.Any) bool {
		for _, e := range exprs {
			if x, ok := e.(T); ok && match(x) {
				change(x)
				return true
			}
		}
		return false
	}
}

func swap(b []byte) { slices.Reverse(b) }

// TestDecompileCatchesWrongExprs: the pin fails when an item emits the
// wrong bytecode for its text, for each kind of mistake it guards against.
// The plan has every item: TCP bypass and UDP bypass rules, fragments,
// both rejects.
func TestDecompileCatchesWrongExprs(t *testing.T) {
	p := pinnedPlans(t)["many udp bypass overload bypass"]
	proxyPort := binaryutil.BigEndian.PutUint16(p.cfg.ProxyTCPPort)
	for name, mutate := range map[string]func([]expr.Any) bool{
		"port compared little-endian": first(func(c *expr.Cmp) bool { return string(c.Data) == string(proxyPort) }, func(c *expr.Cmp) { swap(c.Data) }),
		"tproxy port little-endian":   first(func(i *expr.Immediate) bool { return len(i.Data) == 2 }, func(i *expr.Immediate) { swap(i.Data) }),
		"mark big-endian": first(func(i *expr.Immediate) bool { return len(i.Data) == 4 },
			func(i *expr.Immediate) { binary.BigEndian.PutUint32(i.Data, p.cfg.Mark) }),
		"flow key part in the wrong register": first(func(e *expr.Payload) bool { return e.DestRegister == unix.NFT_REG32_01 },
			func(e *expr.Payload) { e.DestRegister = unix.NFT_REG32_02 }),
		"ip6 address at the IPv4 offset": first(func(e *expr.Payload) bool { return e.Len == 16 && e.Offset == 8 }, func(e *expr.Payload) { e.Offset = 12 }),
		"sport and dport swapped":        first(func(e *expr.Payload) bool { return e.Offset == 2 && e.Len == 2 }, func(e *expr.Payload) { e.Offset = 0 }),
		"no meta protocol check": first(func(m *expr.Meta) bool { return m.Key == expr.MetaKeyPROTOCOL },
			func(m *expr.Meta) { m.Key = expr.MetaKeyL4PROTO }),
		"lookup of another set ID":      first(func(l *expr.Lookup) bool { return true }, func(l *expr.Lookup) { l.SetID++ }),
		"dynset update instead of add":  first(func(d *expr.Dynset) bool { return true }, func(d *expr.Dynset) { d.Operation = unix.NFT_DYNSET_OP_UPDATE }),
		"interface name not padded":     first(func(c *expr.Cmp) bool { return len(c.Data) == unix.IFNAMSIZ }, func(c *expr.Cmp) { c.Data = c.Data[:6] }),
		"flags mask without fin":        first(func(b *expr.Bitwise) bool { return true }, func(b *expr.Bitwise) { b.Mask = []byte{0x16} }),
		"fib result in network order":   first(func(f *expr.Cmp) bool { return len(f.Data) == 4 }, func(c *expr.Cmp) { swap(c.Data) }),
		"ether saddr written":           first(func(e *expr.Payload) bool { return e.Base == expr.PayloadBaseLLHeader }, func(e *expr.Payload) { e.Offset = 6 }),
		"MAC immediate in another form": first(func(i *expr.Immediate) bool { return len(i.Data) == 6 }, func(i *expr.Immediate) { swap(i.Data) }),
		"udp checked as tcp": first(func(c *expr.Cmp) bool { return bytes.Equal(c.Data, []byte{unix.IPPROTO_UDP}) },
			func(c *expr.Cmp) { c.Data = []byte{unix.IPPROTO_TCP} }),
		"frag-off mask without MF":    first(func(b *expr.Bitwise) bool { return b.Len == 2 }, func(b *expr.Bitwise) { b.Mask = []byte{0x1f, 0xff} }),
		"frag-off mask little-endian": first(func(b *expr.Bitwise) bool { return b.Len == 2 }, func(b *expr.Bitwise) { swap(b.Mask) }),
		"frag-off compared equal":     first(func(c *expr.Cmp) bool { return c.Op == expr.CmpOpNeq }, func(c *expr.Cmp) { c.Op = expr.CmpOpEq }),
		"ip6 next header not fragment": first(func(c *expr.Cmp) bool { return bytes.Equal(c.Data, []byte{unix.IPPROTO_FRAGMENT}) },
			func(c *expr.Cmp) { c.Data = []byte{unix.IPPROTO_UDP} }),
		"ip6 next header at the wrong offset": first(func(e *expr.Payload) bool { return e.Base == expr.PayloadBaseNetworkHeader && e.Len == 1 },
			func(e *expr.Payload) { e.Offset = 40 }),
		"reject with host unreachable": first(func(r *expr.Reject) bool { return r.Type == unix.NFT_REJECT_ICMPX_UNREACH },
			func(r *expr.Reject) { r.Code = unix.NFT_REJECT_ICMPX_HOST_UNREACH }),
		"udp flows looked up in the bypass set": first(func(l *expr.Lookup) bool { return strings.HasPrefix(l.SetName, "udpflows") },
			func(l *expr.Lookup) { l.SetName = "bypass" + strings.TrimPrefix(l.SetName, "udpflows") }),
	} {
		t.Run(name, func(t *testing.T) {
			mismatches, mutated := pinMismatches(t, p, mutate)
			if mutated == 0 {
				t.Fatal("the mutation applies to no rule")
			}
			if len(mismatches) == 0 {
				t.Fatalf("%d rules mutated, but all still decompile to their text", mutated)
			}
			t.Logf("%d rules mutated, %d mismatches; first:\n%s", mutated, len(mismatches), mismatches[0])
		})
	}
}

// TestDecompileCatchesWrongSelectionExprs: as TestDecompileCatchesWrongExprs,
// for the selection's items (address lookups, negated flow lookups).
func TestDecompileCatchesWrongSelectionExprs(t *testing.T) {
	p := pinnedPlans(t)["selection udp"]
	sel := func(l *expr.Lookup) bool { return isSelectionSet(l.SetName) }
	for name, mutate := range map[string]func([]expr.Any) bool{
		"selection lookup not inverted": first(func(l *expr.Lookup) bool { return sel(l) && l.Invert }, func(l *expr.Lookup) { l.Invert = false }),
		"exclusion lookup inverted":     first(func(l *expr.Lookup) bool { return sel(l) && !l.Invert }, func(l *expr.Lookup) { l.Invert = true }),
		"udp flow lookup not inverted": first(func(l *expr.Lookup) bool { return strings.HasPrefix(l.SetName, "udpflows") && l.Invert },
			func(l *expr.Lookup) { l.Invert = false }),
		"client set looked up by server": first(func(l *expr.Lookup) bool { return l.SetName == "clients4" },
			func(l *expr.Lookup) { l.SetName = "servers4" }),
		"daddr loaded for saddr": first(func(e *expr.Payload) bool {
			return e.Base == expr.PayloadBaseNetworkHeader && e.Offset == 12 && e.DestRegister == 1
		},
			func(e *expr.Payload) { e.Offset = 16 }),
		"ip6 address cut to 4 bytes": first(func(e *expr.Payload) bool { return e.Base == expr.PayloadBaseNetworkHeader && e.Len == 16 },
			func(e *expr.Payload) { e.Len = 4 }),
	} {
		t.Run(name, func(t *testing.T) {
			mismatches, mutated := pinMismatches(t, p, mutate)
			if mutated == 0 {
				t.Fatal("the mutation applies to no rule")
			}
			if len(mismatches) == 0 {
				t.Fatalf("%d rules mutated, but all still decompile to their text", mutated)
			}
		})
	}
}

// TestDecompileCatchesWrongHostBypassExprs: as TestDecompileCatchesWrongExprs,
// for the live bypass list's items (address lookups in bypass_hosts4/6).
func TestDecompileCatchesWrongHostBypassExprs(t *testing.T) {
	p := pinnedPlans(t)["many udp"]
	for name, mutate := range map[string]func([]expr.Any) bool{
		"host lookup inverted": first(func(l *expr.Lookup) bool { return isHostSet(l.SetName) }, func(l *expr.Lookup) { l.Invert = true }),
		"host set of the other family": first(func(l *expr.Lookup) bool { return l.SetName == "bypass_hosts4" },
			func(l *expr.Lookup) { l.SetName = "bypass_hosts6" }),
		"saddr loaded for daddr": first(func(e *expr.Payload) bool {
			return e.Base == expr.PayloadBaseNetworkHeader && e.Offset == 16 && e.DestRegister == 1 && e.Len == 4
		}, func(e *expr.Payload) { e.Offset = 12 }),
	} {
		t.Run(name, func(t *testing.T) {
			mismatches, mutated := pinMismatches(t, p, mutate)
			if mutated == 0 {
				t.Fatal("the mutation applies to no rule")
			}
			if len(mismatches) == 0 {
				t.Fatalf("%d rules mutated, but all still decompile to their text", mutated)
			}
		})
	}
}
