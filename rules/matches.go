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

// l4protoTCP is `meta l4proto tcp` where nft shows it: in a rule that
// loads nothing from the TCP header (which would imply it).
type l4protoTCP struct{}

func (l4protoTCP) String() string { return "meta l4proto tcp" }

func (l4protoTCP) emit(e *emitter) {
	e.add(
		&expr.Meta{Key: expr.MetaKeyL4PROTO, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{unix.IPPROTO_TCP}},
	)
	e.tcp = true
}

// needTCP adds the `meta l4proto tcp` a TCP header load depends on.
func (e *emitter) needTCP() {
	if !e.tcp {
		l4protoTCP{}.emit(e)
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

// tcpPort is a port field of the TCP header: its name and offset.
type tcpPort struct {
	dir    string
	offset uint32
}

var (
	tcpSport = tcpPort{"sport", 0}
	tcpDport = tcpPort{"dport", 2}
)

// load puts the port into register 1.
func (f tcpPort) load(e *emitter) {
	e.needTCP()
	e.add(&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseTransportHeader, Offset: f.offset, Len: 2})
}

// tcpPortIs is `tcp dport PORT` (sport).
type tcpPortIs struct {
	field tcpPort
	port  uint16
}

func (m tcpPortIs) String() string { return fmt.Sprintf("tcp %s %d", m.field.dir, m.port) }

func (m tcpPortIs) emit(e *emitter) {
	m.field.load(e)
	e.add(&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: binaryutil.BigEndian.PutUint16(m.port)})
}

// tcpPortIn is `tcp dport @SET` (sport): the port is in a ports set.
type tcpPortIn struct {
	field tcpPort
	set   string
}

func (m tcpPortIn) String() string { return fmt.Sprintf("tcp %s @%s", m.field.dir, m.set) }

func (m tcpPortIn) emit(e *emitter) {
	m.field.load(e)
	s := e.set(m.set)
	e.add(&expr.Lookup{SourceRegister: 1, SetName: s.Name, SetID: s.ID})
}

// pureSYN is a SYN without ACK, FIN or RST, a new connection:
// flags & (fin|syn|rst|ack) == syn.
type pureSYN struct{}

func (pureSYN) String() string { return "tcp flags syn / fin,syn,rst,ack" }

func (pureSYN) emit(e *emitter) {
	e.needTCP()
	e.add(
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseTransportHeader, Offset: 13, Len: 1},
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 1, Mask: []byte{0x17}, Xor: []byte{0}},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{0x02}},
	)
}

// flowIn is `ip saddr . ip daddr . tcp sport . tcp dport @bypass4` (ip6,
// bypass6): the frame's flow is in its family's bypass set. A server
// frame (reverse) is looked up as the flow its client sends.
type flowIn struct {
	fam     ipFamily
	reverse bool
}

func (m flowIn) String() string { return fmt.Sprintf("%s @%s", m.fam.flowKey(m.reverse), m.fam.set) }

func (m flowIn) emit(e *emitter) {
	m.fam.loadFlowKey(e, m.reverse)
	s := e.set(m.fam.set)
	e.add(&expr.Lookup{SourceRegister: m.fam.regs[0], SetName: s.Name, SetID: s.ID})
}

// flowKey is the bypass sets' key as nft prints it: the flow as the client
// sends it, read from a client frame, or (reverse) from a server frame.
func (f ipFamily) flowKey(reverse bool) string {
	if reverse {
		return fmt.Sprintf("%[1]s daddr . %[1]s saddr . tcp dport . tcp sport", f.nft)
	}
	return fmt.Sprintf("%[1]s saddr . %[1]s daddr . tcp sport . tcp dport", f.nft)
}

// loadFlowKey loads the bypass key saddr . daddr . sport . dport of a
// client frame into f.regs, or (reverse) the same key from a server frame:
// daddr . saddr . dport . sport. The registers are the ones nft picks for
// the concatenation.
func (f ipFamily) loadFlowKey(e *emitter, reverse bool) {
	src, dst, sport, dport := f.saddr, f.daddr, tcpSport.offset, tcpDport.offset
	if reverse {
		src, dst, sport, dport = dst, src, dport, sport
	}
	e.needIP(f)
	e.needTCP()
	e.add(
		&expr.Payload{DestRegister: f.regs[0], Base: expr.PayloadBaseNetworkHeader, Offset: src, Len: f.addrLen},
		&expr.Payload{DestRegister: f.regs[1], Base: expr.PayloadBaseNetworkHeader, Offset: dst, Len: f.addrLen},
		&expr.Payload{DestRegister: f.regs[2], Base: expr.PayloadBaseTransportHeader, Offset: sport, Len: 2},
		&expr.Payload{DestRegister: f.regs[3], Base: expr.PayloadBaseTransportHeader, Offset: dport, Len: 2},
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
