package rules

import (
	"bytes"
	"errors"
	"fmt"
	"net"
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
	{expr.PayloadBaseTransportHeader, "tcp", 0, 2}:  {"tcp sport", nftables.TypeInetService.Name, field},
	{expr.PayloadBaseTransportHeader, "tcp", 2, 2}:  {"tcp dport", nftables.TypeInetService.Name, field},
	{expr.PayloadBaseTransportHeader, "tcp", 13, 1}: {"tcp flags", "", tcpFlags},
	{expr.PayloadBaseTransportHeader, "udp", 0, 2}:  {"udp sport", nftables.TypeInetService.Name, field},
	{expr.PayloadBaseTransportHeader, "udp", 2, 2}:  {"udp dport", nftables.TypeInetService.Name, field},
	{expr.PayloadBaseNetworkHeader, "ip", 6, 2}:     {"ip frag-off", "", fragOff},
	{expr.PayloadBaseNetworkHeader, "ip", 12, 4}:    {"ip saddr", nftables.TypeIPAddr.Name, field},
	{expr.PayloadBaseNetworkHeader, "ip", 16, 4}:    {"ip daddr", nftables.TypeIPAddr.Name, field},
	{expr.PayloadBaseNetworkHeader, "ip6", 6, 1}:    {"ip6 nexthdr", "", nextHdr},
	{expr.PayloadBaseNetworkHeader, "ip6", 8, 16}:   {"ip6 saddr", nftables.TypeIP6Addr.Name, field},
	{expr.PayloadBaseNetworkHeader, "ip6", 24, 16}:  {"ip6 daddr", nftables.TypeIP6Addr.Name, field},
}

// payloadLoad names a header load from the protocol checked before it (a
// load without its check is an error: nft always adds one) and hides that
// check. IP header loads are only emitted in the bridge family, where the
// check is `meta protocol`.
func (d *decompiler) payloadLoad(e *expr.Payload) error {
	if e.SourceRegister != 0 || e.CsumType != 0 || e.CsumOffset != 0 || e.CsumFlags != 0 {
		return errors.New("a load with write or checksum fields")
	}
	hf := headerField{base: e.Base, offset: e.Offset, len: e.Len}
	switch {
	case e.Base == expr.PayloadBaseTransportHeader && d.l4 != "":
		hf.proto = d.l4
	case e.Base == expr.PayloadBaseNetworkHeader && d.eth != "" && d.family == nftables.TableFamilyBridge:
		hf.proto = d.eth
	default:
		return errors.New("a header load without its protocol check before it")
	}
	f, ok := headerFields[hf]
	if !ok {
		return fmt.Errorf("no %s header field at offset %d, length %d", hf.proto, e.Offset, e.Len)
	}
	if dep, ok := d.deps[e.Base]; ok {
		d.hidden[dep] = true
	}
	return d.write(e.DestRegister, value{kind: f.kind, name: f.name, typ: f.typ, len: e.Len})
}

// payloadWrite is the one write this package emits: the Ethernet
// destination, from an immediate.
func (d *decompiler) payloadWrite(e *expr.Payload) error {
	v, err := d.read(e.SourceRegister)
	if err != nil {
		return err
	}
	want := expr.Payload{OperationType: expr.PayloadWrite, SourceRegister: e.SourceRegister, Base: expr.PayloadBaseLLHeader, Offset: 0, Len: 6}
	if *e != want || v.kind != immediate || v.len != 6 {
		return errors.New("not ether daddr set from a 6-byte immediate")
	}
	d.print("ether daddr set " + net.HardwareAddr(v.data).String())
	return nil
}

func (d *decompiler) bitwise(e *expr.Bitwise) error {
	v, err := d.read(e.SourceRegister)
	if err != nil {
		return err
	}
	if v.kind != tcpFlags && v.kind != fragOff || v.mask != nil || e.Len != v.len || len(e.Mask) != int(v.len) ||
		!bytes.Equal(e.Xor, make([]byte, v.len)) {
		return errors.New("not a mask of the tcp flags or the ip fragment offset")
	}
	v.mask = e.Mask
	return d.write(e.DestRegister, v)
}

// setRef finds the set a lookup or dynset refers to, by name and batch ID.
func (d *decompiler) setRef(name string, id uint32) (*nftables.Set, error) {
	s := d.sets[name]
	if s == nil || s.ID != id {
		return nil, fmt.Errorf("refers to set %q ID %d, not one of the table's", name, id)
	}
	return s, nil
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

func (d *decompiler) lookup(e *expr.Lookup) error {
	s, err := d.setRef(e.SetName, e.SetID)
	if err != nil {
		return err
	}
	if e.IsDestRegSet || e.DestRegister != 0 {
		return errors.New("not a plain membership match")
	}
	k, err := d.key(e.SourceRegister, s)
	if err != nil {
		return err
	}
	op := ""
	if e.Invert {
		op = "!= "
	}
	d.print(k + " " + op + "@" + s.Name)
	return nil
}

func (d *decompiler) dynset(e *expr.Dynset) error {
	s, err := d.setRef(e.SetName, e.SetID)
	if err != nil {
		return err
	}
	op, ok := map[uint32]string{unix.NFT_DYNSET_OP_ADD: "add", unix.NFT_DYNSET_OP_UPDATE: "update"}[e.Operation]
	if !ok || e.SrcRegData != 0 || e.Timeout != 0 || e.Invert || len(e.Exprs) > 0 {
		return errors.New("not a plain add or update of a key")
	}
	k, err := d.key(e.SrcRegKey, s)
	if err != nil {
		return err
	}
	d.print(fmt.Sprintf("%s @%s { %s }", op, s.Name, k))
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
