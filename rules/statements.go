package rules

import (
	"encoding/binary"
	"fmt"
	"net"
	"slices"

	"github.com/google/nftables"
	"github.com/google/nftables/binaryutil"
	"github.com/google/nftables/expr"
	"github.com/google/nftables/userdata"
	"golang.org/x/sys/unix"
)

// The statements of the ruleset's rules: what a matching packet gets done
// to it. Like the matches, each compiles to what nft generates for its text.

// flowStore is `add @bypass4 { ip saddr . ip daddr . tcp sport . tcp dport }`
// (update; ip6, bypass6; udp, udpflows4/6): it records a client frame's
// flow in its family's set. Add only inserts a new flow; update also
// restarts the timeout of one already there.
type flowStore struct {
	sets   flowSets
	fam    ipFamily
	update bool
}

func (s flowStore) String() string {
	op := "add"
	if s.update {
		op = "update"
	}
	return fmt.Sprintf("%s @%s { %s }", op, s.sets.name(s.fam), s.fam.flowKey(s.sets.l4, false))
}

func (s flowStore) emit(e *emitter) {
	op := uint32(unix.NFT_DYNSET_OP_ADD)
	if s.update {
		op = unix.NFT_DYNSET_OP_UPDATE
	}
	s.fam.loadFlowKey(e, s.sets.l4, false)
	set := e.set(s.sets.name(s.fam))
	e.add(&expr.Dynset{SrcRegKey: s.fam.regs[0], SetName: set.Name, SetID: set.ID, Operation: op})
}

// etherDaddrSet is `ether daddr set MAC`: the frame goes to MAC (br0's, so
// the bridge passes it up to the box's IP stack).
type etherDaddrSet net.HardwareAddr

func (s etherDaddrSet) String() string { return "ether daddr set " + net.HardwareAddr(s).String() }

// emit copies the address: expressions must not share the plan's memory.
func (s etherDaddrSet) emit(e *emitter) {
	e.add(
		&expr.Immediate{Register: 1, Data: slices.Clone([]byte(s))},
		&expr.Payload{OperationType: expr.PayloadWrite, SourceRegister: 1, Base: expr.PayloadBaseLLHeader, Offset: 0, Len: 6},
	)
}

// pktTypeHost is `meta pkttype set host`: the frame is for this host.
type pktTypeHost struct{}

func (pktTypeHost) String() string { return "meta pkttype set host" }

func (pktTypeHost) emit(e *emitter) {
	e.add(
		&expr.Immediate{Register: 1, Data: []byte{unix.PACKET_HOST}},
		&expr.Meta{Key: expr.MetaKeyPKTTYPE, SourceRegister: true, Register: 1},
	)
}

// tproxyTo is `tproxy to :PORT`: the inet form, port only, any address
// family. The port is big-endian in the register.
type tproxyTo uint16

func (s tproxyTo) String() string { return fmt.Sprintf("tproxy to :%d", uint16(s)) }

func (s tproxyTo) emit(e *emitter) {
	e.add(
		&expr.Immediate{Register: 1, Data: binaryutil.BigEndian.PutUint16(uint16(s))},
		&expr.TProxy{Family: byte(nftables.TableFamilyUnspecified), TableFamily: byte(e.family), RegPort: 1},
	)
}

// markSet is `meta mark set MARK`; the mark is a host-order u32.
type markSet uint32

func (s markSet) String() string { return fmt.Sprintf("meta mark set 0x%08x", uint32(s)) }

func (s markSet) emit(e *emitter) {
	m := make([]byte, 4)
	binary.NativeEndian.PutUint32(m, uint32(s))
	e.add(
		&expr.Immediate{Register: 1, Data: m},
		&expr.Meta{Key: expr.MetaKeyMARK, SourceRegister: true, Register: 1},
	)
}

// markOr is `meta mark set meta mark | BITS`: it sets BITS in the mark and
// keeps the others. nft compiles the or to (mark & ^BITS) ^ BITS.
type markOr uint32

func (s markOr) String() string { return fmt.Sprintf("meta mark set meta mark | 0x%08x", uint32(s)) }

func (s markOr) emit(e *emitter) {
	e.add(
		&expr.Meta{Key: expr.MetaKeyMARK, Register: 1},
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4, Mask: hostU32(^uint32(s)), Xor: hostU32(uint32(s))},
		&expr.Meta{Key: expr.MetaKeyMARK, SourceRegister: true, Register: 1},
	)
}

// nftDynsetOpDelete is NFT_DYNSET_OP_DELETE (linux 5.11), which
// golang.org/x/sys/unix lacks.
const nftDynsetOpDelete = 2

// neighbourStore is `add @lan4 { ip saddr : ether saddr }` (delete; a
// neighbour map, its key an address field, its data a MAC field; see
// invisible.go). Add inserts a new entry only: it neither replaces the MAC
// of one already there nor restarts its timeout, and stops the rule when
// the map is full. Delete of a missing entry goes on. The kernel refuses
// (EINVAL) a delete from a map without the data register, so both carry
// it; the data is in register 2 (an IPv6 key fills register 1).
type neighbourStore struct {
	del bool
	set string
	key hdrField
	mac hdrField
}

func (s neighbourStore) String() string {
	op := "add"
	if s.del {
		op = "delete"
	}
	return fmt.Sprintf("%s @%s { %s : %s }", op, s.set, s.key.name, s.mac.name)
}

