package rules

import (
	"encoding/binary"
	"fmt"

	"github.com/google/nftables"
	"github.com/google/nftables/binaryutil"
	"github.com/google/nftables/expr"
	"golang.org/x/sys/unix"
)

// tableDef is one of the plan's two tables as the kernel will hold it.
type tableDef struct {
	family nftables.TableFamily
	chains []chainDef
}

type chainDef struct {
	name  string
	hook  *nftables.ChainHook
	prio  *nftables.ChainPriority
	rules [][]expr.Any
}

// Chain priorities nft prints by name (bridge dstnat is -300, unlike inet's -100).
var (
	prioBridgeDstNAT = nftables.ChainPriorityRef(-300)
	prioMangle       = nftables.ChainPriorityMangle
	prioFilter       = nftables.ChainPriorityFilter
)

// familyName is the family as nft spells it.
func familyName(f nftables.TableFamily) string {
	switch f {
	case nftables.TableFamilyBridge:
		return "bridge"
	case nftables.TableFamilyINet:
		return "inet"
	}
	return fmt.Sprintf("family %d", f)
}

// families lists ghostwire's tables in the order they are built and listed.
var families = [...]nftables.TableFamily{nftables.TableFamilyBridge, nftables.TableFamilyINet}

// tableDefs is the ruleset as kernel objects. Lookups and dynsets reference
// a set by name and by set.ID, so set must return the one added in the same
// batch (or one with ID 0 when comparing with what the kernel returns).
func (p *Plan) tableDefs(set func(fam nftables.TableFamily, name string) *nftables.Set) []tableDef {
	c := &p.cfg
	bset, iset := set(nftables.TableFamilyBridge, setName), set(nftables.TableFamilyINet, setName)

	// Bridge: redirect both directions of intercepted flows up to the IP
	// stack: set the destination MAC to br0's and mark the frame for the host.
	redirect := func(port string, offset uint32) []expr.Any {
		return concat(
			matchIfName(port),
			matchTCP(),
			[]expr.Any{
				&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseTransportHeader, Offset: offset, Len: 2},
				lookup(bset),
				&expr.Immediate{Register: 1, Data: []byte(c.BridgeMAC)},
				&expr.Payload{OperationType: expr.PayloadWrite, SourceRegister: 1, Base: expr.PayloadBaseLLHeader, Offset: 0, Len: 6},
				&expr.Immediate{Register: 1, Data: []byte{unix.PACKET_HOST}},
				&expr.Meta{Key: expr.MetaKeyPKTTYPE, SourceRegister: true, Register: 1},
			},
		)
	}
	const dport, sport = 2, 0 // offsets in the TCP header

	// Bypass, before any redirect: flows in a bypass set cross the bridge
	// untouched in every plan variant, so an overload's bypassed flows
	// stay bridged after it ends. Each client frame refreshes the entry's
	// timeout. While bypassing, a client's pure SYN to an intercepted port
	// records its flow and is bridged; rule for rule, this is what nft
	// compiles from String(), the meta protocol check nft adds before the
	// first address load included.
	var bridgeRules [][]expr.Any
	if p.overload == OverloadBypass {
		for _, f := range ipFamilies {
			bypass := set(nftables.TableFamilyBridge, f.set)
			bridgeRules = append(bridgeRules, concat(
				matchIfName(c.ClientPort),
				matchTCP(),
				[]expr.Any{
					&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseTransportHeader, Offset: dport, Len: 2},
					lookup(bset),
				},
				matchPureSYN(),
				f.matchProtocol(),
				f.loadFlowKey(false),
				[]expr.Any{
					&expr.Dynset{SrcRegKey: f.regs[0], SetName: bypass.Name, SetID: bypass.ID, Operation: unix.NFT_DYNSET_OP_ADD},
					accept(),
				},
			))
		}
	}
	for _, f := range ipFamilies {
		bypass := set(nftables.TableFamilyBridge, f.set)
		bridgeRules = append(bridgeRules,
			concat(
				matchIfName(c.ClientPort),
				f.matchProtocol(),
				matchTCP(),
				f.loadFlowKey(false),
				[]expr.Any{&expr.Lookup{SourceRegister: f.regs[0], SetName: bypass.Name, SetID: bypass.ID}},
				f.loadFlowKey(false),
				[]expr.Any{
					&expr.Dynset{SrcRegKey: f.regs[0], SetName: bypass.Name, SetID: bypass.ID, Operation: unix.NFT_DYNSET_OP_UPDATE},
					accept(),
				},
			),
			concat(
				matchIfName(c.ServerPort),
				f.matchProtocol(),
				matchTCP(),
				f.loadFlowKey(true),
				[]expr.Any{&expr.Lookup{SourceRegister: f.regs[0], SetName: bypass.Name, SetID: bypass.ID}, accept()},
			),
		)
	}
	bridgeRules = append(bridgeRules, redirect(c.ClientPort, dport), redirect(c.ServerPort, sport))

	// Inet: order matters (docs/kernel.md#l3-diversion): traffic to the box itself first,
	// then pure SYNs to TPROXY, and only then the socket rule, which would
	// otherwise send a reused client port's SYN to a TIME_WAIT socket.
	syn := concat(
		matchIfName(c.Bridge),
		matchTCP(),
		[]expr.Any{
			&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseTransportHeader, Offset: dport, Len: 2},
			lookup(iset),
		},
		matchPureSYN(),
	)
	switch {
	case p.draining:
		syn = append(syn, accept())
	case p.overload == OverloadRefuse:
		syn = append(syn, &expr.Reject{Type: unix.NFT_REJECT_TCP_RST, Code: 0})
	default:
		syn = append(syn,
			&expr.Immediate{Register: 1, Data: binaryutil.BigEndian.PutUint16(c.ProxyTCPPort)},
			// Port only, any address family: the inet form of `tproxy to :PORT`.
			&expr.TProxy{Family: byte(nftables.TableFamilyUnspecified), TableFamily: byte(nftables.TableFamilyINet), RegPort: 1},
		)
		syn = append(syn, setMark(c.Mark)...)
		syn = append(syn, accept())
	}
	established := concat(
		matchTCP(),
		[]expr.Any{
			&expr.Socket{Key: expr.SocketKeyTransparent, Register: 1},
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{1}},
		},
		setMark(c.Mark),
		[]expr.Any{accept()},
	)
	// Refuse direct connections to the proxy port: diverted SYNs keep their
	// original destination port, so they never match.
	refuse := concat(
		matchTCP(),
		[]expr.Any{
			&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseTransportHeader, Offset: dport, Len: 2},
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: binaryutil.BigEndian.PutUint16(c.ProxyTCPPort)},
		},
		matchLocalDaddr(),
		[]expr.Any{&expr.Reject{Type: unix.NFT_REJECT_TCP_RST, Code: 0}},
	)

	return []tableDef{
		{family: nftables.TableFamilyBridge, chains: []chainDef{{
			name: chainPrerouting, hook: nftables.ChainHookPrerouting, prio: prioBridgeDstNAT,
			rules: bridgeRules,
		}}},
		{family: nftables.TableFamilyINet, chains: []chainDef{
			{
				name: chainPrerouting, hook: nftables.ChainHookPrerouting, prio: prioMangle,
				rules: [][]expr.Any{append(matchLocalDaddr(), accept()), syn, established},
			},
			{
				name: chainInput, hook: nftables.ChainHookInput, prio: prioFilter,
				rules: [][]expr.Any{refuse},
			},
		}},
	}
}

