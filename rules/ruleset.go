package rules

import (
	"fmt"
	"net/netip"
	"strings"
	"time"

	"github.com/google/nftables"
	"github.com/google/nftables/binaryutil"
	"github.com/google/nftables/expr"
)

// The ruleset is described once, as typed values: tables hold sets and
// chains, chains hold rules, and a rule is a sequence of items. Every item
// knows both how nft 1.0.6 lists it and which expressions nft compiles it
// to, so String (the listing), Apply (the netlink batch) and Check (the
// comparison with the kernel) are walks over the same description. The
// items are in matches.go and statements.go, the plan's tables in
// tables.go; pin_test.go checks without a kernel that the expressions
// decompile to the text.

// table is one of the plan's tables (bridge, inet and, with
// Config.Invisible, netdev), or the quiet table (quiet.go).
type table struct {
	family nftables.TableFamily
	sets   []setSpec // in creation (and listing) order
	chains []chain
}

// setSpec is one named set (or map) of a table.
type setSpec struct {
	name    string
	keyType nftables.SetDatatype // its Name is the type as nft prints it
	// dataType is a map's data type (the neighbour maps' ether_addr,
	// invisible.go); the zero value for a set. A map is always dynamic:
	// the rules fill it.
	dataType nftables.SetDatatype
	// ports are the elements of a ports set. A dynamic set (a flow set)
	// has none in the plan: the rules fill it, each element lasting
	// timeout, and nft lists it with size, flags and timeout lines.
	ports   []uint16
	dynamic bool
	timeout time.Duration
	// interval marks a selection set: type ipv4_addr or ipv6_addr, flags
	// interval, its elements the prefixes (sorted, disjoint).
	interval bool
	prefixes []netip.Prefix
	// live marks a live bypass set (hostbypass.go): an interval set
	// with flags interval,timeout whose elements are not the plan's but
	// changed at run time; a rebuild keeps them.
	live bool
}

// isMap reports whether s is a map.
func (s setSpec) isMap() bool { return s.dataType.Name != "" }

// kind is "map" or "set", as nft lists it.
func (s setSpec) kind() string {
	if s.isMap() {
		return "map"
	}
	return "set"
}

// typeName is the set's type as nft lists it: the key type, and a map's
// data type after a colon.
func (s setSpec) typeName() string {
	if s.isMap() {
		return s.keyType.Name + " : " + s.dataType.Name
	}
	return s.keyType.Name
}

// size bounds a dynamic set's (or map's) elements.
func (s setSpec) size() uint32 {
	if s.isMap() {
		return neighbourMapSize
	}
	return flowSetSize
}

// nftSet is the set as a netlink object in table t.
func (s setSpec) nftSet(t *nftables.Table) *nftables.Set {
	set := &nftables.Set{Table: t, Name: s.name, KeyType: s.keyType, Interval: s.interval, HasTimeout: s.live}
	if s.dynamic {
		set.Dynamic, set.HasTimeout, set.Timeout, set.Size = true, true, s.timeout, s.size()
	}
	if s.isMap() {
		set.IsMap, set.DataType = true, s.dataType
	}
	return set
}

// elements are the ports as set keys (network byte order), or an
// interval set's prefixes as nft sends them.
func (s setSpec) elements() []nftables.SetElement {
	if s.interval {
		return prefixElements(s.prefixes)
	}
	els := make([]nftables.SetElement, 0, len(s.ports))
	for _, port := range s.ports {
		els = append(els, nftables.SetElement{Key: binaryutil.BigEndian.PutUint16(port)})
	}
	return els
}

// fits reports whether s, read from the kernel, is this set (or map) in a
// form that an AddSet of it updates in place (the kernel refuses a
// different type, data type or flags with EEXIST); the timeout and size
// may differ.
func (spec setSpec) fits(s *nftables.Set) bool {
	return s.KeyType.Name == spec.keyType.Name && s.KeyType.Bytes == spec.keyType.Bytes &&
		s.Dynamic == spec.dynamic && s.HasTimeout == (spec.dynamic || spec.live) &&
		s.Interval == spec.interval && !s.Anonymous && !s.Constant && !s.Concatenation &&
		s.IsMap == spec.isMap() && (!s.IsMap || s.DataType.Name == spec.dataType.Name && s.DataType.Bytes == spec.dataType.Bytes)
}

// chain is a base chain: type filter, policy accept. A netdev chain hooks
// one device (its ingress or egress).
type chain struct {
	name   string
	hook   chainHook
	prio   chainPrio
	device string // netdev chains only
	rules  []rule
}

// nftChain is the chain as a netlink object in table t.
func (ch chain) nftChain(t *nftables.Table) *nftables.Chain {
	return &nftables.Chain{
		Name:     ch.name,
		Table:    t,
		Type:     nftables.ChainTypeFilter,
		Hooknum:  ch.hook.num,
		Priority: ch.prio.num,
		Policy:   ref(nftables.ChainPolicyAccept),
		Device:   ch.device,
	}
}

