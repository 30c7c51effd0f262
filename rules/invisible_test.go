package rules

import (
	"bytes"
	"encoding/binary"
	"net"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	"golang.org/x/sys/unix"
)

// The invisible mode's netdev table and the quiet table without a kernel:
// goldens, the pin of their expressions to their text, validation.

func testQuiet() Quiet {
	return Quiet{Name: "ghostwire", Bridge: "br0", BridgeMAC: net.HardwareAddr{0x02, 0x42, 0xac, 0x11, 0x00, 0x02}}
}

func TestQuietStringGolden(t *testing.T) {
	golden(t, "quiet.nft", testQuiet().String())
}

// TestQuietDecompileToText: the quiet table's queued batch lists as its
// String, rule by rule and whole.
func TestQuietDecompileToText(t *testing.T) {
	q := testQuiet()
	if mismatches, _ := pinTablesMismatches(t, q.TableName(), []table{q.table()}, nil); len(mismatches) > 0 {
		t.Fatalf("expressions and text disagree:\n%s", strings.Join(mismatches, "\n"))
	}
	rec, tbl := recordTable(t, q.TableName(), q.table())
	text, err := rec.listing(tbl)
	if err != nil {
		t.Fatal(err)
	}
	if text != q.String() {
		t.Errorf("the queued batch lists differently from String\n--- batch\n%s--- String\n%s", text, q)
	}
}

// catches runs each mutation over tables and fails unless it applies to a
// rule and the pin then fails.
func catches(t *testing.T, name string, tables []table, mutations map[string]func([]expr.Any) bool) {
	t.Helper()
	for what, mutate := range mutations {
		t.Run(what, func(t *testing.T) {
			mismatches, mutated := pinTablesMismatches(t, name, tables, mutate)
			if mutated == 0 {
				t.Fatal("the mutation applies to no rule")
			}
			if len(mismatches) == 0 {
				t.Fatalf("%d rules mutated, but all still decompile to their text", mutated)
			}
			t.Logf("%d rules mutated, %d mismatches; first:\n%s", mutated, len(mismatches), mismatches[0])
		})
	}
}

