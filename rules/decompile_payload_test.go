package rules

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"slices"
	"strings"

	"github.com/google/nftables"
	"github.com/google/nftables/binaryutil"
	"github.com/google/nftables/expr"
	"golang.org/x/sys/unix"
)

// The decompiler's header loads and writes, set references and tproxy.

// headerField is a header field this package loads: its name by header
// and offset, and its nft datatype (or, for a field only compared, its
// kind).
type headerField struct {
	base   expr.PayloadBase
	proto  string // "tcp", "udp", "ip", "ip6"
	offset uint32
	len    uint32
}

var headerFields = map[headerField]struct {
	name, typ string
	kind      valueKind
}{
	{expr.PayloadBaseTransportHeader, "tcp", 0, 2}:    {"tcp sport", nftables.TypeInetService.Name, field},
	{expr.PayloadBaseTransportHeader, "tcp", 2, 2}:    {"tcp dport", nftables.TypeInetService.Name, field},
	{expr.PayloadBaseTransportHeader, "tcp", 13, 1}:   {"tcp flags", "", tcpFlags},
	{expr.PayloadBaseTransportHeader, "udp", 0, 2}:    {"udp sport", nftables.TypeInetService.Name, field},
	{expr.PayloadBaseTransportHeader, "udp", 2, 2}:    {"udp dport", nftables.TypeInetService.Name, field},
	{expr.PayloadBaseNetworkHeader, "ip", 6, 2}:       {"ip frag-off", "", fragOff},
	{expr.PayloadBaseNetworkHeader, "ip", 12, 4}:      {"ip saddr", nftables.TypeIPAddr.Name, field},
	{expr.PayloadBaseNetworkHeader, "ip", 16, 4}:      {"ip daddr", nftables.TypeIPAddr.Name, field},
	{expr.PayloadBaseNetworkHeader, "ip6", 6, 1}:      {"ip6 nexthdr", "", nextHdr},
	{expr.PayloadBaseNetworkHeader, "ip6", 8, 16}:     {"ip6 saddr", nftables.TypeIP6Addr.Name, field},
	{expr.PayloadBaseNetworkHeader, "ip6", 24, 16}:    {"ip6 daddr", nftables.TypeIP6Addr.Name, field},
	{expr.PayloadBaseNetworkHeader, "ip", 9, 1}:       {"ip protocol", "", ipProto},
	{expr.PayloadBaseNetworkHeader, "arp", 6, 2}:      {"arp operation", nftables.TypeARPOp.Name, arpOp},
	{expr.PayloadBaseNetworkHeader, "arp", 8, 6}:      {"arp saddr ether", nftables.TypeEtherAddr.Name, field},
	{expr.PayloadBaseNetworkHeader, "arp", 14, 4}:     {"arp saddr ip", nftables.TypeIPAddr.Name, field},
	{expr.PayloadBaseTransportHeader, "icmpv6", 0, 1}: {"icmpv6 type", nftables.TypeICMP6Type.Name, icmp6Type},
	{expr.PayloadBaseLLHeader, "ether", 0, 6}:         {"ether daddr", nftables.TypeEtherAddr.Name, field},
	{expr.PayloadBaseLLHeader, "ether", 6, 6}:         {"ether saddr", nftables.TypeEtherAddr.Name, field},
	{expr.PayloadBaseLLHeader, "ether", 12, 2}:        {"ether type", "", ethTypeVal},
	// nft's payload merge of `ether saddr MAC` with the `ether type`
	// dependency of a network header match after it (see needEth).
	{expr.PayloadBaseLLHeader, "ether", 6, 8}: {"ether saddr . type", "", saddrType},
}

// payloadLoad names a header load from the protocol checked before it (a
// load without its check is an error: nft always adds one) and hides that
// check. IP and ARP header loads are only emitted in the bridge and netdev
// families, where the check is `meta protocol` (or, in netdev after
// `meta iiftype ether`, `ether type`); Ethernet header loads only in
// netdev, after `meta iiftype ether`. An ICMPv6 header load hides the
// network protocol check too (icmpv6 implies ip6).
func (d *decompiler) payloadLoad(e *expr.Payload) error {
	if e.SourceRegister != 0 || e.CsumType != 0 || e.CsumOffset != 0 || e.CsumFlags != 0 {
		return errors.New("a load with write or checksum fields")
	}
	hf := headerField{base: e.Base, offset: e.Offset, len: e.Len}
	l2 := d.family == nftables.TableFamilyBridge || d.family == nftables.TableFamilyNetdev
	switch {
	case e.Base == expr.PayloadBaseTransportHeader && d.l4 != "":
		hf.proto = d.l4
	case e.Base == expr.PayloadBaseNetworkHeader && d.eth != "" && l2:
		hf.proto = d.eth
	case e.Base == expr.PayloadBaseLLHeader && d.ether:
		hf.proto = "ether"
	default:
		return errors.New("a header load without its protocol check before it")
	}
	f, ok := headerFields[hf]
	if !ok {
		return fmt.Errorf("no %s header field at offset %d, length %d", hf.proto, e.Offset, e.Len)
	}
	d.hideDep(e.Base)
	if hf.proto == "icmpv6" {
		d.hideDep(expr.PayloadBaseNetworkHeader)
	}
	return d.write(e.DestRegister, value{kind: f.kind, name: f.name, typ: f.typ, len: e.Len})
}

