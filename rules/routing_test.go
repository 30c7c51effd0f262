package rules

import (
	"slices"
	"strings"
	"testing"
)

// routingState is everything Routing may touch, as iproute2 prints it. A
// table that was never created makes `ip route show table N` fail ("FIB
// table does not exist"); it counts as empty, like a table emptied by Remove.
func (n *testNS) routingState(t *testing.T, table string) string {
	t.Helper()
	var b strings.Builder
	for _, args := range [][]string{
		{"ip", "rule"}, {"ip", "-6", "rule"},
		{"ip", "route", "show", "table", table}, {"ip", "-6", "route", "show", "table", table},
	} {
		b.WriteString("$ " + strings.Join(args, " ") + "\n")
		out, err := n.try(args...)
		if err != nil && !strings.Contains(err.Error(), "FIB table does not exist") {
			t.Fatalf("%s: %v", strings.Join(args, " "), err)
		}
		b.WriteString(out)
	}
	return b.String()
}

// Exactly what `ip` prints for the routing of testConfig in a fresh namespace.
const (
	routingBefore = `$ ip rule
0:	from all lookup local
32766:	from all lookup main
32767:	from all lookup default
$ ip -6 rule
0:	from all lookup local
32766:	from all lookup main
$ ip route show table 100
$ ip -6 route show table 100
`
	routingAfter = `$ ip rule
0:	from all lookup local
1000:	from all fwmark 0x1 lookup 100
32766:	from all lookup main
32767:	from all lookup default
$ ip -6 rule
0:	from all lookup local
1000:	from all fwmark 0x1 lookup 100
32766:	from all lookup main
$ ip route show table 100
local default dev lo scope host 
$ ip -6 route show table 100
local default dev lo metric 1024 pref medium
`
)

func wantRouting(t *testing.T, n *testNS, want string) {
	t.Helper()
	wantRoutingTable(t, n, "100", want)
}

func wantRoutingTable(t *testing.T, n *testNS, table, want string) {
	t.Helper()
	if got := n.routingState(t, table); got != want {
		t.Fatalf("routing state\n--- got\n%s--- want\n%s", got, want)
	}
}

func TestRoutingApplyRemove(t *testing.T) {
	n := newTestNS(t)
	r := mustPlan(t, testConfig()).Routing()
	wantRouting(t, n, routingBefore)

	if err := r.Apply(n.nl); err != nil {
		t.Fatalf("Apply: %v", err)
	}
	wantRouting(t, n, routingAfter)
	if drift, err := r.Check(n.nl); err != nil || len(drift) > 0 {
		t.Fatalf("Check after Apply = %q, %v", drift, err)
	}
	if err := r.Apply(n.nl); err != nil {
		t.Fatalf("second Apply: %v", err)
	}
	wantRouting(t, n, routingAfter)

	if err := r.Remove(n.nl); err != nil {
		t.Fatalf("Remove: %v", err)
	}
	wantRouting(t, n, routingBefore)
	if err := r.Remove(n.nl); err != nil {
		t.Fatalf("second Remove: %v", err)
	}
	wantRouting(t, n, routingBefore)
	drift, err := r.Check(n.nl)
	if err != nil {
		t.Fatal(err)
	}
	if len(drift) != 4 {
		t.Errorf("Check with nothing applied = %q; want 4 missing items", drift)
	}
}

func TestRoutingCheckAfterManualDelete(t *testing.T) {
	n := newTestNS(t)
	r := mustPlan(t, testConfig()).Routing()
	if err := r.Apply(n.nl); err != nil {
		t.Fatal(err)
	}
	n.run(t, "ip", "rule", "del", "pref", "1000")
	n.run(t, "ip", "-6", "route", "del", "local", "::/0", "dev", "lo", "table", "100")
	drift, err := r.Check(n.nl)
	if err != nil {
		t.Fatal(err)
	}
	want := []string{
		"policy routing missing: ip -6 route add local ::/0 dev lo table 100",
		"policy routing missing: ip rule add fwmark 0x1 lookup 100 pref 1000",
	}
	if !slices.Equal(drift, want) {
		t.Errorf("Check =\n%s\nwant\n%s", strings.Join(drift, "\n"), strings.Join(want, "\n"))
	}
	// Apply repairs exactly what is missing.
	if err := r.Apply(n.nl); err != nil {
		t.Fatal(err)
	}
	wantRouting(t, n, routingAfter)
}

// TestRoutingRemoveOnlyOwn: rules that share the priority but not the mark or
// table, and other routes in the table, are somebody else's.
func TestRoutingRemoveOnlyOwn(t *testing.T) {
	n := newTestNS(t)
	r := mustPlan(t, testConfig()).Routing()
	n.run(t, "ip", "rule", "add", "fwmark", "0x2", "lookup", "100", "pref", "1000")
	n.run(t, "ip", "rule", "add", "fwmark", "0x1", "lookup", "101", "pref", "1000")
	n.run(t, "ip", "route", "add", "blackhole", "10.9.0.0/16", "table", "100")
	before := n.routingState(t, "100")
	if err := r.Apply(n.nl); err != nil {
		t.Fatal(err)
	}
	if err := r.Remove(n.nl); err != nil {
		t.Fatal(err)
	}
	if got := n.routingState(t, "100"); got != before {
		t.Errorf("Remove touched others' rules or routes\n--- got\n%s--- want\n%s", got, before)
	}
}

// TestRoutingApplyRollsBack makes the IPv6 route fail (IPv6 disabled on lo)
// after the IPv4 route went in: Apply must take the IPv4 route out again.
func TestRoutingApplyRollsBack(t *testing.T) {
	n := newTestNS(t)
	r := mustPlan(t, testConfig()).Routing()
	n.run(t, "sysctl", "-q", "-w", "net.ipv6.conf.lo.disable_ipv6=1")
	err := r.Apply(n.nl)
	if err == nil {
		t.Fatal("Apply succeeded with IPv6 disabled on lo")
	}
	t.Logf("Apply: %v", err)
	if !strings.Contains(err.Error(), "ip -6 route add local ::/0 dev lo table 100") {
		t.Errorf("error does not name the failing step: %v", err)
	}
	if got := n.routingState(t, "100"); got != routingBefore {
		t.Errorf("failed Apply left something behind\n--- got\n%s--- want\n%s", got, routingBefore)
	}
}

// TestRoutingBigTable covers table IDs above 255 (netlink carries them in a
// separate attribute) and a mark using all 32 bits.
func TestRoutingBigTable(t *testing.T) {
	n := newTestNS(t)
	r := Routing{Mark: 0xdead0001, Table: 70000, Priority: 32765}
	before := n.routingState(t, "70000")
	if err := r.Apply(n.nl); err != nil {
		t.Fatal(err)
	}
	want := strings.NewReplacer(
		"1000:\tfrom all fwmark 0x1 lookup 100\n", "",
		"32766:\tfrom all lookup main\n", "32765:\tfrom all fwmark 0xdead0001 lookup 70000\n32766:\tfrom all lookup main\n",
		"table 100", "table 70000",
	).Replace(routingAfter)
	wantRoutingTable(t, n, "70000", want)
	if drift, err := r.Check(n.nl); err != nil || len(drift) > 0 {
		t.Errorf("Check = %q, %v", drift, err)
	}
	if err := r.Remove(n.nl); err != nil {
		t.Fatal(err)
	}
	wantRoutingTable(t, n, "70000", before)
}
