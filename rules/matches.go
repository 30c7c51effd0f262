package rules

import (
	"encoding/binary"
	"fmt"
	"net"
	"slices"
	"strings"

	"github.com/google/nftables"
	"github.com/google/nftables/binaryutil"
	"github.com/google/nftables/expr"
	"golang.org/x/sys/unix"
)

// The matches of the ruleset's rules. Each compiles to what nft generates
// for its text (same registers, byte order and dependency checks), so Check
// sees no drift on tables loaded by `nft -f` either (see emitter).

// iifname matches the input interface the way nft does: the whole
// IFNAMSIZ buffer, zero padded, so "br0" does not match "br01".
type iifname string

func (m iifname) String() string { return fmt.Sprintf("iifname %q", string(m)) }

func (m iifname) emit(e *emitter) { emitIfName(e, expr.MetaKeyIIFNAME, string(m)) }

// oifname is iifname's output twin. In the bridge family's output hook it
// is the bridge port a frame the box sends leaves by.
type oifname string

func (m oifname) String() string { return fmt.Sprintf("oifname %q", string(m)) }

func (m oifname) emit(e *emitter) { emitIfName(e, expr.MetaKeyOIFNAME, string(m)) }

func emitIfName(e *emitter, key expr.MetaKey, name string) {
	buf := make([]byte, unix.IFNAMSIZ)
	copy(buf, name)
	e.add(
		&expr.Meta{Key: key, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: buf},
	)
}

// l4proto is a transport protocol as nft names it and as the IP header
// numbers it; eth is the network protocol it implies (ICMPv6: IPv6), 0
// for one of either.
type l4proto struct {
	name string
	num  byte
	eth  uint16
}

var (
	l4TCP    = l4proto{"tcp", unix.IPPROTO_TCP, 0}
	l4UDP    = l4proto{"udp", unix.IPPROTO_UDP, 0}
	l4ICMPv6 = l4proto{"ipv6-icmp", unix.IPPROTO_ICMPV6, unix.ETH_P_IPV6}
	l4IGMP   = l4proto{"igmp", unix.IPPROTO_IGMP, unix.ETH_P_IP}
)

// l4protoIs is `meta l4proto tcp` (udp) where nft shows it: in a rule that
// loads nothing from the transport header (which would imply it).
type l4protoIs l4proto

func (m l4protoIs) String() string { return "meta l4proto " + m.name }

func (m l4protoIs) emit(e *emitter) {
	e.add(
		&expr.Meta{Key: expr.MetaKeyL4PROTO, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{m.num}},
	)
	e.l4 = m.num
}

// needL4 adds the `meta l4proto` a load from p's header depends on,
// after the network protocol check p implies (ICMPv6: IPv6), as nft
// does. A rule loads from one transport protocol's header only.
func (e *emitter) needL4(p l4proto) {
	if p.eth != 0 {
		e.needEth(p.eth)
	}
	if e.l4 != p.num {
		l4protoIs(p).emit(e)
	}
}

// needIP adds the check an IPv4 (IPv6) header load depends on in the
// bridge and netdev families, the ones whose rules load IP header fields
// (an inet rule would need `meta nfproto` instead): see needEth.
func (e *emitter) needIP(f ipFamily) { e.needEth(f.ethType) }

// Where the Ethernet header holds what a netdev rule checks.
const (
	etherTypeOffset = 12 // the Ethernet type, 2 bytes, after both addresses
)

