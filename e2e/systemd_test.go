package e2e

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/ghostwire/ghostwire/lab"
)

// The config path the installed units read.
const unitConfig = "/etc/ghostwire/ghostwire.yaml"

// unitBox is a lab whose box is a booted Debian container with the units
// installed by `make install-files`, driven through systemctl as an
// operator would. The container runs in the lab's box namespace, so the
// box's two NICs are the container's, and the lab's client and server are
// its wire.
type unitBox struct {
	t *testing.T
	c *lab.Container
	b *lab.Appliance // the lab and bridge name, for the shared probes; no binary or config of its own
}

// TestSystemdUnits boots a real systemd as PID 1 in the lab's box and
// checks the units' promises (systemd/ghostwire.service's header): start
// is ready only with the diversion in place, reload, fail-open and restart
// after a crash, the watchdog on a hang, drain on stop, and teardown.
func TestSystemdUnits(t *testing.T) {
	needRoot(t)
	begin := time.Now()
	l := lab.NewT(t)
	c := lab.NewContainerT(t, l.Prefix, l.Box)
	u := &unitBox{t: t, c: c, b: &lab.Appliance{Lab: l, Bridge: l.Prefix + "br"}}
	t.Cleanup(u.dumpOnFailure)
	u.install()
	u.writeConfig("[80]")
	addr80 := listenServer(t, u.b, l.ServerIP4.String(), "80", peerServer)
	addr8080 := listenServer(t, u.b, l.ServerIP4.String(), "8080", peerServer)
	before := snapshot(t, u.b)
	if code, out := u.status(); code != 4 {
		t.Fatalf("before enable: ghostwire status exit %d, want 4 (not provisioned):\n%s", code, out)
	}

	// 1. enable --now: provisioning, then the proxy; start returns on
	// READY=1, which comes only once the diversion is in place.
	step := time.Now()
	u.run("systemctl", "enable", "--now", "ghostwire")
	tables := u.run("nft", "list", "tables")
	for _, want := range []string{"table bridge ghostwire", "table inet ghostwire"} {
		if !strings.Contains(tables, want) {
			t.Errorf("right after `systemctl enable --now ghostwire` returned, %q is missing: READY=1 before the diversion?\nnft list tables:\n%s", want, tables)
		}
	}
	for _, unit := range []string{"ghostwire-provision", "ghostwire"} {
		if st := u.prop(unit, "ActiveState"); st != "active" {
			t.Errorf("after enable --now: %s is %s, want active", unit, st)
		}
		if en := strings.TrimSpace(u.exec("systemctl", "is-enabled", unit).Stdout); en != "enabled" {
			t.Errorf("after enable --now: %s is-enabled %q, want enabled (Also=)", unit, en)
		}
	}
	if code, out := u.status(); code != 0 {
		t.Errorf("after enable --now: ghostwire status exit %d, want 0 (intercepting):\n%s", code, out)
	}
	pid := u.mainPID()
	// The sandbox must leave the proxy what it writes (the live bypass
	// list beside the state file): an error at start says it does not.
	for _, line := range strings.Split(u.journalPID(pid), "\n") {
		if strings.Contains(line, "level=ERROR") {
			t.Errorf("1. the proxy logged an error at start under the unit: %s", line)
		}
	}
	// And an operator's bypass entry is written where a restart finds it.
	u.run("/usr/bin/ghostwire", "bypass", "add", "-c", "/etc/ghostwire/ghostwire.yaml", "198.51.100.7")
	u.run("/usr/bin/ghostwire", "bypass", "del", "-c", "/etc/ghostwire/ghostwire.yaml", "198.51.100.7")
	u.wantProxied("after enable --now", addr80, pid)
	u.wantBridged("after enable --now, port not intercepted", addr8080)
	t.Logf("1. enable --now: active and intercepting in %s", time.Since(step).Round(time.Millisecond))

	// 2. reload with another port list: same process, new ports.
	step = time.Now()
	u.writeConfig("[8080]")
	reloads := strings.Count(u.journalPID(pid), "msg=reloaded")
	u.run("systemctl", "reload", "ghostwire")
	// ExecReload only sends SIGHUP (systemd 252 has no notify-reload):
	// the reload itself is done when the proxy logs it.
	if err := lab.WaitFor(10*time.Second, func() (bool, error) {
		return strings.Count(u.journalPID(pid), "msg=reloaded") > reloads, nil
	}); err != nil {
		t.Fatalf("no reload logged after `systemctl reload ghostwire`: %v\n%s", err, u.journalPID(pid))
	}
	u.wantProxied("after reload, added port", addr8080, pid)
	u.wantBridged("after reload, removed port", addr80)
	if got := u.mainPID(); got != pid {
		t.Errorf("reload changed MainPID from %d to %d: a restart, not a reload", pid, got)
	}
	t.Logf("2. reload: port 8080 proxied, 80 bridged, MainPID %d kept, in %s", pid, time.Since(step).Round(time.Millisecond))

	// 3. SIGKILL: bridged at once, proxied again within 3 s.
	restarts := u.prop("ghostwire", "NRestarts")
	u.run("systemctl", "kill", "-s", "KILL", "ghostwire")
	killed := time.Now()
	u.waitGone(pid, 5*time.Second)
	gone := time.Since(killed)
	peer, local, err := probe(u.b, addr8080, 2*time.Second)
	if err != nil {
		t.Fatalf("a new connection right after the proxy was SIGKILLed: %v: the wire should be a plain bridge", err)
	}
	if peer != local.String() || viaProxy(t, u.b, local, addr8080) {
		t.Errorf("right after SIGKILL: the server saw %s for client %s, or the box holds it: proxied, want bridged", peer, local)
	}
	bridgedAt := time.Since(killed)
	newPID := u.waitReintercept("after SIGKILL", addr8080, pid, killed.Add(3*time.Second))
	backAt := time.Since(killed)
	if got := u.prop("ghostwire", "NRestarts"); got == restarts {
		t.Errorf("NRestarts still %s after the restart", got)
	}
	t.Logf("3. kill -s KILL: process gone +%s, bridged connection done +%s, new MainPID %d intercepting again +%s",
		gone.Round(time.Millisecond), bridgedAt.Round(time.Millisecond), newPID, backAt.Round(time.Millisecond))
	pid = newPID

	// 4. SIGSTOP: the watchdog kills the hung proxy and systemd restarts it.
	u.run("systemctl", "kill", "-s", "STOP", "ghostwire")
	frozen := time.Now()
	u.observeFrozen(addr8080)
	newPID = u.waitReintercept("after SIGSTOP", addr8080, pid, frozen.Add(25*time.Second))
	back := time.Since(frozen)
	// The unit's promise: the watchdog kills a hung proxy with SIGABRT, so
	// the Go runtime leaves its goroutines in the journal.
	j := u.journal("-u", "ghostwire")
	for _, want := range []string{"Watchdog timeout", "SIGABRT", "goroutine "} {
		if !strings.Contains(j, want) {
			t.Errorf("the frozen proxy was replaced, but the journal has no %q:\n%s", want, lastLines(j, 40))
		}
	}
	t.Logf("4. kill -s STOP: watchdog restart, new MainPID %d intercepting again %s after the freeze (WatchdogSec=10s, RestartSec=1s)",
		newPID, back.Round(time.Millisecond))
	pid = newPID

	// 5. stop drains: an established proxied transfer finishes, new
	// connections are bridged meanwhile, and the unit ends inactive.
	step = time.Now()
	f := startInflight(t, u.b, l.ClientIP4, addr8080)
	f.pump(1)
	stopped := make(chan error, 1)
	go func() {
		_, err := u.c.Run(context.Background(), "systemctl", "stop", "ghostwire")
		stopped <- err
	}()
	if err := lab.WaitFor(10*time.Second, func() (bool, error) { return strings.Contains(u.journalPID(pid), "msg=draining"), nil }); err != nil {
		t.Fatalf("`systemctl stop ghostwire`: the proxy did not log draining: %v\n%s", err, u.journalPID(pid))
	}
	u.wantBridged("while draining", addr8080)
	f.pump(2)
	select {
	case err := <-stopped:
		t.Fatalf("`systemctl stop ghostwire` returned (%v) while a proxied transfer was still open: no drain", err)
	default:
	}
	f.finish("systemctl stop")
	select {
	case err := <-stopped:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(15 * time.Second):
		t.Fatal("`systemctl stop ghostwire` still running 15s after the last proxied connection ended")
	}
	for prop, want := range map[string]string{"ActiveState": "inactive", "Result": "success", "ExecMainStatus": "0"} {
		if got := u.prop("ghostwire", prop); got != want {
			t.Errorf("after stop: ghostwire %s=%s, want %s", prop, got, want)
		}
	}
	if st := u.prop("ghostwire-provision", "ActiveState"); st != "active" {
		t.Errorf("stopping ghostwire took provisioning down too: ghostwire-provision is %s", st)
	}
	if code, out := u.status(); code != 3 {
		t.Errorf("after stop: ghostwire status exit %d, want 3 (bypassing):\n%s", code, out)
	}
	if tables := u.run("nft", "list", "tables"); strings.Contains(tables, "ghostwire") {
		t.Errorf("after stop: the diversion is still there:\n%s", tables)
	}
	u.wantBridged("after stop", addr8080)
	u.wantBridged("after stop", addr80)
	if snapshot(t, u.b) == before {
		t.Fatal("the provisioned box looks like the unprovisioned one: step 6's comparison would prove nothing")
	}
	t.Logf("5. stop: drained the in-flight transfer intact, inactive (success), bridging, in %s", time.Since(step).Round(time.Millisecond))

	// 6. stopping provisioning restores the box as it was.
	step = time.Now()
	u.run("systemctl", "stop", "ghostwire-provision")
	if st := u.prop("ghostwire-provision", "ActiveState"); st != "inactive" {
		t.Errorf("after stopping provisioning: ghostwire-provision is %s, want inactive", st)
	}
	if res := u.prop("ghostwire-provision", "Result"); res != "success" {
		t.Errorf("after stopping provisioning: Result=%s, want success (teardown failed?)", res)
	}
	if code, out := u.status(); code != 4 {
		t.Errorf("after stopping provisioning: ghostwire status exit %d, want 4 (not provisioned):\n%s", code, out)
	}
	if after := snapshot(t, u.b); after != before {
		t.Errorf("stopping ghostwire-provision did not restore the box:\n--- before enable\n%s\n--- after stop\n%s", before, after)
	}
	t.Logf("6. stop ghostwire-provision: box restored (bridge, ports, sysctls, rules, routes), in %s", time.Since(step).Round(time.Millisecond))

	// 7. The sandbox, as systemd itself scores it: for the record.
	out := u.run("systemd-analyze", "security", "--no-pager", "ghostwire.service", "ghostwire-provision.service")
	for _, line := range strings.Split(out, "\n") {
		if strings.Contains(line, "exposure") {
			t.Logf("7. systemd-analyze security: %s", strings.TrimSpace(line))
		}
	}
	t.Logf("whole test: %s", time.Since(begin).Round(time.Millisecond))
}

