package rules

import (
	"errors"
	"net/netip"
	"strings"
	"testing"
	"time"
)

// TestHostBypassKernel adds and deletes live bypass entries (permanent and
// with a timeout, IPv4 and IPv6, a host and a prefix) on owned tables over
// the lasting connection, reads them back with HostBypasses and `nft list
// set`, sees a timed one expire by itself, keeps them through reloads of
// other plans, and refuses an overlapping one.
func TestHostBypassKernel(t *testing.T) {
	n := newTestNS(t)
	c := n.lasting(t)
	p := mustPlan(t, udpConfig())
	if err := p.ApplyOwned(c); err != nil {
		t.Fatal(err)
	}
	name := p.cfg.Name
	add := func(s string, d time.Duration) {
		t.Helper()
		if err := AddHostBypass(c, name, netip.MustParsePrefix(s), d); err != nil {
			t.Fatalf("add %s: %v", s, err)
		}
	}
	add("192.0.2.9/32", 0)
	add("10.1.0.0/16", time.Hour)
	add("2001:db8::/64", 0)
	add("198.51.100.7/32", 2*time.Second)
	list := func() map[string]time.Duration {
		t.Helper()
		hs, err := HostBypasses(c, name)
		if err != nil {
			t.Fatal(err)
		}
		m := map[string]time.Duration{}
		for _, h := range hs {
			m[h.Prefix.String()] = h.Expires
		}
		return m
	}
	got := list()
	if len(got) != 4 || got["192.0.2.9/32"] != 0 || got["2001:db8::/64"] != 0 ||
		got["10.1.0.0/16"] < 59*time.Minute || got["10.1.0.0/16"] > time.Hour || got["198.51.100.7/32"] == 0 {
		t.Fatalf("HostBypasses = %v", got)
	}
	out := n.run(t, "nft", "list", "set", "bridge", name, "bypass_hosts4")
	for _, want := range []string{"flags interval,timeout", "192.0.2.9", "10.1.0.0/16 timeout 1h expires", "198.51.100.7 timeout 2s expires"} {
		if !strings.Contains(out, want) {
			t.Errorf("nft list set lacks %q:\n%s", want, out)
		}
	}
	if out := n.run(t, "nft", "list", "set", "bridge", name, "bypass_hosts6"); !strings.Contains(out, "2001:db8::/64") {
		t.Errorf("nft list set bypass_hosts6:\n%s", out)
	}
	// Overlaps are refused; the same prefix again replaces it.
	if err := AddHostBypass(c, name, netip.MustParsePrefix("10.1.2.3/32"), 0); err == nil || !strings.Contains(err.Error(), "overlaps 10.1.0.0/16") {
		t.Errorf("overlapping add: %v", err)
	}
	add("10.1.0.0/16", 0)
	if got := list(); got["10.1.0.0/16"] != 0 {
		t.Errorf("re-added permanently, still expires: %v", got)
	}
	// IfUncovered leaves a covered prefix's entry (and its timeout) alone,
	// and adds an uncovered one.
	for s, want := range map[string]bool{"10.1.2.3/32": false, "192.0.2.9/32": false, "203.0.113.5/32": true} {
		added, err := AddHostBypassIfUncovered(c, name, netip.MustParsePrefix(s), time.Minute)
		if err != nil || added != want {
			t.Errorf("AddHostBypassIfUncovered(%s) = %v, %v; want %v", s, added, err, want)
		}
	}
	if got := list(); got["10.1.0.0/16"] != 0 || got["192.0.2.9/32"] != 0 || got["203.0.113.5/32"] == 0 {
		t.Errorf("after AddHostBypassIfUncovered: %v", got)
	}
	if err := DelHostBypass(c, name, netip.MustParsePrefix("203.0.113.5/32")); err != nil {
		t.Fatal(err)
	}
	// Reloads (UDP dropped and added back, draining) keep the list.
	for _, q := range []*Plan{mustPlan(t, testConfig()), p.Draining(), p} {
		if err := q.ApplyOwned(c); err != nil {
			t.Fatal(err)
		}
		if drift, err := q.Check(c); err != nil || len(drift) > 0 {
			t.Fatalf("Check with a bypass list: %v %v", drift, err)
		}
	}
	if got := list(); len(got) < 3 || got["192.0.2.9/32"] != 0 {
		t.Fatalf("after reloads: %v", got)
	}
	// Delete; again is ErrNotListed.
	if err := DelHostBypass(c, name, netip.MustParsePrefix("192.0.2.9/32")); err != nil {
		t.Fatal(err)
	}
	if err := DelHostBypass(c, name, netip.MustParsePrefix("192.0.2.9/32")); !errors.Is(err, ErrNotListed) {
		t.Errorf("second delete: %v", err)
	}
	if err := DelHostBypass(c, name, netip.MustParsePrefix("2001:db8::/64")); err != nil {
		t.Fatal(err)
	}
	// The timed entry expires by itself.
	deadline := time.Now().Add(5 * time.Second)
	for {
		got := list()
		if _, ok := got["198.51.100.7/32"]; !ok {
			if len(got) != 1 {
				t.Errorf("left: %v, want 10.1.0.0/16 only", got)
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("198.51.100.7 did not expire: %v", got)
		}
		time.Sleep(200 * time.Millisecond)
	}
	if out := n.run(t, "nft", "list", "set", "bridge", name, "bypass_hosts4"); strings.Contains(out, "198.51.100.7") || strings.Contains(out, "192.0.2.9") {
		t.Errorf("nft still lists removed entries:\n%s", out)
	}
}