// needEth adds the check a network header load depends on: that the
// frame's protocol is t (an ethertype: IPv4, IPv6, ARP). nft checks `meta
// protocol`, except in the netdev family once the link layer is known to
// be Ethernet (needEther): then it loads the Ethernet type field, and
// merges that load and compare with an Ethernet header match right
// before it (`ether saddr MAC` then a network header field: one 8-byte
// load from offset 6), as its payload merge does. So does needEth: nft
// lists both forms alike and `nft -f` builds the same bytecode.
func (e *emitter) needEth(t uint16) {
	if e.ethType == t {
		return
	}
	e.ethType = t
	want := binaryutil.BigEndian.PutUint16(t)
	if !e.ether {
		e.add(
			&expr.Meta{Key: expr.MetaKeyPROTOCOL, Register: 1},
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: want},
		)
		return
	}
	if n := len(e.exprs); n >= 2 {
		p, okP := e.exprs[n-2].(*expr.Payload)
		c, okC := e.exprs[n-1].(*expr.Cmp)
		if okP && okC && p.OperationType == expr.PayloadLoad && p.Base == expr.PayloadBaseLLHeader &&
			p.Offset+p.Len == etherTypeOffset && c.Op == expr.CmpOpEq && c.Register == p.DestRegister && len(c.Data) == int(p.Len) {
			p.Len += 2
			c.Data = append(slices.Clone(c.Data), want...)
			return
		}
	}
	e.add(
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseLLHeader, Offset: etherTypeOffset, Len: 2},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: want},
	)
}

// needEther adds, in the netdev family, the `meta iiftype ether` an
// Ethernet header load or write depends on (a netdev chain may hook a
// device of another link type). The bridge family's frames are Ethernet.
// Measured on 6.18: the check holds in the egress hook too.
func (e *emitter) needEther() {
	if e.family != nftables.TableFamilyNetdev || e.ether {
		return
	}
	ether := make([]byte, 2) // iface_type: a host-order u16
	binary.NativeEndian.PutUint16(ether, unix.ARPHRD_ETHER)
	e.add(
		&expr.Meta{Key: expr.MetaKeyIIFTYPE, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: ether},
	)
	e.ether = true
}

// portField is a port field of the TCP or UDP header (both start with the
// source port, then the destination port): its protocol, name and offset.
type portField struct {
	l4     l4proto
	dir    string
	offset uint32
}

var (
	tcpSport = portField{l4TCP, "sport", 0}
	tcpDport = portField{l4TCP, "dport", 2}
	udpSport = portField{l4UDP, "sport", 0}
	udpDport = portField{l4UDP, "dport", 2}
)

func (f portField) String() string { return f.l4.name + " " + f.dir }

// load puts the port into register reg.
func (f portField) load(e *emitter, reg uint32) {
	e.needL4(f.l4)
	e.add(&expr.Payload{DestRegister: reg, Base: expr.PayloadBaseTransportHeader, Offset: f.offset, Len: 2})
}

// portIs is `tcp dport PORT` (sport, udp).
type portIs struct {
	field portField
	port  uint16
}

func (m portIs) String() string { return fmt.Sprintf("%s %d", m.field, m.port) }

func (m portIs) emit(e *emitter) {
	m.field.load(e, 1)
	e.add(&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: binaryutil.BigEndian.PutUint16(m.port)})
}

// portIn is `tcp dport @SET` (sport, udp): the port is in a ports set.
type portIn struct {
	field portField
	set   string
}

func (m portIn) String() string { return fmt.Sprintf("%s @%s", m.field, m.set) }

func (m portIn) emit(e *emitter) {
	m.field.load(e, 1)
	s := e.set(m.set)
	e.add(&expr.Lookup{SourceRegister: 1, SetName: s.Name, SetID: s.ID})
}

// pureSYN is a SYN without ACK, FIN or RST, a new connection:
// flags & (fin|syn|rst|ack) == syn.
type pureSYN struct{}

func (pureSYN) String() string { return "tcp flags syn / fin,syn,rst,ack" }

func (pureSYN) emit(e *emitter) {
	e.needL4(l4TCP)
	e.add(
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseTransportHeader, Offset: 13, Len: 1},
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 1, Mask: []byte{0x17}, Xor: []byte{0}},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{0x02}},
	)
}

// flowSets are a pair of flow sets, one per IP family, keyed by the
// flows of one transport protocol as the client sends them: saddr . daddr
// . sport . dport. bypass4/bypass6 hold TCP connections an overload let
// through, udpflows4/udpflows6 the UDP flows the proxy relays.
type flowSets struct {
	prefix string // the set's name without the family's 4 or 6
	l4     l4proto
}

var (
	bypassSets  = flowSets{"bypass", l4TCP}
	udpFlowSets = flowSets{"udpflows", l4UDP}
)