// chainHook is a hook as nft names it and as netlink numbers it.
type chainHook struct {
	name string
	num  *nftables.ChainHook
}

// chainPrio is a priority as nft prints it, by a name relative to the
// family (bridge dstnat is -300, unlike inet's -100; bridge filter is
// -200, inet's and netdev's 0) or as a number, and its number.
type chainPrio struct {
	name string
	num  *nftables.ChainPriority
}

var (
	hookPrerouting   = chainHook{"prerouting", nftables.ChainHookPrerouting}
	hookInput        = chainHook{"input", nftables.ChainHookInput}
	hookOutput       = chainHook{"output", nftables.ChainHookOutput}
	hookIngress      = chainHook{"ingress", nftables.ChainHookIngress}
	hookEgress       = chainHook{"egress", nftables.ChainHookEgress}
	prioBridgeDstNAT = chainPrio{"dstnat", nftables.ChainPriorityRef(-300)}
	prioBridgeFilter = chainPrio{"filter", nftables.ChainPriorityRef(-200)}
	prioMangle       = chainPrio{"mangle", nftables.ChainPriorityMangle}
	prioFilter       = chainPrio{"filter", nftables.ChainPriorityFilter}
	// nft 1.0.6 lists netdev priority 100 as a number, not "filter + 100".
	prio100 = chainPrio{"100", nftables.ChainPriorityRef(100)}
)

// rule is a sequence of items, listed in order, separated by spaces.
type rule []ruleItem

// ruleItem is one match or statement of a rule.
type ruleItem interface {
	// String is the item as nft 1.0.6 lists it.
	String() string
	// emit appends the expressions nft compiles the item to.
	emit(e *emitter)
}

// emitter collects a rule's expressions. Like nft, it puts the protocol
// check a header access depends on (`meta protocol ip` before an IPv4
// header field, `meta l4proto tcp` before a TCP header field, `meta
// l4proto udp` before a UDP one and, in the netdev family, `meta iiftype
// ether` before an Ethernet header field) into the rule once, before the
// first access that needs it: nft then hides those checks in the listing,
// and a rule built here compiles to the same bytecode as the same rule
// loaded with `nft -f`. github.com/google/nftables inserts none of them,
// and in the netdev family, which sees every frame of a device, a header
// load without its check reads whatever is at that offset.
type emitter struct {
	family nftables.TableFamily
	// set resolves a set name to the set the rule refers to (by name and
	// by the batch's set ID).
	set func(name string) *nftables.Set
	// anon makes an anonymous constant set of the rule (`{ request,
	// reply }`) with key type kt and elements els, and returns it.
	anon    func(kt nftables.SetDatatype, els []nftables.SetElement) *nftables.Set
	exprs   []expr.Any
	ethType uint16 // the link layer protocol checked so far, 0 if none
	l4      byte   // the meta l4proto checked so far, 0 if none
	// ether is set once the link layer is known to be Ethernet (netdev:
	// after `meta iiftype ether`); nft then checks the Ethernet type
	// field rather than meta protocol.
	ether bool
	// userData is the rule's user data: its comment, if any.
	userData []byte
}

func (e *emitter) add(x ...expr.Any) { e.exprs = append(e.exprs, x...) }

// String lists the rule as nft does.
func (r rule) String() string {
	parts := make([]string, len(r))
	for i, it := range r {
		parts[i] = it.String()
	}
	return strings.Join(parts, " ")
}

// exprs compiles the rule for a table of family fam; set resolves set
// names and anon makes anonymous sets (see emitter).
func (r rule) exprs(fam nftables.TableFamily, set func(name string) *nftables.Set,
	anon func(nftables.SetDatatype, []nftables.SetElement) *nftables.Set) []expr.Any {
	e := &emitter{family: fam, set: set, anon: anon}
	for _, it := range r {
		it.emit(e)
	}
	return e.exprs
}

// userData is the rule's user data as nft writes it: its comment TLV, or
// nil for a rule without comment.
func (r rule) userData() []byte {
	e := &emitter{}
	for _, it := range r {
		if c, ok := it.(comment); ok {
			c.emit(e)
		}
	}
	return e.userData
}

// familyName is the family as nft spells it.
func familyName(f nftables.TableFamily) string {
	switch f {
	case nftables.TableFamilyBridge:
		return "bridge"
	case nftables.TableFamilyINet:
		return "inet"
	case nftables.TableFamilyNetdev:
		return "netdev"
	}
	return fmt.Sprintf("family %d", f)
}

// families lists ghostwire's tables in the order they are built and
// listed: the netdev one only exists with Config.Invisible.
var families = [...]nftables.TableFamily{nftables.TableFamilyBridge, nftables.TableFamilyINet, nftables.TableFamilyNetdev}
