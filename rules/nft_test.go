package rules

import (
	"errors"
	"math/rand/v2"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/google/nftables"
	"golang.org/x/sys/unix"

	"github.com/ghostwire/ghostwire/lab"
)

// The kernel's listing is compared byte for byte with Plan.String(): both end
// in "}\n" and `nft list ruleset` puts no blank line between tables, so with
// only ghostwire's tables present the two are equal with no trimming.

func (n *testNS) ruleset(t *testing.T) string {
	t.Helper()
	return n.run(t, "nft", "list", "ruleset")
}

func wantRuleset(t *testing.T, n *testNS, want string) {
	t.Helper()
	if got := n.ruleset(t); got != want {
		t.Fatalf("nft list ruleset differs from plan\n--- got\n%s--- want\n%s", got, want)
	}
}

// listPlanTables is `nft list table` of each of p's tables, in order.
func (n *testNS) listPlanTables(t *testing.T, p *Plan) string {
	t.Helper()
	var b strings.Builder
	for _, tb := range p.tables {
		b.WriteString(n.run(t, "nft", "list", "table", familyName(tb.family), p.cfg.Name))
	}
	return b.String()
}

func wantNoDrift(t *testing.T, p *Plan, c *nftables.Conn) {
	t.Helper()
	drift, err := p.Check(c)
	if err != nil {
		t.Fatalf("Check: %v", err)
	}
	if len(drift) > 0 {
		t.Fatalf("Check reports drift right after apply:\n%s", strings.Join(drift, "\n"))
	}
}

// wantDriftRepaired checks that p.Check reports exactly want, and that
// applying p again leaves no drift.
func wantDriftRepaired(t *testing.T, p *Plan, c *nftables.Conn, want []string) {
	t.Helper()
	drift, err := p.Check(c)
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(drift, want) {
		t.Errorf("Check =\n%s\nwant\n%s", strings.Join(drift, "\n"), strings.Join(want, "\n"))
	}
	if err := p.Apply(c); err != nil {
		t.Fatal(err)
	}
	wantNoDrift(t, p, c)
}

func TestApplyListsAsString(t *testing.T) {
	n := newTestNS(t)
	for name, p := range goldenPlans(t) {
		t.Run(name, func(t *testing.T) {
			if err := p.Apply(n.nft); err != nil {
				t.Fatalf("Apply: %v", err)
			}
			defer RemoveTables(n.nft, p.cfg.Name)
			// Separate listings too: String is documented as the bridge
			// table's listing followed by the inet table's (and the
			// netdev table's).
			if sep := n.listPlanTables(t, p); sep != p.String() {
				t.Errorf("nft list table bridge + inet (+ netdev) differs from String\n--- got\n%s--- want\n%s", sep, p)
			}
			wantRuleset(t, n, p.String())
			wantNoDrift(t, p, n.nft)
			if err := RemoveTables(n.nft, p.cfg.Name); err != nil {
				t.Fatalf("RemoveTables: %v", err)
			}
			wantRuleset(t, n, "")
		})
	}
}

func TestApplyIdempotentAndReplaces(t *testing.T) {
	n := newTestNS(t)
	p := mustPlan(t, testConfig())
	if err := p.Apply(n.nft); err != nil {
		t.Fatalf("Apply: %v", err)
	}
	first := n.ruleset(t)
	if first != p.String() {
		t.Fatalf("first apply\n--- got\n%s--- want\n%s", first, p)
	}
	if err := p.Apply(n.nft); err != nil {
		t.Fatalf("second Apply: %v", err)
	}
	wantRuleset(t, n, first)

	cfg := testConfig()
	cfg.TCPPorts = []uint16{8080, 25}
	cfg.ProxyTCPPort = 4000
	cfg.Mark = 0x20
	cfg.Bridge = "br9"
	p2 := mustPlan(t, cfg)
	if err := p2.Apply(n.nft); err != nil {
		t.Fatalf("Apply of new plan: %v", err)
	}
	got := n.ruleset(t)
	if got != p2.String() {
		t.Fatalf("after replacing\n--- got\n%s--- want\n%s", got, p2)
	}
	for _, leftover := range []string{" 80,", " 443 ", ":3129", "\"br0\"", "0x00000001"} {
		if strings.Contains(got, leftover) {
			t.Errorf("old plan's %q still in the ruleset", leftover)
		}
	}
	if drift, err := p.Check(n.nft); err != nil || len(drift) == 0 {
		t.Errorf("old plan's Check = %q, %v; want drift", drift, err)
	}

	if err := RemoveTables(n.nft, p2.cfg.Name); err != nil {
		t.Fatalf("RemoveTables: %v", err)
	}
	wantRuleset(t, n, "")
	if err := RemoveTables(n.nft, p2.cfg.Name); err != nil {
		t.Fatalf("second RemoveTables: %v", err)
	}
	if st, err := Tables(n.nft, p2.cfg.Name); err != nil || st != (TablesState{}) {
		t.Fatalf("Tables after removal = %+v, %v", st, err)
	}
	drift, err := p2.Check(n.nft)
	if err != nil {
		t.Fatal(err)
	}
	if want := []string{"table bridge ghostwire is missing", "table inet ghostwire is missing"}; !slices.Equal(drift, want) {
		t.Errorf("Check with no tables = %q, want %q", drift, want)
	}
}

