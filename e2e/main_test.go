package e2e

import (
	"context"
	"fmt"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/ghostwire/ghostwire/bridge"
	"github.com/ghostwire/ghostwire/lab"
)

// ghostwireBin is built once per test binary (TestMain) for tests that run it.
var ghostwireBin string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "ghostwire-e2e-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	if os.Geteuid() == 0 {
		if ghostwireBin, err = lab.BuildBinary(dir); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// newBox builds a lab and a config for it; the lab is torn down with the
// test (a running proxy is stopped by the lab's Close).
func newBox(t *testing.T, ports ...int) *lab.Appliance {
	t.Helper()
	l := lab.NewT(t)
	b, err := lab.NewAppliance(l, ghostwireBin, t.TempDir(), ports, "")
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// sh runs a command in ns and returns its output; tests read kernel state
// back with nft and ip.
func sh(t *testing.T, ns *lab.NS, name string, args ...string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	out, err := ns.Command(ctx, name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

// snapshot is the box namespace's state that apply touches, as text.
func snapshot(t *testing.T, b *lab.Appliance) string {
	t.Helper()
	waitNoTentative(t, b.Lab.Box)
	var s strings.Builder
	for _, c := range [][]string{
		{"nft", "list", "ruleset"},
		{"ip", "rule"},
		{"ip", "-6", "rule"},
		{"ip", "route", "show", "table", "all"},
		{"ip", "-6", "route", "show", "table", "all"},
		{"ip", "-br", "link"},
		{"ip", "-br", "addr"},
		{"ip", "-o", "link", "show", "master", b.Bridge},
	} {
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		out, _ := b.Lab.Box.Command(ctx, c[0], c[1:]...).CombinedOutput() // "show master" fails once the bridge is gone: that is state too
		cancel()
		fmt.Fprintf(&s, "$ %s\n%s\n", strings.Join(c, " "), out)
	}
	// Every key ghostwire may set, the invisible mode's included.
	all := bridge.Spec{Name: b.Bridge, Ports: []string{b.Lab.ClientNIC, b.Lab.ServerNIC}, Invisible: true}
	for _, sc := range bridge.Sysctls(all) {
		v, err := b.Lab.Box.ReadSysctl(sc.Key)
		if err != nil {
			v = "(absent)"
		}
		fmt.Fprintf(&s, "%s = %s\n", sc.Key, v)
	}
	return s.String()
}

// waitNoTentative waits for IPv6 duplicate address detection to finish, so
// that snapshots do not race the kernel adding local routes.
func waitNoTentative(t *testing.T, ns *lab.NS) {
	t.Helper()
	if err := ns.WaitNoTentative(10 * time.Second); err != nil {
		t.Fatal(err)
	}
}

func needRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root (CAP_NET_ADMIN, CAP_SYS_ADMIN) to build network namespaces")
	}
}

func readFile(p string) (string, error) {
	b, err := os.ReadFile(p)
	return string(b), err
}

func writeFile(p, s string) error { return os.WriteFile(p, []byte(s), 0o644) }