// TestDecompileCatchesWrongInvisibleExprs: as TestDecompileCatchesWrongExprs,
// for the netdev table's items (map adds and deletes with data, rewrites
// from maps, the mark or, the dependencies nft adds in netdev) and the
// bridge table's mark match and guard.
func TestDecompileCatchesWrongInvisibleExprs(t *testing.T) {
	p := pinnedPlans(t)["invisible all"]
	catches(t, p.cfg.Name, p.tables, map[string]func([]expr.Any) bool{
		"map delete without data": first(func(d *expr.Dynset) bool { return d.Operation == nftDynsetOpDelete },
			func(d *expr.Dynset) { d.SrcRegData = 0 }),
		"map add without data": first(func(d *expr.Dynset) bool { return d.SrcRegData != 0 && d.Operation == unix.NFT_DYNSET_OP_ADD },
			func(d *expr.Dynset) { d.SrcRegData = 0 }),
		"map delete as update": first(func(d *expr.Dynset) bool { return d.Operation == nftDynsetOpDelete },
			func(d *expr.Dynset) { d.Operation = unix.NFT_DYNSET_OP_UPDATE }),
		"map add as update": first(func(d *expr.Dynset) bool { return d.SrcRegData != 0 && d.Operation == unix.NFT_DYNSET_OP_ADD },
			func(d *expr.Dynset) { d.Operation = unix.NFT_DYNSET_OP_UPDATE }),
		"map data from the key register": first(func(d *expr.Dynset) bool { return d.SrcRegData != 0 },
			func(d *expr.Dynset) { d.SrcRegData = unix.NFT_REG_1 }),
		"learned into the other side's map": first(func(d *expr.Dynset) bool { return d.SetName == "lan4" },
			func(d *expr.Dynset) { d.SetName = "wan4" }),
		"map lookup without a destination register": first(func(l *expr.Lookup) bool { return l.IsDestRegSet },
			func(l *expr.Lookup) { l.IsDestRegSet, l.DestRegister = false, 0 }),
		"rewrite from the other side's map": first(func(l *expr.Lookup) bool { return l.IsDestRegSet && l.SetName == "lan6" },
			func(l *expr.Lookup) { l.SetName = "wan6" }),
		"source MAC written as destination": first(func(e *expr.Payload) bool { return e.OperationType == expr.PayloadWrite && e.Offset == 6 },
			func(e *expr.Payload) { e.Offset = 0 }),
		"no meta iiftype check": first(func(m *expr.Meta) bool { return m.Key == expr.MetaKeyIIFTYPE },
			func(m *expr.Meta) { m.Key = expr.MetaKeyPROTOCOL }),
		"iiftype in network order": first(func(c *expr.Cmp) bool { return bytes.Equal(c.Data, hostU16(unix.ARPHRD_ETHER)) },
			func(c *expr.Cmp) { swap(c.Data) }),
		"ether type loaded from the source MAC": first(func(e *expr.Payload) bool {
			return e.Base == expr.PayloadBaseLLHeader && e.Offset == etherTypeOffset
		}, func(e *expr.Payload) { e.Offset = 6 }),
		"mark or as a plain set": first(func(b *expr.Bitwise) bool { return b.Len == 4 && !bytes.Equal(b.Xor, make([]byte, 4)) },
			func(b *expr.Bitwise) { b.Mask = hostU32(0) }),
		"another bit learned": first(func(b *expr.Bitwise) bool { return bytes.Equal(b.Xor, hostU32(MarkLearned)) },
			func(b *expr.Bitwise) { b.Xor, b.Mask = hostU32(MarkToClient), hostU32(^MarkToClient) }),
		"mark mask in network order": first(func(b *expr.Bitwise) bool { return b.Len == 4 && bytes.Equal(b.Xor, make([]byte, 4)) },
			func(b *expr.Bitwise) { swap(b.Mask) }),
		"drop as accept": first(func(v *expr.Verdict) bool { return v.Kind == expr.VerdictDrop },
			func(v *expr.Verdict) { v.Kind = expr.VerdictAccept }),
		"oifname as iifname": first(func(m *expr.Meta) bool { return m.Key == expr.MetaKeyOIFNAME },
			func(m *expr.Meta) { m.Key = expr.MetaKeyIIFNAME }),
		"arp sender ip at the target's offset": first(func(e *expr.Payload) bool {
			return e.Base == expr.PayloadBaseNetworkHeader && e.Offset == arpSaddrIP.offset && e.Len == 4
		}, func(e *expr.Payload) { e.Offset = 24 }),
		"arp checked as ip": first(func(c *expr.Cmp) bool { return bytes.Equal(c.Data, []byte{0x08, 0x06}) },
			func(c *expr.Cmp) { c.Data = []byte{0x08, 0x00} }),
		"icmpv6 checked as tcp": first(func(c *expr.Cmp) bool { return bytes.Equal(c.Data, []byte{unix.IPPROTO_ICMPV6}) },
			func(c *expr.Cmp) { c.Data = []byte{unix.IPPROTO_TCP} }),
		"zero address compared equal": first(func(c *expr.Cmp) bool { return c.Op == expr.CmpOpNeq && len(c.Data) == 16 },
			func(c *expr.Cmp) { c.Op = expr.CmpOpEq }),
	})
}

// TestDecompileCatchesWrongQuietExprs: the same for the quiet table, whose
// MAC match nft merges with the Ethernet type an IPv6 or IPv4 match
// depends on.
func TestDecompileCatchesWrongQuietExprs(t *testing.T) {
	q := testQuiet()
	merged := func(c *expr.Cmp) bool { return len(c.Data) == 8 }
	catches(t, q.TableName(), []table{q.table()}, map[string]func([]expr.Any) bool{
		"another MAC": first(func(c *expr.Cmp) bool { return len(c.Data) == 6 }, func(c *expr.Cmp) { c.Data[5]++ }),
		"merged ether type of the other IP version": first(merged, func(c *expr.Cmp) {
			if bytes.Equal(c.Data[6:], []byte{0x86, 0xdd}) {
				c.Data[6], c.Data[7] = 0x08, 0x00
			} else {
				c.Data[6], c.Data[7] = 0x86, 0xdd
			}
		}),
		"merged load of the MAC alone": first(func(e *expr.Payload) bool { return e.Len == 8 }, func(e *expr.Payload) { e.Len = 6 }),
		"meta protocol ip for arp": first(func(c *expr.Cmp) bool { return bytes.Equal(c.Data, []byte{0x08, 0x06}) },
			func(c *expr.Cmp) { c.Data = []byte{0x08, 0x00} }),
		"igmp as udp": first(func(c *expr.Cmp) bool { return bytes.Equal(c.Data, []byte{unix.IPPROTO_IGMP}) },
			func(c *expr.Cmp) { c.Data = []byte{unix.IPPROTO_UDP} }),
	})
}