// install runs `make install-files` into the container's root with the
// test's binary, as `make install DESTDIR=` would (without building into
// the source tree), and has systemd load the new units.
func (u *unitBox) install() {
	u.t.Helper()
	repo, err := filepath.Abs("..")
	if err != nil {
		u.t.Fatal(err)
	}
	cmd := exec.Command("make", "-C", repo, "--no-print-directory", "install-files",
		"DESTDIR="+u.c.Root, "PREFIX=/usr", "BIN="+ghostwireBin)
	if out, err := cmd.CombinedOutput(); err != nil {
		u.t.Fatalf("installing into the container: %s: %v\n%s", strings.Join(cmd.Args, " "), err, out)
	}
	u.run("systemctl", "daemon-reload")
}

// writeConfig writes /etc/ghostwire/ghostwire.yaml as an operator would:
// the installed example with the box's NICs, a management address and
// tcp_ports set (ports in YAML flow form, e.g. "[80]").
func (u *unitBox) writeConfig(ports string) {
	u.t.Helper()
	example := filepath.Join(u.c.Root, unitConfig+".example")
	cfg, err := readFile(example)
	if err != nil {
		u.t.Fatalf("reading the installed example config: %v", err)
	}
	l := u.b.Lab
	for _, r := range [][2]string{
		{"  name: br0\n", "  name: " + u.b.Bridge + "\n"},
		{"  client_nic: eth1\n", "  client_nic: " + l.ClientNIC + "\n"},
		{"  server_nic: eth2\n", "  server_nic: " + l.ServerNIC + "\n"},
		{"  addresses: []\n", fmt.Sprintf("  addresses: [%s, %q]\n", l.BoxIP4, l.BoxIP6)},
		{"  tcp_ports: [80, 443]\n", "  tcp_ports: " + ports + "\n"},
	} {
		if n := strings.Count(cfg, r[0]); n != 1 {
			u.t.Fatalf("the example config has %d lines %q, want exactly 1 to edit:\n%s", n, strings.TrimSpace(r[0]), cfg)
		}
		cfg = strings.Replace(cfg, r[0], r[1], 1)
	}
	if err := os.WriteFile(filepath.Join(u.c.Root, unitConfig), []byte(cfg), 0o644); err != nil {
		u.t.Fatalf("writing the container's config: %v", err)
	}
}