// name is the set of family f.
func (s flowSets) name(f ipFamily) string { return s.prefix + f.suffix }

// flowIn is `ip saddr . ip daddr . tcp sport . tcp dport @bypass4` (ip6,
// bypass6; udp, udpflows4/6): the frame's flow is in its family's set. A
// server frame (reverse) is looked up as the flow its client sends. With
// neg it is `... != @SET`: the flow is not in the set.
type flowIn struct {
	sets    flowSets
	fam     ipFamily
	reverse bool
	neg     bool
}

func (m flowIn) String() string {
	op := ""
	if m.neg {
		op = "!= "
	}
	return fmt.Sprintf("%s %s@%s", m.fam.flowKey(m.sets.l4, m.reverse), op, m.sets.name(m.fam))
}

func (m flowIn) emit(e *emitter) {
	m.fam.loadFlowKey(e, m.sets.l4, m.reverse)
	s := e.set(m.sets.name(m.fam))
	e.add(&expr.Lookup{SourceRegister: m.fam.regs[0], SetName: s.Name, SetID: s.ID, Invert: m.neg})
}

// flowKey is the flow sets' key as nft prints it: the flow as the client
// sends it, read from a client frame, or (reverse) from a server frame.
func (f ipFamily) flowKey(p l4proto, reverse bool) string {
	if reverse {
		return fmt.Sprintf("%[1]s daddr . %[1]s saddr . %[2]s dport . %[2]s sport", f.nft, p.name)
	}
	return fmt.Sprintf("%[1]s saddr . %[1]s daddr . %[2]s sport . %[2]s dport", f.nft, p.name)
}

// loadFlowKey loads the flow key saddr . daddr . sport . dport of a client
// frame into f.regs, or (reverse) the same key from a server frame:
// daddr . saddr . dport . sport. The registers are the ones nft picks for
// the concatenation.
func (f ipFamily) loadFlowKey(e *emitter, p l4proto, reverse bool) {
	src, dst := f.saddr, f.daddr
	sport, dport := portField{p, "sport", 0}, portField{p, "dport", 2}
	if reverse {
		src, dst, sport, dport = dst, src, dport, sport
	}
	e.needIP(f)
	e.needL4(p)
	e.add(
		&expr.Payload{DestRegister: f.regs[0], Base: expr.PayloadBaseNetworkHeader, Offset: src, Len: f.addrLen},
		&expr.Payload{DestRegister: f.regs[1], Base: expr.PayloadBaseNetworkHeader, Offset: dst, Len: f.addrLen},
	)
	sport.load(e, f.regs[2])
	dport.load(e, f.regs[3])
}

// fragment is `ip frag-off & 16383 != 0` (an IPv4 fragment: more
// fragments follow or the offset is not zero; nft lists the 0x3fff mask
// in decimal) or `ip6 nexthdr ipv6-frag` (an IPv6 packet whose first
// extension header is a fragment header). Only a datagram's first
// fragment carries its transport header, so no port match sees the others.
type fragment struct{ fam ipFamily }

// Where an IP header says a packet is a fragment.
const (
	ipFragOffset  = 6      // IPv4 flags and fragment offset, 2 bytes
	ipFragMask    = 0x3fff // MF and the 13-bit offset (not DF, not the reserved bit)
	ip6NextHeader = 6      // IPv6 next header, 1 byte
)

func (m fragment) String() string {
	if m.fam.ethType == unix.ETH_P_IPV6 {
		return "ip6 nexthdr ipv6-frag"
	}
	return fmt.Sprintf("ip frag-off & %d != 0", ipFragMask)
}

func (m fragment) emit(e *emitter) {
	e.needIP(m.fam)
	if m.fam.ethType == unix.ETH_P_IPV6 {
		e.add(
			&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: ip6NextHeader, Len: 1},
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{unix.IPPROTO_FRAGMENT}},
		)
		return
	}
	e.add(
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: ipFragOffset, Len: 2},
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 2, Mask: binaryutil.BigEndian.PutUint16(ipFragMask), Xor: []byte{0, 0}},
		&expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: []byte{0, 0}},
	)
}