// TestApplyTransitions applies plans in random order (seed logged) and checks
// every transition leaves exactly the current plan, other tables untouched.
func TestApplyTransitions(t *testing.T) {
	n := newTestNS(t)
	n.run(t, "nft", "add table inet bystander; add chain inet bystander c { type filter hook input priority 10; }")
	bystander := n.run(t, "nft", "list", "table", "inet", "bystander")

	var plans []*Plan
	for _, ports := range [][]uint16{{80}, {80, 443}, {22, 80, 443, 8080, 8443, 9000, 9443}, {443}} {
		for _, mark := range []uint32{1, 0x40000} {
			cfg := testConfig()
			cfg.TCPPorts, cfg.Mark = ports, mark
			if mark != 1 {
				cfg.BypassTimeout = time.Hour
			}
			p := mustPlan(t, cfg)
			plans = append(plans, p, p.Draining(), p.Overloaded(OverloadBypass), p.Overloaded(OverloadRefuse))
		}
	}
	// With UDP: adding and dropping UDP ports rebuilds tables in place.
	for _, ports := range [][]uint16{{53}, {53, 443, 4500}} {
		cfg := udpConfig()
		cfg.UDPPorts = ports
		cfg.UDPSessionTimeout = time.Duration(len(ports)) * time.Minute
		p := mustPlan(t, cfg)
		plans = append(plans, p, p.Draining(), p.UDPBypass(true), p.UDPBypass(true).Overloaded(OverloadBypass))
	}
	// With a selection: its sets come and go, in place.
	for _, udp := range []bool{false, true} {
		cfg := selectionConfig()
		if udp {
			cfg.UDPPorts, cfg.ProxyUDPPort = []uint16{53}, 3130
			cfg.ServerCIDRs = nil
		}
		p := mustPlan(t, cfg)
		plans = append(plans, p, p.Draining(), p.Overloaded(OverloadBypass), p.UDPBypass(true))
	}
	// Invisible: the netdev table comes and goes with the mode, and lives
	// through every variant in place.
	for _, udp := range []bool{false, true} {
		cfg := invisibleConfig()
		if udp {
			cfg.UDPPorts, cfg.ProxyUDPPort = []uint16{53}, 3130
			cfg.NeighbourTimeout = 5 * time.Minute
		}
		p := mustPlan(t, cfg)
		plans = append(plans, p, p.Draining(), p.Overloaded(OverloadBypass), p.UDPBypass(true))
	}
	seed := uint64(time.Now().UnixNano())
	t.Logf("seed %d", seed)
	r := rand.New(rand.NewPCG(seed, seed))
	order := r.Perm(len(plans))
	order = append(order, order[0]) // and back to the first
	for _, i := range order {
		p := plans[i]
		if err := p.Apply(n.nft); err != nil {
			t.Fatalf("Apply plan %d: %v", i, err)
		}
		got := n.listPlanTables(t, p)
		if got != p.String() {
			t.Fatalf("after plan %d\n--- got\n%s--- want\n%s", i, got, p)
		}
		wantNoDrift(t, p, n.nft)
		if st, err := Tables(n.nft, "ghostwire"); err != nil || st.Netdev != p.cfg.Invisible {
			t.Fatalf("after plan %d (invisible %v): Tables = %+v, %v", i, p.cfg.Invisible, st, err)
		}
	}
	if got := n.run(t, "nft", "list", "table", "inet", "bystander"); got != bystander {
		t.Errorf("another table changed:\n%s", got)
	}
}

