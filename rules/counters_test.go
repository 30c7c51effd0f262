package rules

import (
	"fmt"
	"maps"
	"slices"
	"strings"
	"testing"

	"github.com/google/nftables/expr"
)

// plannedNames are the names (comments) of p's rules, by table family
// name, in order.
func plannedNames(p *Plan) map[string][]string {
	names := map[string][]string{}
	for _, tb := range p.tables {
		for _, ch := range tb.chains {
			for _, r := range ch.rules {
				for _, it := range r {
					if c, ok := it.(comment); ok {
						names[familyName(tb.family)] = append(names[familyName(tb.family)], string(c))
					}
				}
			}
		}
	}
	return names
}

// TestEveryRuleCounted: in every plan variant, every rule has exactly one
// counter, after its matches and before its statements (or, in the netdev
// table, after statements that may stop the rule, then at most a
// verdict), and ends with a comment; the names are unique per table, and a rule of the same role has
// the same name in every variant (the set of names only grows with UDP and
// the selection, whose rules the others lack).
func TestEveryRuleCounted(t *testing.T) {
	all := map[string]map[string]bool{}
	for pname, p := range pinnedPlans(t) {
		for _, tb := range p.tables {
			seen := map[string]bool{}
			for _, ch := range tb.chains {
				for i, r := range ch.rules {
					where := fmt.Sprintf("%s: %s %s rule %d (%s)", pname, familyName(tb.family), ch.name, i+1, r)
					ctr := slices.IndexFunc(r, func(it ruleItem) bool { _, ok := it.(counter); return ok })
					c, ok := r[len(r)-1].(comment)
					if ctr < 0 || !ok || c == "" || slices.ContainsFunc(r[:len(r)-1], func(it ruleItem) bool { _, ok := it.(comment); return ok }) {
						t.Errorf("%s: no counter, or no comment last", where)
						continue
					}
					// Between the matches and the statements (counted), or
					// after statements that may stop the rule (countedLast).
					between := !slices.ContainsFunc(r[:ctr], isStatement) && isStatement(r[ctr+1])
					_, verdict := r[len(r)-2].(accept)
					last := (ctr == len(r)-2 || ctr == len(r)-3 && verdict) && slices.ContainsFunc(r[:ctr], mayStop)
					if !between && !last {
						t.Errorf("%s: the counter is neither between the matches and the statements nor after statements that may stop the rule", where)
					}
					if seen[string(c)] {
						t.Errorf("%s: name %q twice in the table", where, c)
					}
					seen[string(c)] = true
					if all[familyName(tb.family)] == nil {
						all[familyName(tb.family)] = map[string]bool{}
					}
					all[familyName(tb.family)][string(c)] = true
				}
			}
		}
	}
	// The names of the roles that every plan has.
	for fam, want := range map[string][]string{
		"bridge": {"lift tcp client", "lift tcp server", "bypass flow client4", "bypass flow server6", "bypass host tcp saddr4"},
		"inet":   {"local", "tcp syn", "tcp socket", "refuse tcp proxy port"},
	} {
		for _, name := range want {
			if !all[fam][name] {
				t.Errorf("no %s rule named %q; names: %v", fam, name, slices.Sorted(maps.Keys(all[fam])))
			}
		}
	}
}

