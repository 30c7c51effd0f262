package rules

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
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
	sets   map[string]*nftables.Set // the table's sets, numbered as in the batch
	regs   map[int]value            // by 32-bit register index
	eth    string                   // "ip" or "ip6" once `meta protocol` is checked
	l4     string                   // "tcp" or "udp" once `meta l4proto` is checked
	// deps are the statements (by index in out) a later header load makes
	// implicit; nft does not list them.
	deps   map[expr.PayloadBase]int
	hidden map[int]bool
	out    []string
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
)

// decompile is the text of the rule made of exprs, in a table of family
// fam holding sets.
func decompile(fam nftables.TableFamily, sets map[string]*nftables.Set, exprs []expr.Any) (string, error) {
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
func decompileRule(fam nftables.TableFamily, sets map[string]*nftables.Set, r *nftables.Rule) (string, error) {
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
		if e.Kind != expr.VerdictAccept || e.Chain != "" {
			return errors.New("not accept")
		}
		d.print("accept")
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
			expr.MetaKeyL4PROTO:  {kind: l4Proto, name: "meta l4proto", len: 1},
			expr.MetaKeyPROTOCOL: {kind: ethProto, name: "meta protocol", len: 2},
		}[e.Key]
		if !ok {
			return errors.New("loads a meta key this package does not match")
		}
		return d.write(e.Register, v)
	}
	v, err := d.read(e.Register)
	if err != nil || v.kind != immediate {
		return fmt.Errorf("meta set from a register without an immediate (%v)", err)
	}
	switch {
	case e.Key == expr.MetaKeyMARK && len(v.data) == 4:
		d.print(fmt.Sprintf("meta mark set 0x%08x", binary.NativeEndian.Uint32(v.data)))
	case e.Key == expr.MetaKeyPKTTYPE && bytes.Equal(v.data, []byte{unix.PACKET_HOST}):
		d.print("meta pkttype set host")
	default:
		return errors.New("sets a meta key or value this package does not set")
	}
	return nil
}

// cmp prints an equality match of a register against a constant, or the
// one inequality this package emits (fragOff).
func (d *decompiler) cmp(e *expr.Cmp) error {
	v, err := d.read(e.Register)
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
		l4, ok := map[byte]string{unix.IPPROTO_TCP: "tcp", unix.IPPROTO_UDP: "udp"}[data[0]]
		if !ok {
			return "", errors.New("not tcp or udp")
		}
		d.l4, d.deps[expr.PayloadBaseTransportHeader] = l4, len(d.out)
		return l4, nil
	case ethProto:
		eth, ok := map[uint16]string{unix.ETH_P_IP: "ip", unix.ETH_P_IPV6: "ip6"}[binary.BigEndian.Uint16(data)]
		if !ok {
			return "", errors.New("not ip or ip6")
		}
		d.eth, d.deps[expr.PayloadBaseNetworkHeader] = eth, len(d.out)
		return eth, nil
	case field:
		if v.typ != nftables.TypeInetService.Name {
			return "", errors.New("only ports are compared with constants")
		}
		return fmt.Sprint(binary.BigEndian.Uint16(data)), nil
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