// TestDecompileCatchesWrongAnonElements: an anonymous set's elements are
// part of the rule's text.
func TestDecompileCatchesWrongAnonElements(t *testing.T) {
	for _, tc := range []struct {
		name   string
		tables []table
		kt     nftables.SetDatatype
		change func([]nftables.SetElement)
	}{
		{"arp operation 3", mustPlan(t, invisibleConfig()).tables, nftables.TypeARPOp, func(els []nftables.SetElement) { els[1].Key = []byte{0, 3} }},
		{"arp operation little-endian", mustPlan(t, invisibleConfig()).tables, nftables.TypeARPOp, func(els []nftables.SetElement) { swap(els[0].Key) }},
		{"an ndp type for an mld one", []table{testQuiet().table()}, nftables.TypeICMP6Type, func(els []nftables.SetElement) {
			if els[0].Key[0] == 130 {
				els[0].Key[0] = 133
			}
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var caught, changed int
			for _, tb := range tc.tables {
				rec, tbl := recordTable(t, "ghostwire", tb)
				for _, s := range rec.sets {
					if !s.Anonymous || s.KeyType.Name != tc.kt.Name {
						continue
					}
					before := slices.Clone(rec.elems[s])
					for i := range rec.elems[s] {
						rec.elems[s][i].Key = slices.Clone(rec.elems[s][i].Key)
					}
					tc.change(rec.elems[s])
					if slices.EqualFunc(before, rec.elems[s], func(a, b nftables.SetElement) bool { return bytes.Equal(a.Key, b.Key) }) {
						continue
					}
					changed++
					text, err := rec.listing(tbl)
					if err != nil || text != tableString(tb, "ghostwire") {
						caught++
					}
				}
			}
			if changed == 0 || caught != changed {
				t.Fatalf("%d anonymous sets changed, %d caught", changed, caught)
			}
		})
	}
}

// tableString is tb rendered as table name.
func tableString(tb table, name string) string {
	var b strings.Builder
	tb.render(&b, name)
	return b.String()
}

func hostU16(v uint16) []byte {
	b := make([]byte, 2)
	binary.NativeEndian.PutUint16(b, v)
	return b
}

// TestInvisibleLiftNeedsLearnedBit: in invisible plans every rule that
// lifts a frame first matches the learned bit; in other plans none does.
func TestInvisibleLiftNeedsLearnedBit(t *testing.T) {
	learned := markIs{MarkLearned, MarkLearned}
	for name, p := range pinnedPlans(t) {
		for _, ch := range p.tables[0].chains {
			for i, r := range ch.rules {
				lift := slices.ContainsFunc(r, func(it ruleItem) bool { _, ok := it.(etherDaddrSet); return ok })
				m := slices.Index(r, ruleItem(learned))
				switch {
				case !lift && m >= 0:
					t.Errorf("%s: %s rule %d matches the learned bit but lifts nothing: %s", name, ch.name, i+1, r)
				case lift && p.cfg.Invisible && (m < 0 || slices.ContainsFunc(r[:m], isStatement)):
					t.Errorf("%s: %s rule %d lifts without matching the learned bit first: %s", name, ch.name, i+1, r)
				case lift && !p.cfg.Invisible && m >= 0:
					t.Errorf("%s: %s rule %d of a visible plan matches the learned bit: %s", name, ch.name, i+1, r)
				}
			}
		}
	}
}