// hideDep hides the protocol check a load from base depends on.
func (d *decompiler) hideDep(base expr.PayloadBase) {
	if dep, ok := d.deps[base]; ok {
		d.hidden[dep] = true
	}
}

// payloadWrite is one of the writes this package emits: an Ethernet
// address, from a 6-byte immediate (ether daddr set MAC) or from a map
// lookup (ether daddr set ip daddr map @lan4), after `meta iiftype ether`
// in the netdev family.
func (d *decompiler) payloadWrite(e *expr.Payload) error {
	v, err := d.read(e.SourceRegister)
	if err != nil {
		return err
	}
	name := map[uint32]string{0: "ether daddr", 6: "ether saddr"}[e.Offset]
	want := expr.Payload{OperationType: expr.PayloadWrite, SourceRegister: e.SourceRegister, Base: expr.PayloadBaseLLHeader, Offset: e.Offset, Len: 6}
	if *e != want || name == "" || v.len != 6 || d.family == nftables.TableFamilyNetdev && !d.ether {
		return errors.New("not an Ethernet address written whole (after meta iiftype ether in netdev)")
	}
	d.hideDep(expr.PayloadBaseLLHeader)
	switch {
	case v.kind == immediate && e.Offset == 0:
		d.print(name + " set " + net.HardwareAddr(v.data).String())
	case v.kind == mapValue && v.typ == nftables.TypeEtherAddr.Name:
		d.print(name + " set " + v.name)
	default:
		return errors.New("not ether daddr set from an immediate, or an address set from a map of MACs")
	}
	return nil
}

// bitwise is a mask of the tcp flags or the ip fragment offset, the mark
// masked for a match (meta mark & MASK), or the mark with bits set (meta
// mark | BITS: nft's (mark & ^BITS) ^ BITS).
func (d *decompiler) bitwise(e *expr.Bitwise) error {
	v, err := d.read(e.SourceRegister)
	if err != nil {
		return err
	}
	if v.mask != nil || e.Len != v.len || len(e.Mask) != int(v.len) || len(e.Xor) != int(v.len) {
		return errors.New("not a bitwise of a whole value not masked yet")
	}
	switch {
	case v.kind == markVal && !bytes.Equal(e.Xor, make([]byte, 4)):
		bits := binary.NativeEndian.Uint32(e.Xor)
		if binary.NativeEndian.Uint32(e.Mask) != ^bits {
			return errors.New("the mark xored with other bits than it keeps unmasked: not meta mark | BITS")
		}
		return d.write(e.DestRegister, value{kind: markOrVal, len: 4, data: e.Xor})
	case (v.kind == tcpFlags || v.kind == fragOff || v.kind == markVal) && bytes.Equal(e.Xor, make([]byte, v.len)):
		v.mask = e.Mask
		return d.write(e.DestRegister, v)
	}
	return errors.New("not a mask of the tcp flags, the ip fragment offset or the mark, nor the mark | BITS")
}

// setRef finds the set a lookup or dynset refers to, by name and batch ID
// (an anonymous one by ID alone).
func (d *decompiler) setRef(name string, id uint32) (*nftables.Set, error) {
	s := d.sets.byName[name]
	if isAnonSet(name) {
		s = d.sets.anon[id]
	}
	if s == nil || s.ID != id {
		return nil, fmt.Errorf("refers to set %q ID %d, not one of the table's", name, id)
	}
	return s, nil
}

// anonElements prints an anonymous set's elements as nft lists them for
// the key loaded (by names, in order of value).
func (d *decompiler) anonElements(s *nftables.Set, v value) (string, error) {
	names := map[valueKind]map[uint16]string{
		arpOp: {1: "request", 2: "reply"},
		icmp6Type: {130: "mld-listener-query", 131: "mld-listener-report", 132: "mld-listener-done", 143: "mld2-listener-report",
			133: "nd-router-solicit", 134: "nd-router-advert", 135: "nd-neighbor-solicit", 136: "nd-neighbor-advert"},
	}[v.kind]
	if !s.Anonymous || !s.Constant || s.IsMap || s.KeyType.Name != v.typ || names == nil {
		return "", fmt.Errorf("an anonymous set of type %s looked up with %s", s.KeyType.Name, v.name)
	}
	var nums []uint16
	for _, e := range d.sets.elems[s] {
		if len(e.Key) != int(v.len) {
			return "", fmt.Errorf("element %x is not a %s", e.Key, v.typ)
		}
		n := uint16(e.Key[0])
		if v.len == 2 {
			n = binary.BigEndian.Uint16(e.Key)
		}
		if names[n] == "" {
			return "", fmt.Errorf("element %d has no name as a %s", n, v.typ)
		}
		nums = append(nums, n)
	}
	slices.Sort(nums)
	strs := make([]string, len(nums))
	for i, n := range nums {
		strs[i] = names[n]
	}
	return "{ " + strings.Join(strs, ", ") + " }", nil
}

