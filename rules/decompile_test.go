package rules

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strings"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	"github.com/google/nftables/userdata"
	"golang.org/x/sys/unix"
)

// decompiler turns a rule's expressions back into the rule's text as nft
// 1.0.6 lists it, without the items' String methods: it tracks what each
// register holds, names header loads from the protocol checks before them
// and hides those checks the way nft does. It knows exactly the expression
// shapes this package emits and fails on anything else, so a wrong
// register, byte order, offset, dependency or set reference shows up as an
// error or as text that differs from the item's.
type decompiler struct {
	family nftables.TableFamily
	sets   setIndex      // the table's sets, numbered as in the batch
	regs   map[int]value // by 32-bit register index
	eth    string        // "ip", "ip6" or "arp" once `meta protocol` (or `ether type`) is checked
	l4     string        // "tcp", "udp" or "icmpv6" once `meta l4proto` is checked
	ether  bool          // `meta iiftype ether` is checked (netdev)
	// deps are the statements (by index in out) a later header load makes
	// implicit; nft does not list them.
	deps   map[expr.PayloadBase]int
	hidden map[int]bool
	out    []string
}

// setIndex is a table's sets as the batch holds them: named ones by name,
// anonymous ones by ID, with their elements.
type setIndex struct {
	byName map[string]*nftables.Set
	anon   map[uint32]*nftables.Set
	elems  map[*nftables.Set][]nftables.SetElement
}

// value is what a register holds.
type value struct {
	kind valueKind
	name string // as nft prints the expression that loaded it
	typ  string // nft datatype of a header field, for set keys
	len  uint32
	data []byte // an immediate's bytes
	mask []byte // the bitwise mask applied to it, if any
}

type valueKind int

const (
	immediate valueKind = iota
	ifName
	l4Proto
	ethProto
	field // a header field: an address or port
	tcpFlags
	fragOff // the IPv4 flags and fragment offset
	nextHdr // the IPv6 next header
	fibType
	socketFlag
	ifType     // meta iiftype
	markVal    // meta mark, masked if mask is set
	markOrVal  // meta mark | data: what meta set mark writes back
	ethTypeVal // the Ethernet type field
	saddrType  // ether saddr and the Ethernet type, one load (nft's payload merge)
	arpOp      // the ARP operation
	ipProto    // the IPv4 protocol field
	icmp6Type  // the ICMPv6 type
	mapValue   // the data a map lookup found
)

// decompile is the text of the rule made of exprs, in a table of family
// fam holding sets.
func decompile(fam nftables.TableFamily, sets setIndex, exprs []expr.Any) (string, error) {
	d := &decompiler{family: fam, sets: sets, regs: map[int]value{}, deps: map[expr.PayloadBase]int{}, hidden: map[int]bool{}}
	for i, e := range exprs {
		if err := d.step(e); err != nil {
			return "", fmt.Errorf("expression %d (%T %+v): %w", i+1, e, e, err)
		}
	}
	var shown []string
	for i, s := range d.out {
		if !d.hidden[i] {
			shown = append(shown, s)
		}
	}
	return strings.Join(shown, " "), nil
}

// decompileRule is the text of rule r: its expressions, then its comment
// (user data) as nft lists it, last.
func decompileRule(fam nftables.TableFamily, sets setIndex, r *nftables.Rule) (string, error) {
	text, err := decompile(fam, sets, r.Exprs)
	if err != nil || r.UserData == nil {
		return text, err
	}
	c, ok := userdata.GetString(r.UserData, userdata.TypeComment)
	if !ok || !bytes.Equal(userdata.AppendString(nil, userdata.TypeComment, c), r.UserData) {
		return "", fmt.Errorf("user data %x is not a comment alone", r.UserData)
	}
	return text + fmt.Sprintf(" comment %q", c), nil
}