// TestDecompileCatchesWrongCounterOrComment: the pin sees a counter that
// does not list as a fresh one, a missing counter, and a comment the user
// data does not hold as nft writes it.
func TestDecompileCatchesWrongCounterOrComment(t *testing.T) {
	p := pinnedPlans(t)["many udp"]
	for name, mutate := range map[string]func([]expr.Any) bool{
		"counter with counts": first(func(c *expr.Counter) bool { return true }, func(c *expr.Counter) { c.Packets = 1 }),
		"counter dropped": func(exprs []expr.Any) bool {
			for i, e := range exprs {
				if _, ok := e.(*expr.Counter); ok {
					exprs[i] = &expr.Verdict{Kind: expr.VerdictAccept}
					return true
				}
			}
			return false
		},
	} {
		t.Run(name, func(t *testing.T) {
			mismatches, mutated := pinMismatches(t, p, mutate)
			if mutated == 0 || len(mismatches) == 0 {
				t.Fatalf("%d rules mutated, %d mismatches", mutated, len(mismatches))
			}
		})
	}
	tb := p.tables[0]
	rec, tbl := record(t, p, tb)
	r := rec.rulesOf(rec.chains[0])[0]
	text, err := decompileRule(tbl.Family, rec.setsByName(), r)
	if want := tb.chains[0].rules[0].String(); err != nil || text != want {
		t.Fatalf("decompileRule = %q, %v; want %q", text, err, want)
	}
	for _, ud := range [][]byte{
		{0, 4, 'a', 'b', 'c', 0},                  // another name
		append(slices.Clone(r.UserData), 1, 1, 0), // more than a comment
		r.UserData[:len(r.UserData)-1],            // no NUL: not as nft writes it
	} {
		bad := *r
		bad.UserData = ud
		if text, err := decompileRule(tbl.Family, rec.setsByName(), &bad); err == nil && text == tb.chains[0].rules[0].String() {
			t.Errorf("user data %x still lists as the rule's comment", ud)
		}
	}
}

// TestCountersKernel applies a plan owned by one socket, reads its rule
// counters through another: every counted rule, named as planned, at zero.
// A connection to the proxy port from inside the namespace is then counted
// by the inet rules it went through, and Check still sees no drift.
func TestCountersKernel(t *testing.T) {
	n := newTestNS(t)
	owner := n.lasting(t)
	p := mustPlan(t, udpConfig())
	if err := p.ApplyOwned(owner); err != nil {
		t.Fatal(err)
	}
	read := func() map[string]RuleCounter {
		t.Helper()
		cs, err := Counters(n.nft, p.cfg.Name)
		if err != nil {
			t.Fatalf("Counters from another socket: %v", err)
		}
		got := map[string][]string{}
		m := map[string]RuleCounter{}
		for _, c := range cs {
			got[c.Table] = append(got[c.Table], c.Rule)
			m[c.Table+"/"+c.Rule] = c
		}
		if want := plannedNames(p); !maps.EqualFunc(got, want, slices.Equal) {
			t.Fatalf("Counters names = %v, want %v", got, want)
		}
		return m
	}
	for k, c := range read() {
		if c.Packets != 0 || c.Bytes != 0 {
			t.Errorf("%s: %d packets %d bytes before any traffic", k, c.Packets, c.Bytes)
		}
	}
	// Refused (reset) by the input rule, after the prerouting's local rule.
	n.try("bash", "-c", fmt.Sprintf("exec 3<>/dev/tcp/127.0.0.1/%d", p.cfg.ProxyTCPPort))
	after := read()
	for _, k := range []string{"inet/refuse tcp proxy port", "inet/local"} {
		if c := after[k]; c.Packets == 0 || c.Bytes < 40*c.Packets {
			t.Errorf("%s after a connection to the proxy port: %+v", k, c)
		}
	}
	if c := after["inet/tcp syn"]; c.Packets != 0 {
		t.Errorf("tcp syn counted local traffic: %+v", c)
	}
	wantNoDrift(t, p, n.nft)
	if out := n.run(t, "nft", "list", "chain", "inet", p.cfg.Name, "input"); !strings.Contains(out, `counter packets 1 bytes`) ||
		!strings.Contains(out, `reject with tcp reset comment "refuse tcp proxy port"`) {
		t.Errorf("nft lists the input chain as\n%s", out)
	}
	// No tables: no counters, no error.
	if cs, err := Counters(n.nft, "other"); err != nil || len(cs) != 0 {
		t.Errorf("Counters of missing tables = %v, %v", cs, err)
	}
}
