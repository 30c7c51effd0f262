package provision

import (
	"strings"
	"testing"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
)

func TestDropsOrRejects(t *testing.T) {
	for _, tc := range []struct {
		exprs []expr.Any
		want  bool
	}{
		{[]expr.Any{&expr.Verdict{Kind: expr.VerdictDrop}}, true},
		{[]expr.Any{&expr.Reject{}}, true},
		{[]expr.Any{&expr.Target{Name: "REJECT"}}, true},
		{[]expr.Any{&expr.Verdict{Kind: expr.VerdictAccept}}, false},
		{[]expr.Any{&expr.Counter{}}, false},
	} {
		if got := dropsOrRejects(&nftables.Rule{Exprs: tc.exprs}); got != tc.want {
			t.Errorf("%v: %v, want %v", tc.exprs, got, tc.want)
		}
	}
}

func TestCheckForeignTables(t *testing.T) {
	if r := checkForeignTables(CheckFacts{}); len(r) != 1 || r[0].Level != OK {
		t.Errorf("none: %+v", r)
	}
	f := CheckFacts{Foreign: []ForeignChain{{Family: "ip", Table: "fw", Chain: "pre", Hook: "prerouting", Priority: -300, DropRules: 2}}}
	r := checkForeignTables(f)
	if len(r) != 1 || r[0].Level != Warn ||
		!strings.Contains(r[0].Found, "ip fw chain pre (hook prerouting, priority -300): 2 rule(s) that drop or reject") ||
		r[0].Fix != "nft list chain ip fw pre; let intercepted ports through there" {
		t.Errorf("one: %+v", r)
	}
}