func (d *decompiler) step(e expr.Any) error {
	switch e := e.(type) {
	case *expr.Meta:
		return d.meta(e)
	case *expr.Cmp:
		return d.cmp(e)
	case *expr.Payload:
		if e.OperationType == expr.PayloadWrite {
			return d.payloadWrite(e)
		}
		return d.payloadLoad(e)
	case *expr.Bitwise:
		return d.bitwise(e)
	case *expr.Lookup:
		return d.lookup(e)
	case *expr.Dynset:
		return d.dynset(e)
	case *expr.Immediate:
		return d.write(e.Register, value{kind: immediate, len: uint32(len(e.Data)), data: e.Data})
	case *expr.Fib:
		if *e != (expr.Fib{Register: e.Register, FlagDADDR: true, ResultADDRTYPE: true}) {
			return errors.New("not fib daddr type")
		}
		return d.write(e.Register, value{kind: fibType, name: "fib daddr type", len: 4})
	case *expr.Socket:
		if *e != (expr.Socket{Key: expr.SocketKeyTransparent, Register: e.Register}) {
			return errors.New("not socket transparent")
		}
		return d.write(e.Register, value{kind: socketFlag, name: "socket transparent", len: 1})
	case *expr.TProxy:
		return d.tproxy(e)
	case *expr.Reject:
		switch *e {
		case expr.Reject{Type: unix.NFT_REJECT_TCP_RST, Code: 0}:
			d.print("reject with tcp reset")
		case expr.Reject{Type: unix.NFT_REJECT_ICMPX_UNREACH, Code: unix.NFT_REJECT_ICMPX_PORT_UNREACH}:
			d.print("reject") // the inet family's default: icmpx port-unreachable
		default:
			return errors.New("not a tcp reset or an icmpx port unreachable")
		}
	case *expr.Counter:
		// As nft lists it: with its counts.
		d.print(fmt.Sprintf("counter packets %d bytes %d", e.Packets, e.Bytes))
	case *expr.Verdict:
		switch {
		case e.Chain != "":
			return errors.New("a jump")
		case e.Kind == expr.VerdictAccept:
			d.print("accept")
		case e.Kind == expr.VerdictDrop:
			d.print("drop")
		default:
			return errors.New("not accept or drop")
		}
	default:
		return errors.New("an expression this package does not emit")
	}
	return nil
}

func (d *decompiler) print(s string) { d.out = append(d.out, s) }

// reg32 is the index of a data register in 32-bit units: NFT_REG_1..4 are
// the 16-byte registers, NFT_REG32_00..15 the 4-byte ones over them.
func reg32(r uint32) (int, error) {
	switch {
	case r >= unix.NFT_REG_1 && r <= unix.NFT_REG_4:
		return int(r-unix.NFT_REG_1) * 4, nil
	case r >= unix.NFT_REG32_00 && r <= unix.NFT_REG32_15:
		return int(r - unix.NFT_REG32_00), nil
	}
	return 0, fmt.Errorf("register %d is not a data register", r)
}

// words is how many 32-bit registers n bytes take.
func words(n uint32) int { return int(n+3) / 4 }

// write stores v in register r, dropping what it overwrites.
func (d *decompiler) write(r uint32, v value) error {
	i, err := reg32(r)
	if err != nil {
		return err
	}
	if i+words(v.len) > 16 {
		return fmt.Errorf("%d bytes do not fit from register %d", v.len, r)
	}
	for j, old := range d.regs {
		if j < i+words(v.len) && i < j+words(old.len) {
			delete(d.regs, j)
		}
	}
	d.regs[i] = v
	return nil
}

// read is what register r holds from its start.
func (d *decompiler) read(r uint32) (value, error) {
	i, err := reg32(r)
	if err != nil {
		return value{}, err
	}
	v, ok := d.regs[i]
	if !ok {
		return value{}, fmt.Errorf("register %d holds nothing loaded here", r)
	}
	return v, nil
}