// TestRenderedTextIsNftSyntax feeds String() to nft itself: it must parse, and
// what nft compiles from it must be what Check expects (same bytecode as the
// Go-built rules), so --dry-run output can be applied by hand.
func TestRenderedTextIsNftSyntax(t *testing.T) {
	n := newTestNS(t)
	for name, p := range goldenPlans(t) {
		t.Run(name, func(t *testing.T) {
			file := filepath.Join(t.TempDir(), "plan.nft")
			if err := os.WriteFile(file, []byte(p.String()), 0o644); err != nil {
				t.Fatal(err)
			}
			n.run(t, "nft", "-c", "-f", file)
			n.run(t, "nft", "-f", file)
			defer n.run(t, "nft", "flush", "ruleset")
			wantRuleset(t, n, p.String())
			wantNoDrift(t, p, n.nft)
		})
	}
}

func TestCheckReportsDrift(t *testing.T) {
	n := newTestNS(t)
	p := mustPlan(t, testConfig())
	if err := p.Apply(n.nft); err != nil {
		t.Fatal(err)
	}
	n.run(t, "nft", "delete element inet ghostwire tcp_ports { 443 }; add element bridge ghostwire tcp_ports { 25 }")
	n.run(t, "nft", "delete chain inet ghostwire input")
	n.run(t, "nft", "add chain inet ghostwire extra")
	n.run(t, "nft", "add rule bridge ghostwire prerouting counter")
	// Re-declaring an existing set updates it: same type, other timeout.
	n.run(t, "nft", "add set bridge ghostwire bypass6 { type ipv6_addr . ipv6_addr . inet_service . inet_service; "+
		"size 65536; flags dynamic,timeout; timeout 10m; }")
	// Rule 1 as planned but for its counts, rule 2 with another port,
	// rule 3 with another name (comment).
	n.run(t, "nft", "flush chain inet ghostwire prerouting; add rule inet ghostwire prerouting fib daddr type local counter packets 7 bytes 700 accept comment \"local\"; "+
		"add rule inet ghostwire prerouting iifname br0 tcp dport @tcp_ports tcp flags & (fin|syn|rst|ack) == syn counter tproxy to :3130 meta mark set 1 accept comment \"tcp syn\"; "+
		"add rule inet ghostwire prerouting meta l4proto tcp socket transparent 1 counter meta mark set 1 accept comment \"tcp sockets\"")
	wantDriftRepaired(t, p, n.nft, []string{
		"table bridge ghostwire: set tcp_ports has unexpected ports [25]",
		"table bridge ghostwire: set bypass6 differs from plan (type ipv6_addr . ipv6_addr . inet_service . inet_service; size 65536; flags dynamic,timeout; timeout 5m)",
		"chain bridge ghostwire prerouting has 11 rules, plan has 10",
		"table inet ghostwire: set tcp_ports lacks ports [443]",
		"chain inet ghostwire prerouting: rule 2 differs from plan",
		"chain inet ghostwire prerouting: rule 3 differs from plan",
		"chain inet ghostwire input is missing",
		"table inet ghostwire: unexpected chain extra",
	})
}

// ownedMarks matches what nft adds to an owned table's listing: the
// "# progname NAME" comment after the brace and the "flags owner" line with
// the blank line after it.
var ownedMarks = regexp.MustCompile(`(?m)( # progname \S+$|^\tflags owner\n\n)`)