// run runs a command in the container that must succeed; it returns stdout.
func (u *unitBox) run(name string, args ...string) string {
	u.t.Helper()
	out, err := u.c.Run(context.Background(), name, args...)
	if err != nil {
		u.t.Fatal(err)
	}
	return out
}

// exec runs a command in the container whose exit status is an answer.
func (u *unitBox) exec(name string, args ...string) lab.ExecResult {
	u.t.Helper()
	r, err := u.c.Exec(context.Background(), name, args...)
	if err != nil {
		u.t.Fatal(err)
	}
	return r
}

// status runs `ghostwire status` in the container: exit 0 intercepting,
// 3 bypassing, 4 not provisioned.
func (u *unitBox) status() (int, string) {
	u.t.Helper()
	r := u.exec("ghostwire", "status", "-c", unitConfig)
	return r.Code, r.Stdout + r.Stderr
}

// prop is one property of a unit, as `systemctl show` gives it.
func (u *unitBox) prop(unit, name string) string {
	u.t.Helper()
	return strings.TrimSpace(u.run("systemctl", "show", "-p", name, "--value", unit))
}

// mainPID is ghostwire.service's main process in the container's PID
// namespace; 0 while none runs.
func (u *unitBox) mainPID() int {
	u.t.Helper()
	v := u.prop("ghostwire", "MainPID")
	pid, err := strconv.Atoi(v)
	if err != nil {
		u.t.Fatalf("MainPID of ghostwire: %q: %v", v, err)
	}
	return pid
}