func (d *decompiler) meta(e *expr.Meta) error {
	if !e.SourceRegister {
		v, ok := map[expr.MetaKey]value{
			expr.MetaKeyIIFNAME:  {kind: ifName, name: "iifname", len: unix.IFNAMSIZ},
			expr.MetaKeyOIFNAME:  {kind: ifName, name: "oifname", len: unix.IFNAMSIZ},
			expr.MetaKeyL4PROTO:  {kind: l4Proto, name: "meta l4proto", len: 1},
			expr.MetaKeyPROTOCOL: {kind: ethProto, name: "meta protocol", len: 2},
			expr.MetaKeyIIFTYPE:  {kind: ifType, name: "meta iiftype", len: 2},
			expr.MetaKeyMARK:     {kind: markVal, name: "meta mark", len: 4},
		}[e.Key]
		if !ok {
			return errors.New("loads a meta key this package does not match")
		}
		return d.write(e.Register, v)
	}
	v, err := d.read(e.Register)
	if err != nil {
		return fmt.Errorf("meta set from a register holding nothing (%v)", err)
	}
	switch {
	case e.Key == expr.MetaKeyMARK && v.kind == immediate && len(v.data) == 4:
		d.print(fmt.Sprintf("meta mark set 0x%08x", binary.NativeEndian.Uint32(v.data)))
	case e.Key == expr.MetaKeyMARK && v.kind == markOrVal:
		d.print(fmt.Sprintf("meta mark set meta mark | 0x%08x", binary.NativeEndian.Uint32(v.data)))
	case e.Key == expr.MetaKeyPKTTYPE && v.kind == immediate && bytes.Equal(v.data, []byte{unix.PACKET_HOST}):
		d.print("meta pkttype set host")
	default:
		return errors.New("sets a meta key or value this package does not set")
	}
	return nil
}

// cmp prints an equality match of a register against a constant, or one
// of the inequalities this package emits (fragOff, an address that is not
// the zero address). A value given is compared instead of the register's.
func (d *decompiler) cmp(e *expr.Cmp, given ...value) error {
	v, err := d.read(e.Register)
	if len(given) > 0 {
		v, err = given[0], nil
	}
	if err != nil {
		return err
	}
	if uint32(len(e.Data)) != v.len {
		return fmt.Errorf("not a comparison with %d bytes of %s", v.len, v.name)
	}
	if v.kind == fragOff {
		if e.Op != expr.CmpOpNeq || v.mask == nil || !bytes.Equal(e.Data, []byte{0, 0}) {
			return errors.New("not ip frag-off & MASK != 0")
		}
		d.print(fmt.Sprintf("%s & %d != 0", v.name, binary.BigEndian.Uint16(v.mask)))
		return nil
	}
	if e.Op == expr.CmpOpNeq && v.kind == field && (v.typ == nftables.TypeIPAddr.Name || v.typ == nftables.TypeIP6Addr.Name) {
		if !bytes.Equal(e.Data, make([]byte, v.len)) {
			return errors.New("an address compared unequal with another than the zero address")
		}
		zero, _ := netip.AddrFromSlice(e.Data)
		d.print(v.name + " != " + zero.String())
		return nil
	}
	if v.kind == saddrType {
		// nft's merged `ether saddr MAC` and `ether type T` (see needEth).
		if e.Op != expr.CmpOpEq {
			return errors.New("merged ether saddr and type compared unequal")
		}
		d.print("ether saddr " + net.HardwareAddr(e.Data[:6]).String())
		return d.cmp(&expr.Cmp{Op: expr.CmpOpEq, Register: e.Register, Data: e.Data[6:]}, value{kind: ethTypeVal, name: "ether type", len: 2})
	}
	if e.Op != expr.CmpOpEq {
		return fmt.Errorf("not an equality with %s", v.name)
	}
	rhs, err := d.constant(v, e.Data)
	if err != nil {
		return fmt.Errorf("%s: %w", v.name, err)
	}
	d.print(v.name + " " + rhs)
	return nil
}