// fibLocal is `fib daddr type local`: the destination is one of the box's
// own addresses. The result is a host-order u32.
type fibLocal struct{}

func (fibLocal) String() string { return "fib daddr type local" }

func (fibLocal) emit(e *emitter) {
	local := make([]byte, 4)
	binary.NativeEndian.PutUint32(local, unix.RTN_LOCAL)
	e.add(
		&expr.Fib{Register: 1, FlagDADDR: true, ResultADDRTYPE: true},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: local},
	)
}

// socketTransparent is `socket transparent 1`: the packet belongs to a
// transparent (proxied) socket.
type socketTransparent struct{}

func (socketTransparent) String() string { return "socket transparent 1" }

func (socketTransparent) emit(e *emitter) {
	e.add(
		&expr.Socket{Key: expr.SocketKeyTransparent, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{1}},
	)
}

// hdrField is a header field a rule loads whole: an address of the IP or
// ARP header, or of the Ethernet header.
type hdrField struct {
	name   string // as nft prints it: "ip saddr", "arp saddr ether"
	base   expr.PayloadBase
	offset uint32
	len    uint32
	eth    uint16 // the ethertype a network header field depends on
}

var (
	etherSaddr    = hdrField{"ether saddr", expr.PayloadBaseLLHeader, 6, 6, 0}
	etherDaddr    = hdrField{"ether daddr", expr.PayloadBaseLLHeader, 0, 6, 0}
	arpSaddrIP    = hdrField{"arp saddr ip", expr.PayloadBaseNetworkHeader, 14, 4, unix.ETH_P_ARP}
	arpSaddrEther = hdrField{"arp saddr ether", expr.PayloadBaseNetworkHeader, 8, 6, unix.ETH_P_ARP}
)

// addr is the family's source (or destination) address field.
func (f ipFamily) addr(daddr bool) hdrField {
	if daddr {
		return hdrField{f.nft + " daddr", expr.PayloadBaseNetworkHeader, f.daddr, f.addrLen, f.ethType}
	}
	return hdrField{f.nft + " saddr", expr.PayloadBaseNetworkHeader, f.saddr, f.addrLen, f.ethType}
}

// need adds the check the field's load depends on.
func (f hdrField) need(e *emitter) {
	if f.base == expr.PayloadBaseLLHeader {
		e.needEther()
		return
	}
	e.needEth(f.eth)
}

// load loads the field into register reg (its check must be in already).
func (f hdrField) load(e *emitter, reg uint32) {
	e.add(&expr.Payload{DestRegister: reg, Base: f.base, Offset: f.offset, Len: f.len})
}

// etherSaddrIs is `ether saddr MAC`: the frame comes from MAC.
type etherSaddrIs net.HardwareAddr

func (m etherSaddrIs) String() string { return "ether saddr " + net.HardwareAddr(m).String() }

func (m etherSaddrIs) emit(e *emitter) {
	etherSaddr.need(e)
	etherSaddr.load(e, 1)
	e.add(&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: slices.Clone([]byte(m))})
}

// ethTypeNames are the ethertypes as nft names them.
var ethTypeNames = map[uint16]string{unix.ETH_P_IP: "ip", unix.ETH_P_IPV6: "ip6", unix.ETH_P_ARP: "arp"}

// metaProtocolIs is `meta protocol arp` (ip, ip6) where nft shows it: in
// a rule that loads nothing from the network header (which would imply it).
type metaProtocolIs uint16

func (m metaProtocolIs) String() string { return "meta protocol " + ethTypeNames[uint16(m)] }

func (m metaProtocolIs) emit(e *emitter) {
	e.add(
		&expr.Meta{Key: expr.MetaKeyPROTOCOL, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: binaryutil.BigEndian.PutUint16(uint16(m))},
	)
	e.ethType = uint16(m)
}

// ipProtocolIs is `ip protocol igmp`: the IPv4 header's protocol field,
// for a protocol whose header the rule does not load.
type ipProtocolIs l4proto

// ipProtocolOffset is the IPv4 header's protocol field, 1 byte.
const ipProtocolOffset = 9

func (m ipProtocolIs) String() string { return "ip protocol " + m.name }