// key prints the set key loaded from register r on: one field, or the
// concatenation of the set's key type, each part starting on a 32-bit
// register of its own.
func (d *decompiler) key(r uint32, s *nftables.Set) (string, error) {
	types := []nftables.SetDatatype{s.KeyType}
	if strings.Contains(s.KeyType.Name, " . ") {
		types = nftables.ConcatSetTypeElements(s.KeyType)
	}
	i, err := reg32(r)
	if err != nil {
		return "", err
	}
	var parts []string
	for _, t := range types {
		v, ok := d.regs[i]
		if !ok || v.kind != field || v.typ != t.Name || v.len != t.Bytes {
			return "", fmt.Errorf("register %d (32-bit) does not hold the %s of set %s's key", i, t.Name, s.Name)
		}
		parts = append(parts, v.name)
		i += words(v.len)
	}
	return strings.Join(parts, " . "), nil
}

// lookup is a membership match in a named set (`KEY @set`, `KEY != @set`)
// or an anonymous one (`arp operation { request, reply }`), or a map
// lookup whose data goes to a register (`KEY map @map`, for a write).
func (d *decompiler) lookup(e *expr.Lookup) error {
	s, err := d.setRef(e.SetName, e.SetID)
	if err != nil {
		return err
	}
	if s.Anonymous {
		v, err := d.read(e.SourceRegister)
		if err != nil {
			return err
		}
		els, err := d.anonElements(s, v)
		if err != nil || e.Invert || e.IsDestRegSet || e.DestRegister != 0 {
			return fmt.Errorf("not a plain match in an anonymous set (%v)", err)
		}
		d.print(v.name + " " + els)
		return nil
	}
	k, err := d.key(e.SourceRegister, s)
	if err != nil {
		return err
	}
	if e.IsDestRegSet {
		if !s.IsMap || e.Invert || e.DestRegister == 0 {
			return errors.New("a lookup with a destination register in a set, inverted, or to no register")
		}
		return d.write(e.DestRegister, value{kind: mapValue, name: k + " map @" + s.Name, typ: s.DataType.Name, len: s.DataType.Bytes})
	}
	if e.DestRegister != 0 || s.IsMap {
		return errors.New("not a plain membership match")
	}
	op := ""
	if e.Invert {
		op = "!= "
	}
	d.print(k + " " + op + "@" + s.Name)
	return nil
}

// dynset is `add @set { KEY }` (update) of a set, or `add @map { KEY :
// DATA }` (delete: op 2, which golang.org/x/sys/unix lacks) of a map.
func (d *decompiler) dynset(e *expr.Dynset) error {
	s, err := d.setRef(e.SetName, e.SetID)
	if err != nil {
		return err
	}
	op, ok := map[uint32]string{unix.NFT_DYNSET_OP_ADD: "add", unix.NFT_DYNSET_OP_UPDATE: "update", 2: "delete"}[e.Operation]
	if !ok || e.Timeout != 0 || e.Invert || len(e.Exprs) > 0 {
		return errors.New("not a plain add, update or delete")
	}
	k, err := d.key(e.SrcRegKey, s)
	if err != nil {
		return err
	}
	if !s.IsMap {
		if e.SrcRegData != 0 || op == "delete" {
			return errors.New("not a plain add or update of a set's key")
		}
		d.print(fmt.Sprintf("%s @%s { %s }", op, s.Name, k))
		return nil
	}
	// A map's: with its data (the kernel refuses a delete without), never
	// an update (it would keep the MAC).
	if e.SrcRegData == 0 || op == "update" {
		return errors.New("a map's add or delete without data, or an update")
	}
	data, err := d.key(e.SrcRegData, &nftables.Set{Name: s.Name, KeyType: s.DataType})
	if err != nil {
		return fmt.Errorf("data: %w", err)
	}
	d.print(fmt.Sprintf("%s @%s { %s : %s }", op, s.Name, k, data))
	return nil
}

// tproxy prints the inet `tproxy to :PORT`: any address family, the port
// big-endian in an immediate.
func (d *decompiler) tproxy(e *expr.TProxy) error {
	v, err := d.read(e.RegPort)
	if err != nil {
		return err
	}
	want := expr.TProxy{Family: byte(nftables.TableFamilyUnspecified), TableFamily: byte(d.family), RegPort: e.RegPort}
	if *e != want || d.family != nftables.TableFamilyINet || v.kind != immediate || v.len != 2 {
		return errors.New("not the inet tproxy to a port in an immediate")
	}
	d.print(fmt.Sprintf("tproxy to :%d", binaryutil.BigEndian.Uint16(v.data)))
	return nil
}