// constant prints data compared with v, as nft prints it for v's type,
// and notes the protocol checks the rule's header loads depend on.
func (d *decompiler) constant(v value, data []byte) (string, error) {
	switch v.kind {
	case ifName:
		name, pad, _ := bytes.Cut(data, []byte{0})
		if len(name) == 0 || bytes.ContainsFunc(pad, func(r rune) bool { return r != 0 }) {
			return "", errors.New("not a zero-padded interface name")
		}
		return fmt.Sprintf("%q", name), nil
	case l4Proto:
		l4, ok := map[byte]string{unix.IPPROTO_TCP: "tcp", unix.IPPROTO_UDP: "udp", unix.IPPROTO_ICMPV6: "icmpv6"}[data[0]]
		if !ok {
			return "", errors.New("not tcp, udp or icmpv6")
		}
		if l4 == "icmpv6" && d.eth != "ip6" {
			return "", errors.New("icmpv6 without ip6 before it")
		}
		d.l4, d.deps[expr.PayloadBaseTransportHeader] = l4, len(d.out)
		if l4 == "icmpv6" {
			return "ipv6-icmp", nil // nft's name for the protocol
		}
		return l4, nil
	case ethProto, ethTypeVal:
		eth, ok := map[uint16]string{unix.ETH_P_IP: "ip", unix.ETH_P_IPV6: "ip6", unix.ETH_P_ARP: "arp"}[binary.BigEndian.Uint16(data)]
		if !ok {
			return "", errors.New("not ip, ip6 or arp")
		}
		d.eth, d.deps[expr.PayloadBaseNetworkHeader] = eth, len(d.out)
		return eth, nil
	case ifType:
		if binary.NativeEndian.Uint16(data) != unix.ARPHRD_ETHER || d.family != nftables.TableFamilyNetdev {
			return "", errors.New("not ether (a host-order ARPHRD_ETHER), or not in the netdev family")
		}
		d.ether, d.deps[expr.PayloadBaseLLHeader] = true, len(d.out)
		return "ether", nil
	case ipProto:
		if data[0] != unix.IPPROTO_IGMP {
			return "", errors.New("only igmp is matched")
		}
		return "igmp", nil
	case markVal:
		if v.mask == nil {
			return "", errors.New("the mark compared without a mask")
		}
		return fmt.Sprintf("& 0x%08x == 0x%08x", binary.NativeEndian.Uint32(v.mask), binary.NativeEndian.Uint32(data)), nil
	case field:
		switch v.typ {
		case nftables.TypeInetService.Name:
			return fmt.Sprint(binary.BigEndian.Uint16(data)), nil
		case nftables.TypeEtherAddr.Name:
			return net.HardwareAddr(data).String(), nil
		}
		return "", errors.New("only ports and MACs are compared with constants")
	case nextHdr:
		if data[0] != unix.IPPROTO_FRAGMENT {
			return "", errors.New("only the fragment header is matched")
		}
		return "ipv6-frag", nil
	case tcpFlags:
		if v.mask == nil {
			return "", errors.New("flags compared without a mask")
		}
		return tcpFlagNames(data[0]) + " / " + tcpFlagNames(v.mask[0]), nil
	case fibType:
		if binary.NativeEndian.Uint32(data) != unix.RTN_LOCAL {
			return "", errors.New("not local (a host-order RTN_LOCAL)")
		}
		return "local", nil
	case socketFlag:
		return fmt.Sprint(data[0]), nil
	}
	return "", errors.New("not comparable")
}

// tcpFlagNames lists the flags in f as nft does: comma separated, from
// the lowest bit.
func tcpFlagNames(f byte) string {
	var names []string
	for i, name := range []string{"fin", "syn", "rst", "psh", "ack", "urg", "ecn", "cwr"} {
		if f&(1<<i) != 0 {
			names = append(names, name)
		}
	}
	return strings.Join(names, ",")
}