// TestInvisibleConfig: the mark may not overlap the mode's bits (only in
// invisible plans), NeighbourTimeout is checked like the other timeouts
// and defaults to 60s, and the tables come and go with the mode.
func TestInvisibleConfig(t *testing.T) {
	for _, tc := range []struct {
		name   string
		modify func(*Config)
		want   string
	}{
		{"mark overlaps learned", func(c *Config) { c.Mark = MarkLearned }, "Mark: 0x400000 overlaps the mark bits 0x00700000"},
		{"mark overlaps to-server", func(c *Config) { c.Mark = 0xdead0001 }, "Mark: 0xdead0001 overlaps"},
		{"timeout negative", func(c *Config) { c.NeighbourTimeout = -time.Second }, "NeighbourTimeout: -1s is out of range 1s..168h0m0s"},
		{"timeout too long", func(c *Config) { c.NeighbourTimeout = 8 * 24 * time.Hour }, "NeighbourTimeout: 192h0m0s is out of range"},
		{"timeout fraction", func(c *Config) { c.NeighbourTimeout = 2500 * time.Millisecond }, "NeighbourTimeout: 2.5s is not a whole number of seconds"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := invisibleConfig()
			tc.modify(&cfg)
			err := cfg.Validate()
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("Validate = %v, want an error containing %q", err, tc.want)
			}
			if _, err := NewPlan(cfg); err == nil {
				t.Fatal("NewPlan accepted it")
			}
			var fields []string
			for _, fe := range Fields(err) {
				fields = append(fields, fe.Field)
			}
			if want := strings.Split(tc.want, ":")[0]; !slices.Equal(fields, []string{want}) {
				t.Errorf("Fields = %v, want [%s]", fields, want)
			}
		})
	}
	// The same mark without the mode: its bits are free.
	cfg := testConfig()
	cfg.Mark = 0xdead0001
	if _, err := NewPlan(cfg); err != nil {
		t.Errorf("a visible plan refused mark 0xdead0001: %v", err)
	}
	for _, mark := range []uint32{1, 0x000fffff, 0xff800000} {
		cfg := invisibleConfig()
		cfg.Mark = mark
		if _, err := NewPlan(cfg); err != nil {
			t.Errorf("mark %#x refused: %v", mark, err)
		}
	}
	p := mustPlan(t, invisibleConfig())
	if got := p.Config(); !got.Invisible || got.NeighbourTimeout != 60*time.Second {
		t.Errorf("Config() = Invisible %v, NeighbourTimeout %v; want true, 60s", got.Invisible, got.NeighbourTimeout)
	}
	var fams []string
	for _, tb := range p.tables {
		fams = append(fams, familyName(tb.family))
	}
	if want := []string{"bridge", "inet", "netdev"}; !slices.Equal(fams, want) {
		t.Errorf("invisible tables = %v, want %v", fams, want)
	}
	// Every variant keeps the netdev table as it is: a switch rebuilds it
	// in place, maps and all.
	for _, q := range []*Plan{p.Draining(), p.Overloaded(OverloadBypass), p.Overloaded(OverloadRefuse), p.UDPBypass(true)} {
		if len(q.tables) != 3 || tableString(q.tables[2], "x") != tableString(p.tables[2], "x") {
			t.Errorf("a variant changed the netdev table:\n%s", q)
		}
	}
	if n := len(mustPlan(t, testConfig()).tables); n != 2 {
		t.Errorf("a visible plan has %d tables", n)
	}
}

func TestQuietValidate(t *testing.T) {
	if err := testQuiet().Validate(); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name   string
		modify func(*Quiet)
		fields []string
	}{
		{"zero", func(q *Quiet) { *q = Quiet{} }, []string{"Name", "Bridge", "BridgeMAC"}},
		{"name too long for the suffix", func(q *Quiet) { q.Name = strings.Repeat("g", 60) }, []string{"Name"}},
		{"bad bridge", func(q *Quiet) { q.Bridge = "br/0" }, []string{"Bridge"}},
		{"multicast MAC", func(q *Quiet) { q.BridgeMAC = net.HardwareAddr{1, 0, 0x5e, 0, 0, 1} }, []string{"BridgeMAC"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			q := testQuiet()
			tc.modify(&q)
			err := q.Validate()
			var fields []string
			for _, fe := range Fields(err) {
				fields = append(fields, fe.Field)
			}
			if !slices.Equal(fields, tc.fields) {
				t.Errorf("Validate = %v: fields %v, want %v", err, fields, tc.fields)
			}
		})
	}
	// Nothing reaches the kernel with a bad config (a nil conn proves it).
	bad := Quiet{}
	if bad.Apply(nil) == nil || bad.Remove(nil) == nil {
		t.Error("Apply or Remove of a zero Quiet accepted")
	}
	if _, err := bad.Check(nil); err == nil {
		t.Error("Check of a zero Quiet accepted")
	}
	if _, err := bad.Counters(nil); err == nil {
		t.Error("Counters of a zero Quiet accepted")
	}
	if got := testQuiet().TableName(); got != "ghostwire_quiet" {
		t.Errorf("TableName = %q", got)
	}
}