// journal is the container's journal, messages only.
func (u *unitBox) journal(args ...string) string {
	u.t.Helper()
	return u.run("journalctl", append([]string{"--no-pager", "-o", "cat"}, args...)...)
}

// journalPID is what one process (the proxy under one MainPID) logged.
func (u *unitBox) journalPID(pid int) string {
	u.t.Helper()
	return u.journal("_PID=" + strconv.Itoa(pid))
}

// wantProxied checks a new connection to addr is proxied: the box holds a
// socket of it (viaProxy), and the proxy (pid) logs the connection under
// the client's own address.
func (u *unitBox) wantProxied(what, addr string, pid int) {
	u.t.Helper()
	peer, local, err := probe(u.b, addr, 5*time.Second)
	if err != nil {
		u.t.Fatalf("%s: a connection to %s: %v", what, addr, err)
	}
	if !viaProxy(u.t, u.b, local, addr) {
		u.t.Fatalf("%s: to %s (the server saw %s) the box holds no socket of it: bridged, want proxied", what, addr, peer)
	}
	want := "client=" + local.String()
	if err := lab.WaitFor(10*time.Second, func() (bool, error) { return strings.Contains(u.journalPID(pid), want), nil }); err != nil {
		u.t.Fatalf("%s: the proxy (pid %d) did not log the connection from %s: %v\n%s", what, pid, local, err, lastLines(u.journalPID(pid), 20))
	}
}

// wantBridged checks a new connection to addr crosses the bridge
// untouched: the server sees the client's own address and port, and the
// box holds no socket of it.
func (u *unitBox) wantBridged(what, addr string) {
	u.t.Helper()
	peer, local, err := probe(u.b, addr, 5*time.Second)
	if err != nil {
		u.t.Fatalf("%s: a connection to %s: %v", what, addr, err)
	}
	if peer != local.String() || viaProxy(u.t, u.b, local, addr) {
		u.t.Errorf("%s: to %s the server saw %s for client %s, or the box holds it: proxied, want bridged", what, addr, peer, local)
	}
}