func (s neighbourStore) emit(e *emitter) {
	s.key.need(e)
	s.mac.need(e)
	s.key.load(e, unix.NFT_REG_1)
	s.mac.load(e, unix.NFT_REG_2)
	op := uint32(unix.NFT_DYNSET_OP_ADD)
	if s.del {
		op = nftDynsetOpDelete
	}
	set := e.set(s.set)
	e.add(&expr.Dynset{SrcRegKey: unix.NFT_REG_1, SrcRegData: unix.NFT_REG_2, SetName: set.Name, SetID: set.ID, Operation: op})
}

// etherFromMap is `ether daddr set ip daddr map @lan4` (saddr; ip6; a
// neighbour map): the Ethernet address becomes the MAC the map holds for
// the IP address. A miss stops the rule there, leaving what it wrote
// before.
type etherFromMap struct {
	dst hdrField // etherDaddr or etherSaddr
	key hdrField
	set string
}

func (s etherFromMap) String() string {
	return fmt.Sprintf("%s set %s map @%s", s.dst.name, s.key.name, s.set)
}

func (s etherFromMap) emit(e *emitter) {
	s.dst.need(e)
	s.key.need(e)
	s.key.load(e, 1)
	set := e.set(s.set)
	e.add(
		&expr.Lookup{SourceRegister: 1, DestRegister: 1, IsDestRegSet: true, SetName: set.Name, SetID: set.ID},
		&expr.Payload{OperationType: expr.PayloadWrite, SourceRegister: 1, Base: s.dst.base, Offset: s.dst.offset, Len: s.dst.len},
	)
}

// rejectTCPReset is `reject with tcp reset`.
type rejectTCPReset struct{}

func (rejectTCPReset) String() string { return "reject with tcp reset" }

func (rejectTCPReset) emit(e *emitter) {
	e.add(&expr.Reject{Type: unix.NFT_REJECT_TCP_RST, Code: 0})
}

// rejectPortUnreachable is `reject` in the inet family: an ICMP (ICMPv6)
// port unreachable, what a host without the port answers to a datagram.
type rejectPortUnreachable struct{}

func (rejectPortUnreachable) String() string { return "reject" }

func (rejectPortUnreachable) emit(e *emitter) {
	e.add(&expr.Reject{Type: unix.NFT_REJECT_ICMPX_UNREACH, Code: unix.NFT_REJECT_ICMPX_PORT_UNREACH})
}

// accept is the accept verdict.
type accept struct{}

func (accept) String() string { return "accept" }

func (accept) emit(e *emitter) { e.add(&expr.Verdict{Kind: expr.VerdictAccept}) }

// drop is the drop verdict.
type drop struct{}

func (drop) String() string { return "drop" }

func (drop) emit(e *emitter) { e.add(&expr.Verdict{Kind: expr.VerdictDrop}) }

// counter is `counter packets 0 bytes 0`, as nft lists a fresh rule's
// counter: the kernel counts the packets (and their bytes) that reach it,
// i.e. that matched every match before it. Check ignores the counts
// (sameExprs); Counters reads them (counters.go).
type counter struct{}

func (counter) String() string { return "counter packets 0 bytes 0" }

func (counter) emit(e *emitter) { e.add(&expr.Counter{}) }

// comment is `comment "NAME"`, which nft lists last: not an expression but
// the rule's user data (a comment TLV, as nft writes it). It names the
// rule in the metrics (Counters).
type comment string

func (c comment) String() string { return fmt.Sprintf("comment %q", string(c)) }

func (c comment) emit(e *emitter) {
	e.userData = userdata.AppendString(nil, userdata.TypeComment, string(c))
}

// isStatement reports whether it acts on the packet (or is a verdict),
// as opposed to matching it.
func isStatement(it ruleItem) bool {
	switch it.(type) {
	case flowStore, etherDaddrSet, pktTypeHost, tproxyTo, markSet, rejectTCPReset, rejectPortUnreachable, accept,
		markOr, neighbourStore, etherFromMap, drop:
		return true
	}
	return false
}

// mayStop reports whether it is a statement that can end the rule before
// the statements after it: a neighbour map add (the map is full) or a
// rewrite from a map (a miss).
func mayStop(it ruleItem) bool {
	switch it := it.(type) {
	case neighbourStore:
		return !it.del
	case etherFromMap:
		return true
	}
	return false
}

// counted is r with a counter after its matches (before its first
// statement: it counts the packets the rule acts on) and named by a
// comment, the rule's identity in the metrics. Every rule of the plan's
// chains is counted: uniform, and cheap next to the lookups, so each
// rule's share of the traffic can be read, and a rule that matches nothing
// any more (or too much) shows. Names are short, unique per table and the
// same in every plan variant for the rule of the same role.
func counted(name string, r rule) rule {
	i := slices.IndexFunc(r, isStatement)
	if i < 0 {
		i = len(r)
	}
	out := slices.Concat(r[:i:i], rule{counter{}}, r[i:], rule{comment(name)})
	return out
}

// countedLast is r with a counter after its statements, then verdict (if
// any), named by a comment: for the netdev table's rules (invisible.go),
// whose statements may stop them (mayStop: a map lookup that misses, a
// map add that fails). The counter then counts what the rule did (frames
// learned and marked, frames rewritten), not what it tried.
func countedLast(name string, r rule, verdict ...ruleItem) rule {
	return slices.Concat(r[:len(r):len(r)], rule{counter{}}, verdict, rule{comment(name)})
}