func TestApplyOwned(t *testing.T) {
	n := newTestNS(t)
	p := mustPlan(t, testConfig())
	if err := p.Apply(n.nft); err != nil {
		t.Fatal(err)
	}
	owner := n.lasting(t)
	if err := p.ApplyOwned(owner); err != nil {
		t.Fatalf("ApplyOwned over un-owned tables: %v", err)
	}
	listing := n.ruleset(t)
	if strings.Count(listing, "\tflags owner\n") != 2 {
		t.Errorf("both tables should list as owned:\n%s", listing)
	}
	if got := ownedMarks.ReplaceAllString(listing, ""); got != p.String() {
		t.Errorf("owned listing (owner marks removed) differs from plan\n--- got\n%s--- want\n%s", got, p)
	}
	port, err := owner.GetPortID()
	if err != nil {
		t.Fatal(err)
	}
	st, err := Tables(n.nft, "ghostwire")
	if err != nil {
		t.Fatal(err)
	}
	if want := (TablesState{Bridge: true, Inet: true, Owned: true, OwnerPortID: port}); st != want {
		t.Errorf("Tables = %+v, want %+v", st, want)
	}
	wantNoDrift(t, p, n.nft)

	// Nobody else may remove or replace them, and a failed attempt changes nothing.
	err = RemoveTables(n.nft, "ghostwire")
	t.Logf("RemoveTables from another socket: %v", err)
	if !errors.Is(err, unix.EPERM) || !strings.Contains(err.Error(), "owned") {
		t.Errorf("RemoveTables from another socket = %v; want an EPERM error saying the table is owned", err)
	}
	if err := p.Apply(n.nft); !errors.Is(err, unix.EPERM) {
		t.Errorf("Apply from another socket = %v; want EPERM", err)
	}
	if err := p.ApplyOwned(n.lasting(t)); !errors.Is(err, unix.EPERM) {
		t.Errorf("ApplyOwned from another lasting socket = %v; want EPERM", err)
	}
	if got := n.ruleset(t); got != listing {
		t.Errorf("failed attempts changed the ruleset:\n%s", got)
	}

	// Reload on the same connection: new ports, overloads, then draining.
	cfg := testConfig()
	cfg.TCPPorts = []uint16{8080}
	p2 := mustPlan(t, cfg)
	for _, q := range []*Plan{p2, p2, p2.Overloaded(OverloadBypass), p2.Overloaded(OverloadRefuse), p2, p2.Draining()} {
		if err := q.ApplyOwned(owner); err != nil {
			t.Fatalf("ApplyOwned again on the same conn: %v", err)
		}
		if got := ownedMarks.ReplaceAllString(n.ruleset(t), ""); got != q.String() {
			t.Fatalf("after reload\n--- got\n%s--- want\n%s", got, q)
		}
	}
	// The owner itself can go back to ordinary tables (apply while running).
	if err := p2.Apply(owner); err != nil {
		t.Fatalf("Apply by the owner: %v", err)
	}
	wantRuleset(t, n, p2.String())
	if err := p2.ApplyOwned(owner); err != nil {
		t.Fatal(err)
	}

	// Fail-open: closing the owning socket makes the kernel drop the tables.
	if err := owner.CloseLasting(); err != nil {
		t.Fatal(err)
	}
	waitTablesGone(t, n, "ghostwire", nil)
	wantRuleset(t, n, "")
}

// waitTablesGone waits up to 5 s for the kernel to drop the tables called
// name after their owner closed, passing what is left on each look to
// each (when not nil) to check how they go.
func waitTablesGone(t *testing.T, n *testNS, name string, each func(TablesState)) {
	t.Helper()
	var st TablesState
	err := lab.WaitFor(5*time.Second, func() (bool, error) {
		var err error
		if st, err = Tables(n.nft, name); err != nil {
			return false, err
		}
		if each != nil {
			each(st)
		}
		return st == (TablesState{}), nil
	})
	if err != nil {
		t.Fatalf("tables still there 5s after the owner closed (%+v): %v", st, err)
	}
}

func TestApplyOwnedNeedsLastingConn(t *testing.T) {
	n := newTestNS(t)
	p := mustPlan(t, testConfig())
	err := p.ApplyOwned(n.nft)
	if err == nil || !strings.Contains(err.Error(), "AsLasting") {
		t.Fatalf("ApplyOwned on a transient conn = %v; want an error naming AsLasting", err)
	}
}

func TestRemoveTablesOneFamily(t *testing.T) {
	n := newTestNS(t)
	n.run(t, "nft", "add table inet ghostwire; add table ip ghostwire")
	if err := RemoveTables(n.nft, "ghostwire"); err != nil {
		t.Fatal(err)
	}
	// Only ghostwire's families: a same-named ip table is somebody else's.
	if got, want := n.ruleset(t), "table ip ghostwire {\n}\n"; got != want {
		t.Errorf("ruleset = %q, want %q", got, want)
	}
	if err := RemoveTables(n.nft, ""); err == nil {
		t.Error("RemoveTables with an empty name accepted")
	}
}