// waitGone waits until process pid of the container has exited (a zombie
// counts: its sockets, and so the owned tables, are gone).
func (u *unitBox) waitGone(pid int, timeout time.Duration) {
	u.t.Helper()
	err := lab.WaitFor(timeout, func() (bool, error) {
		r, err := u.c.Exec(context.Background(), "sh", "-c", fmt.Sprintf("grep '^State:' /proc/%d/status", pid))
		if err != nil {
			return false, err
		}
		return r.Code != 0 || strings.Contains(r.Stdout, "zombie"), nil
	})
	if err != nil {
		u.t.Fatalf("process %d still alive: %v", pid, err)
	}
}

// waitReintercept waits, until deadline, for systemd to have started a new
// proxy (MainPID neither 0 nor old) that proxies a new connection to addr,
// and returns its PID.
func (u *unitBox) waitReintercept(what, addr string, old int, deadline time.Time) int {
	u.t.Helper()
	var pid int
	var last string
	err := lab.WaitFor(time.Until(deadline), func() (bool, error) {
		pid = u.mainPID()
		if pid == 0 || pid == old || u.prop("ghostwire", "ActiveState") != "active" {
			last = fmt.Sprintf("MainPID %d", pid)
			return false, nil
		}
		peer, local, err := probe(u.b, addr, time.Second)
		if err != nil {
			last = fmt.Sprintf("MainPID %d, connection: %v", pid, err)
			return false, nil
		}
		last = fmt.Sprintf("MainPID %d, server saw %s for %s", pid, peer, local)
		return viaProxy(u.t, u.b, local, addr), nil
	})
	if err != nil {
		u.t.Fatalf("%s: not intercepting again in time (last: %s): %v\n%s", what, last, err, lastLines(u.journal("-u", "ghostwire"), 40))
	}
	return pid
}

// observeFrozen records what a new connection to an intercepted port gets
// while the proxy is stopped (SIGSTOP) but its diversion, owned by a live
// process, stays in place. It asserts nothing: the units promise only the
// watchdog's restart.
func (u *unitBox) observeFrozen(addr string) {
	u.t.Helper()
	start := time.Now()
	c, err := lab.Dial(u.b.Lab.Client, "tcp", addr, 2*time.Second)
	if err != nil {
		u.t.Logf("4. while frozen: connect to %s failed after %s: %v", addr, time.Since(start).Round(time.Millisecond), err)
		return
	}
	connected := time.Since(start)
	peer, local, err := probeOver(c, 2*time.Second)
	u.t.Logf("4. while frozen: connect to %s succeeded in %s (the kernel completes the handshake on the stopped proxy's listener); exchange: peer %q local %v err %v",
		addr, connected.Round(time.Millisecond), peer, local, err)
	// The proxy's listening sockets: Recv-Q is their accept queue.
	ss, err := u.c.Run(context.Background(), "ss", "-Htln", "sport = :"+strconv.Itoa(lab.ProxyPort))
	if err != nil {
		u.t.Logf("4. while frozen: %v", err)
		return
	}
	queued := 0
	for _, line := range strings.Split(strings.TrimSpace(ss), "\n") {
		if f := strings.Fields(line); len(f) > 1 {
			n, _ := strconv.Atoi(f[1])
			queued += n
		}
	}
	u.t.Logf("4. while frozen: %d connection(s) wait in the stopped proxy's accept queues (port %d)", queued, lab.ProxyPort)
}

// dumpOnFailure logs the units' journal and state when the test failed.
func (u *unitBox) dumpOnFailure() {
	if !u.t.Failed() {
		return
	}
	for _, args := range [][]string{
		{"systemctl", "status", "--no-pager", "--full", "ghostwire-provision", "ghostwire"},
		{"journalctl", "--no-pager", "-o", "short-monotonic", "-u", "ghostwire-provision", "-u", "ghostwire"},
	} {
		r, err := u.c.Exec(context.Background(), args[0], args[1:]...)
		if err != nil {
			u.t.Logf("%v", err)
			continue
		}
		u.t.Logf("$ %s\n%s%s", strings.Join(args, " "), lastLines(r.Stdout, 150), r.Stderr)
	}
}

// lastLines is the last n lines of s.
func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = append([]string{fmt.Sprintf("[... %d lines]", len(lines)-n)}, lines[len(lines)-n:]...)
	}
	return strings.Join(lines, "\n") + "\n"
}