func (m ipProtocolIs) emit(e *emitter) {
	e.needEth(unix.ETH_P_IP)
	e.add(
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: ipProtocolOffset, Len: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{m.num}},
	)
}

// addrNonZero is `arp saddr ip != 0.0.0.0` or `ip6 saddr != ::`: the
// sender has an address (not an ARP probe's or a DAD solicitation's).
type addrNonZero hdrField

func (m addrNonZero) String() string {
	zero := "0.0.0.0"
	if m.len == net.IPv6len {
		zero = "::"
	}
	return m.name + " != " + zero
}

func (m addrNonZero) emit(e *emitter) {
	f := hdrField(m)
	f.need(e)
	f.load(e, 1)
	e.add(&expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: make([]byte, f.len)})
}

// named is a protocol constant as nft names it (an ICMPv6 type, an ARP
// operation).
type named struct {
	name string
	num  uint16
}

// ICMPv6 types and ARP operations the rules match.
var (
	icmp6NDP = []named{{"nd-router-solicit", 133}, {"nd-router-advert", 134}, {"nd-neighbor-solicit", 135}, {"nd-neighbor-advert", 136}}
	icmp6MLD = []named{{"mld-listener-query", 130}, {"mld-listener-report", 131}, {"mld-listener-done", 132}, {"mld2-listener-report", 143}}
	icmp6NA  = []named{{"nd-neighbor-solicit", 135}, {"nd-neighbor-advert", 136}}
	arpOps   = []named{{"request", 1}, {"reply", 2}}
)

// listNames prints set elements as nft lists an anonymous set: in order
// of value (which the rules' lists are in).
func listNames(ns []named) string {
	names := make([]string, len(ns))
	for i, n := range ns {
		names[i] = n.name
	}
	return "{ " + strings.Join(names, ", ") + " }"
}

// icmp6TypeIn is `icmpv6 type { ... }`: an anonymous set of the rule.
type icmp6TypeIn []named

func (m icmp6TypeIn) String() string { return "icmpv6 type " + listNames(m) }

func (m icmp6TypeIn) emit(e *emitter) {
	e.needL4(l4ICMPv6)
	els := make([]nftables.SetElement, len(m))
	for i, t := range m {
		els[i] = nftables.SetElement{Key: []byte{byte(t.num)}}
	}
	s := e.anon(nftables.TypeICMP6Type, els)
	e.add(
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseTransportHeader, Offset: 0, Len: 1},
		&expr.Lookup{SourceRegister: 1, SetName: s.Name, SetID: s.ID},
	)
}

// arpOpIn is `arp operation { request, reply }`: an anonymous set of the
// rule, the operation big-endian.
type arpOpIn []named

// arpOpOffset is the ARP header's operation field, 2 bytes.
const arpOpOffset = 6

func (m arpOpIn) String() string { return "arp operation " + listNames(m) }

func (m arpOpIn) emit(e *emitter) {
	e.needEth(unix.ETH_P_ARP)
	els := make([]nftables.SetElement, len(m))
	for i, op := range m {
		els[i] = nftables.SetElement{Key: binaryutil.BigEndian.PutUint16(op.num)}
	}
	s := e.anon(nftables.TypeARPOp, els)
	e.add(
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: arpOpOffset, Len: 2},
		&expr.Lookup{SourceRegister: 1, SetName: s.Name, SetID: s.ID},
	)
}

// markIs is `meta mark & MASK == VALUE`; the mark is a host-order u32.
type markIs struct{ mask, value uint32 }

func (m markIs) String() string { return fmt.Sprintf("meta mark & 0x%08x == 0x%08x", m.mask, m.value) }

func (m markIs) emit(e *emitter) {
	e.add(
		&expr.Meta{Key: expr.MetaKeyMARK, Register: 1},
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4, Mask: hostU32(m.mask), Xor: hostU32(0)},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: hostU32(m.value)},
	)
}

// hostU32 is v in host byte order, as nft holds a mark.
func hostU32(v uint32) []byte {
	b := make([]byte, 4)
	binary.NativeEndian.PutUint32(b, v)
	return b
}
