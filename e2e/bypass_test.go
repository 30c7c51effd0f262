package e2e

import (
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/ghostwire/ghostwire/lab"
)

// bypassCmd runs `ghostwire bypass SUB -c CONFIG ARGS...` in the box (the
// flags before the address: urfave/cli stops at the first argument).
func bypassCmd(b *lab.Appliance, sub string, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	out, err := b.Lab.Box.Command(ctx, b.Bin, append([]string{"bypass", sub, "-c", b.Config}, args...)...).CombinedOutput()
	return string(out), err
}

func mustBypass(t *testing.T, b *lab.Appliance, sub string, args ...string) string {
	t.Helper()
	out, err := bypassCmd(b, sub, args...)
	if err != nil {
		t.Fatalf("bypass %s %v: %v\n%s", sub, args, err, out)
	}
	return out
}

// TestBypassLive: `bypass add` of a client while its transfer runs keeps
// the transfer in the proxy to its end, every byte intact, and bridges the
// client's new connections; `bypass del` proxies them again; `--for`
// expires by itself; `status --json` carries the proxy's counters.
func TestBypassLive(t *testing.T) {
	b, servers := selectionBox(t)
	c1 := b.Lab.ClientIP4
	f := startInflight(t, b, c1, servers[0])
	pump := f.pump
	pump(1)

	if out := mustBypass(t, b, "add", c1.String()); !strings.Contains(out, "added 192.0.2.1/32 permanent") {
		t.Errorf("bypass add said %q", out)
	}
	pump(2)
	wantPath(t, b, "listed client, new connection", c1, servers[0], false)
	wantPath(t, b, "other client", client2, servers[0], true)
	pump(3)
	if out := mustBypass(t, b, "list"); out != "192.0.2.1/32 permanent\n" {
		t.Errorf("bypass list = %q", out)
	}
	if out := sh(t, b.Lab.Box, "nft", "list", "set", "bridge", "ghostwire", "bypass_hosts4"); !strings.Contains(out, "192.0.2.1") {
		t.Errorf("bypass_hosts4:\n%s", out)
	}
	f.finish("bypass add")
	waitConnLog(t, b, f.c.LocalAddr())

	// A server address works too.
	mustBypass(t, b, "add", server2.String()+"/32")
	wantPath(t, b, "listed server", client2, servers[1], false)
	mustBypass(t, b, "del", server2.String())

	mustBypass(t, b, "del", c1.String())
	wantPath(t, b, "deleted client", c1, servers[0], true)
	if out := mustBypass(t, b, "list"); out != "" {
		t.Errorf("bypass list after del = %q", out)
	}
	if out, err := bypassCmd(b, "del", c1.String()); err == nil || !strings.Contains(out, "not in the bypass list") {
		t.Errorf("second del: %v %s", err, out)
	}
	if out, err := bypassCmd(b, "add", "192.0.2.999"); err == nil || !strings.Contains(out, "bad prefix") {
		t.Errorf("bad add: %v %s", err, out)
	}

	// --for: bridged, then proxied again once the entry expires.
	if out := mustBypass(t, b, "add", "--for", "2s", c1.String()); !strings.Contains(out, " until ") {
		t.Errorf("bypass add --for said %q", out)
	}
	wantPath(t, b, "client listed for 2s", c1, servers[0], false)
	// Both the kernel's element and the daemon's list expire by
	// themselves: wait for them to, then the client is proxied again.
	if err := lab.WaitFor(10*time.Second, func() (bool, error) {
		set := sh(t, b.Lab.Box, "nft", "list", "set", "bridge", "ghostwire", "bypass_hosts4")
		return !strings.Contains(set, c1.String()) && mustBypass(t, b, "list") == "", nil
	}); err != nil {
		t.Fatalf("the 2s entry did not expire: %v", err)
	}
	wantPath(t, b, "client's entry expired", c1, servers[0], true)

	out, _, err := b.StatusOutput("--json")
	if err != nil {
		t.Fatal(err)
	}
	var st struct {
		Mode  string
		Proxy *struct{ Accepted uint64 }
	}
	if err := json.Unmarshal([]byte(out), &st); err != nil || st.Mode != "intercepting" || st.Proxy == nil || st.Proxy.Accepted < 3 {
		t.Errorf("status --json: %v\n%s", err, out)
	}
}

// TestBypassRestart: the list survives a restart of ghostwire run (the
// expired entries do not); with the proxy stopped, bypass add says so and
// changes nothing.
func TestBypassRestart(t *testing.T) {
	b, servers := selectionBox(t)
	c1 := b.Lab.ClientIP4
	mustBypass(t, b, "add", c1.String())
	mustBypass(t, b, "add", "--for", "1h", "198.51.100.0/24")
	mustBypass(t, b, "add", "--for", "1s", "203.0.113.7")
	wantPath(t, b, "listed client", c1, servers[0], false)
	if err := b.StopProxy(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(b.ControlSocket()); !os.IsNotExist(err) {
		t.Errorf("control socket left after exit: %v", err)
	}
	file := filepath.Join(b.Dir, "bypass.json")
	before, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	out, err := bypassCmd(b, "add", client2.String())
	want := "ghostwire run is not running (no control socket at " + b.ControlSocket() + "): nothing changed"
	if err == nil || !strings.Contains(out, want) {
		t.Errorf("bypass add with the proxy stopped: %v %q, want %q", err, out, want)
	}
	if after, _ := os.ReadFile(file); string(after) != string(before) {
		t.Errorf("bypass.json changed with the proxy stopped:\n%s\n->\n%s", before, after)
	}
	time.Sleep(time.Second) // 203.0.113.7 expires meanwhile

	if err := b.StartProxy(); err != nil {
		t.Fatal(err)
	}
	list := mustBypass(t, b, "list")
	lines := strings.Split(strings.TrimSpace(list), "\n")
	if len(lines) != 2 || lines[0] != "192.0.2.1/32 permanent" || !strings.HasPrefix(lines[1], "198.51.100.0/24 until ") {
		t.Errorf("bypass list after restart = %q", list)
	}
	if out := sh(t, b.Lab.Box, "nft", "list", "set", "bridge", "ghostwire", "bypass_hosts4"); !strings.Contains(out, "192.0.2.1") ||
		!strings.Contains(out, "198.51.100.0/24 timeout") || strings.Contains(out, "203.0.113.7") {
		t.Errorf("bypass_hosts4 after restart:\n%s", out)
	}
	wantPath(t, b, "other client", client2, servers[0], true)
	wantPath(t, b, "listed client after restart", c1, servers[0], false)
}
