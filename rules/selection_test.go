package rules

import (
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"testing"

	"github.com/google/nftables"
)

func pfx(ss ...string) []netip.Prefix {
	var out []netip.Prefix
	for _, s := range ss {
		out = append(out, netip.MustParsePrefix(s))
	}
	return out
}

// The lists are masked, sorted (IPv4 first), deduplicated, and a prefix
// inside another is dropped (nft refuses overlapping intervals); adjacent
// prefixes stay as they are.
func TestSelectionNormalised(t *testing.T) {
	cfg := testConfig()
	cfg.ClientCIDRs = pfx("2001:db8::1/32", "10.1.2.3/8", "10.20.0.0/16", "10.0.0.0/8", "192.0.2.0/25", "192.0.2.128/25", "::/0", "2001:db8::/48")
	cfg.ExcludeServerCIDRs = pfx("0.0.0.0/0", "1.2.3.4/32")
	p := mustPlan(t, cfg)
	got := p.Config()
	if want := pfx("10.0.0.0/8", "192.0.2.0/25", "192.0.2.128/25", "::/0"); !slices.Equal(got.ClientCIDRs, want) {
		t.Errorf("ClientCIDRs = %v, want %v", got.ClientCIDRs, want)
	}
	if want := pfx("0.0.0.0/0"); !slices.Equal(got.ExcludeServerCIDRs, want) {
		t.Errorf("ExcludeServerCIDRs = %v, want %v", got.ExcludeServerCIDRs, want)
	}
	if got.ServerCIDRs != nil || got.ExcludeClientCIDRs != nil {
		t.Errorf("empty lists = %v, %v; want nil", got.ServerCIDRs, got.ExcludeClientCIDRs)
	}
	// No aliasing either way.
	cfg.ClientCIDRs[0] = netip.MustParsePrefix("1.1.1.1/32")
	got.ClientCIDRs[0] = netip.MustParsePrefix("2.2.2.2/32")
	if c := p.Config(); c.ClientCIDRs[0] != netip.MustParsePrefix("10.0.0.0/8") {
		t.Errorf("plan changed through aliasing: %v", c.ClientCIDRs)
	}
	// Sets: both families for a list that selects, only those with
	// prefixes for one that excludes.
	var names []string
	for _, s := range p.sets(nftables.TableFamilyBridge) {
		names = append(names, s.name)
	}
	if want := []string{"tcp_ports", "bypass4", "bypass6", "bypass_hosts4", "bypass_hosts6", "clients4", "clients6", "xservers4"}; !slices.Equal(names, want) {
		t.Errorf("bridge sets = %v, want %v", names, want)
	}
	for _, s := range p.sets(nftables.TableFamilyINet) {
		if s.interval {
			t.Errorf("inet table has interval set %s", s.name)
		}
	}
}

func TestSelectionValidation(t *testing.T) {
	cfg := testConfig()
	cfg.ServerCIDRs = []netip.Prefix{netip.MustParsePrefix("10.0.0.0/8"), {}}
	cfg.ExcludeClientCIDRs = []netip.Prefix{{}}
	_, err := NewPlan(cfg)
	var fields []string
	for _, fe := range Fields(err) {
		fields = append(fields, fe.Error())
	}
	want := []string{`ServerCIDRs: "invalid Prefix" is not a valid prefix`, `ExcludeClientCIDRs: "invalid Prefix" is not a valid prefix`}
	if !slices.Equal(fields, want) {
		t.Errorf("errors = %q, want %q", fields, want)
	}
}

// Without any list the plans are the ones from before selection (the
// goldens of basic.nft etc. pin the text); with one, the bridge table has
// the rules in every variant, and UDPBypass bridges unselected UDP anyway.
func TestSelectionOnlyWithLists(t *testing.T) {
	for name, p := range pinnedPlans(t) {
		has := strings.Contains(p.String(), "@clients") || strings.Contains(p.String(), "@xservers")
		want := strings.HasPrefix(name, "selection") || strings.HasPrefix(name, "invisible-selection") || strings.HasPrefix(name, "invisible all")
		if has != want {
			t.Errorf("%s: selection rules present = %v", name, has)
		}
	}
	p := pinnedPlans(t)["selection udp udp bypass"]
	if strings.Contains(p.String(), "!= @udpflows") {
		t.Errorf("UDPBypass plan has UDP selection rules:\n%s", p)
	}
}

// prefixElements sends what nft 1.0.6 sends for the same set (read with
// `nft --debug=netlink list set`): a leading interval end at 0 unless
// the first prefix starts there, each prefix's start and (unless it runs
// to the last address, then flagged open) the address after it as an
// interval end, adjacent prefixes not merged.
func TestPrefixElementsAsNft(t *testing.T) {
	for _, tc := range []struct {
		ps   []netip.Prefix
		want string
	}{
		{pfx("10.0.0.0/8"), "00000000e 0a000000 0b000000e"},
		{nil, ""},
		{pfx("0.0.0.0/32", "10.0.0.0/8", "192.0.2.1/32", "192.0.2.128/25", "198.51.100.0/25", "198.51.100.128/25", "255.255.255.255/32"),
			"00000000 00000001e 0a000000 0b000000e c0000201 c0000202e c0000280 c0000300e c6336400 c6336480e c6336480 c6336500e ffffffffo"},
		{pfx("::/8", "2001:db8::/32", "ffff::/16"),
			"00000000000000000000000000000000 01000000000000000000000000000000e 20010db8000000000000000000000000 20010db9000000000000000000000000e ffff0000000000000000000000000000o"},
	} {
		var parts []string
		for _, e := range prefixElements(tc.ps) {
			s := fmt.Sprintf("%x", e.Key)
			if e.IntervalEnd {
				s += "e"
			}
			if e.IntervalOpen {
				s += "o"
			}
			parts = append(parts, s)
		}
		if got := strings.Join(parts, " "); got != tc.want {
			t.Errorf("prefixElements(%v) =\n  %s\nwant\n  %s", tc.ps, got, tc.want)
		}
		var strs []string
		for _, p := range tc.ps {
			strs = append(strs, prefixString(p))
		}
		if got := elementsPrefixes(prefixElements(tc.ps)); !slices.Equal(got, strs) {
			t.Errorf("elementsPrefixes(prefixElements(%v)) = %v", tc.ps, got)
		}
	}
}