// setElements are ports as set keys (network byte order).
func setElements(ports []uint16) []nftables.SetElement {
	els := make([]nftables.SetElement, 0, len(ports))
	for _, port := range ports {
		els = append(els, nftables.SetElement{Key: binaryutil.BigEndian.PutUint16(port)})
	}
	return els
}

func concat(parts ...[]expr.Any) []expr.Any {
	var out []expr.Any
	for _, p := range parts {
		out = append(out, p...)
	}
	return out
}

// matchIfName compares the input interface name the way nft does: the whole
// IFNAMSIZ buffer, zero padded, so "br0" does not match "br01".
func matchIfName(name string) []expr.Any {
	buf := make([]byte, unix.IFNAMSIZ)
	copy(buf, name)
	return []expr.Any{
		&expr.Meta{Key: expr.MetaKeyIIFNAME, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: buf},
	}
}

func matchTCP() []expr.Any {
	return []expr.Any{
		&expr.Meta{Key: expr.MetaKeyL4PROTO, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{unix.IPPROTO_TCP}},
	}
}

// matchLocalDaddr is `fib daddr type local`; the result is a host-order u32.
func matchLocalDaddr() []expr.Any {
	local := make([]byte, 4)
	binary.NativeEndian.PutUint32(local, unix.RTN_LOCAL)
	return []expr.Any{
		&expr.Fib{Register: 1, FlagDADDR: true, ResultADDRTYPE: true},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: local},
	}
}

// setMark is `meta mark set MARK`; the mark is a host-order u32.
func setMark(mark uint32) []expr.Any {
	m := make([]byte, 4)
	binary.NativeEndian.PutUint32(m, mark)
	return []expr.Any{
		&expr.Immediate{Register: 1, Data: m},
		&expr.Meta{Key: expr.MetaKeyMARK, SourceRegister: true, Register: 1},
	}
}

// matchPureSYN is `tcp flags syn / fin,syn,rst,ack`: flags & (fin|syn|rst|ack) == syn.
func matchPureSYN() []expr.Any {
	return []expr.Any{
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseTransportHeader, Offset: 13, Len: 1},
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 1, Mask: []byte{0x17}, Xor: []byte{0}},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{0x02}},
	}
}

// matchProtocol is the `meta protocol ip` (ip6) nft puts before the first
// load from an IPv4 (IPv6) header in the bridge family.
func (f ipFamily) matchProtocol() []expr.Any {
	return []expr.Any{
		&expr.Meta{Key: expr.MetaKeyPROTOCOL, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: binaryutil.BigEndian.PutUint16(f.ethType)},
	}
}

// loadFlowKey loads the bypass key saddr . daddr . sport . dport of a
// client frame into f.regs, or (reverse) the same key from a server frame:
// daddr . saddr . dport . sport.
func (f ipFamily) loadFlowKey(reverse bool) []expr.Any {
	src, dst, sport, dport := f.saddr, f.daddr, uint32(0), uint32(2)
	if reverse {
		src, dst, sport, dport = dst, src, dport, sport
	}
	return []expr.Any{
		&expr.Payload{DestRegister: f.regs[0], Base: expr.PayloadBaseNetworkHeader, Offset: src, Len: f.addrLen},
		&expr.Payload{DestRegister: f.regs[1], Base: expr.PayloadBaseNetworkHeader, Offset: dst, Len: f.addrLen},
		&expr.Payload{DestRegister: f.regs[2], Base: expr.PayloadBaseTransportHeader, Offset: sport, Len: 2},
		&expr.Payload{DestRegister: f.regs[3], Base: expr.PayloadBaseTransportHeader, Offset: dport, Len: 2},
	}
}

func lookup(set *nftables.Set) *expr.Lookup {
	return &expr.Lookup{SourceRegister: 1, SetName: set.Name, SetID: set.ID}
}

func accept() *expr.Verdict { return &expr.Verdict{Kind: expr.VerdictAccept} }
