package rules

import (
	"encoding/binary"
	"fmt"

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

func (m iifname) emit(e *emitter) {
	buf := make([]byte, unix.IFNAMSIZ)
	copy(buf, m)
	e.add(
		&expr.Meta{Key: expr.MetaKeyIIFNAME, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: buf},
	)
}

// l4proto is a transport protocol as nft names it and as the IP header
// numbers it.
type l4proto struct {
	name string
	num  byte
}

var (
	l4TCP = l4proto{"tcp", unix.IPPROTO_TCP}
	l4UDP = l4proto{"udp", unix.IPPROTO_UDP}
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

// needL4 adds the `meta l4proto` a load from p's header depends on. A rule
// loads from one transport protocol's header only.
func (e *emitter) needL4(p l4proto) {
	if e.l4 != p.num {
		l4protoIs(p).emit(e)
	}
}

// needIP adds the `meta protocol ip` (ip6) an IPv4 (IPv6) header load
// depends on in the bridge family, the only one whose rules load IP header
// fields (an inet rule would need `meta nfproto` instead).
func (e *emitter) needIP(f ipFamily) {
	if e.ethType != f.ethType {
		e.add(
			&expr.Meta{Key: expr.MetaKeyPROTOCOL, Register: 1},
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: binaryutil.BigEndian.PutUint16(f.ethType)},
		)
		e.ethType = f.ethType
	}
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
