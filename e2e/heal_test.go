package e2e

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/ghostwire/ghostwire/lab"
)

// ownRule is ghostwire's v4 policy rule as `ip rule` shows it: the
// priority and the selector text ("fwmark 0x1 lookup 100").
func ownRule(t *testing.T, b *lab.Appliance) (pref, mark, table string) {
	t.Helper()
	for _, l := range strings.Split(sh(t, b.Lab.Box, "ip", "rule"), "\n") {
		p, sel, ok := strings.Cut(l, ":")
		f := strings.Fields(sel)
		if ok && len(f) == 6 && f[2] == "fwmark" && f[4] == "lookup" {
			return p, f[3], f[5]
		}
	}
	t.Fatalf("no fwmark rule in the box:\n%s", sh(t, b.Lab.Box, "ip", "rule"))
	return
}

// breakAndWait runs `ip DEL...` in the box, then polls `ip SHOW...` until
// its output contains want, and returns how long that took. It does not
// touch t: it runs beside the pumping of a transfer.
func breakAndWait(b *lab.Appliance, del []string, want string, show ...string) (time.Duration, error) {
	ip := func(args ...string) (string, error) {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		out, err := b.Lab.Box.Command(ctx, "ip", args...).CombinedOutput()
		if err != nil {
			return "", fmt.Errorf("ip %s: %v\n%s", strings.Join(args, " "), err, out)
		}
		return string(out), nil
	}
	if _, err := ip(del...); err != nil {
		return 0, err
	}
	since := time.Now()
	for time.Since(since) < 5*time.Second {
		out, err := ip(show...)
		if err != nil {
			return 0, err
		}
		if strings.Contains(out, want) {
			return time.Since(since), nil
		}
	}
	return 0, fmt.Errorf("ip %s: %q not back within 5s", strings.Join(show, " "), want)
}

// pumpUntil keeps the transfer pumping until the break is restored.
func pumpUntil(t *testing.T, f *inflight, seed *uint64, what string, res <-chan error, d *time.Duration) {
	t.Helper()
	for {
		*seed++
		f.pump(*seed)
		select {
		case err := <-res:
			if err != nil {
				t.Fatal(err)
			}
			t.Logf("%s restored after %s", what, *d)
			if *d > time.Second {
				t.Errorf("%s came back after %s, want within 1s", what, *d)
			}
			return
		default:
		}
	}
}

// Others deleting the policy rule and then the local route while a proxied
// transfer runs and new connections open: `run` restores each within 1 s,
// logs one line naming it, the transfer stays intact and new connections
// are proxied again.
func TestHealRestoresRuleAndRoute(t *testing.T) {
	b := proxiedBox(t, 80)
	addr := listenServer(t, b, b.Lab.ServerIP4.String(), "80", peerServer)
	pref, mark, table := ownRule(t, b)
	ruleWhat := fmt.Sprintf("ip rule fwmark %s lookup %s pref %s", mark, table, pref)
	routeWhat := "ip route local 0.0.0.0/0 dev lo table " + table

	f := startInflight(t, b, b.Lab.ClientIP4, addr)
	f.c.SetDeadline(time.Now().Add(20 * time.Second))
	t.Cleanup(func() {
		if t.Failed() { // where a stalled transfer sits
			for _, ns := range []*lab.NS{b.Lab.Client, b.Lab.Box, b.Lab.Server} {
				out, _ := ns.Command(context.Background(), "ss", "-tni").CombinedOutput()
				t.Logf("ss -tni in %s:\n%s", ns.Name, out)
			}
		}
	})
	f.pump(1)

	// New connections keep opening throughout (they may fail while the
	// routing is missing: what counts is what follows).
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			select {
			case <-stop:
				return
			default:
			}
			probe(b, addr, 300*time.Millisecond)
		}
	}()
	defer func() { close(stop); wg.Wait() }()

	// The transfer is pumped throughout each gap.
	seed := uint64(1)
	var d time.Duration
	res := make(chan error, 1)
	go func() {
		var err error
		d, err = breakAndWait(b, []string{"rule", "del", "pref", pref, "fwmark", mark, "lookup", table},
			"fwmark "+mark+" lookup "+table, "rule")
		res <- err
	}()
	pumpUntil(t, f, &seed, "the rule", res, &d)
	go func() {
		var err error
		d, err = breakAndWait(b, []string{"route", "del", "local", "0.0.0.0/0", "dev", "lo", "table", table},
			"local default dev lo", "route", "show", "table", table)
		res <- err
	}()
	pumpUntil(t, f, &seed, "the local route", res, &d)

	// New connections are proxied again.
	for i := range 3 {
		peer, local, err := probe(b, addr, 5*time.Second)
		if err != nil || !viaProxy(t, b, local, addr) {
			t.Fatalf("connection %d after the restorations: peer %s local %v err %v: want proxied", i, peer, local, err)
		}
	}
	f.finish("the restorations")

	// One line per restoration, naming it.
	var got []string
	err := lab.WaitFor(5*time.Second, func() (bool, error) {
		got = got[:0]
		for _, l := range b.ProxyLog("restored") {
			got = append(got, fmt.Sprintf("%v (%v)", l["what"], l["why"]))
		}
		return len(got) >= 2, nil
	})
	want := []string{ruleWhat + " (deleted)", routeWhat + " (deleted)"}
	if err != nil || !slices.Equal(got, want) {
		t.Errorf("restored lines = %q, want %q\n%s", got, want, b.Proxy.Stderr())
	}

	// The counts since start, on SIGUSR1.
	if err := b.Proxy.Signal(syscall.SIGUSR1); err != nil {
		t.Fatal(err)
	}
	var line lab.LogLine
	if err := lab.WaitFor(5*time.Second, func() (bool, error) {
		ls := b.ProxyLog("restorations")
		if len(ls) > 0 {
			line = ls[0]
		}
		return len(ls) > 0, nil
	}); err != nil {
		t.Fatalf("no restorations line on SIGUSR1: %v", err)
	}
	if line["total"] != float64(2) || !strings.Contains(fmt.Sprint(line["items"]), ruleWhat+"=1") ||
		!strings.Contains(fmt.Sprint(line["items"]), routeWhat+"=1") {
		t.Errorf("restorations line = %v", line)
	}
	// `check` reports them too: the box works, but something removes
	// what it relies on.
	out, _ := b.Ghostwire("check")
	if !strings.Contains(out, "restored since it started: ") || !strings.Contains(out, ruleWhat+" (1×)") || !strings.Contains(out, routeWhat+" (1×)") {
		t.Errorf("check after the restorations:\n%s", out)
	}
}
