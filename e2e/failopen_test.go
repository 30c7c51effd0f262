package e2e

import (
	"fmt"
	"io"
	"net"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/ghostwire/ghostwire/lab"
)

// probe makes one short connection and returns the peer address the server
// saw and the client's own address.
func probe(b *lab.Appliance, addr string, timeout time.Duration) (peer string, local net.Addr, err error) {
	c, err := lab.Dial(b.Lab.Client, "tcp", addr, timeout)
	if err != nil {
		return "", nil, err
	}
	return probeOver(c, timeout)
}

// viaProxy reports whether the connection from local to the server at
// addr went through the box's proxy. The proxy's upstream leg keeps the
// client's address and port, so the server sees the same peer either way;
// but a proxied connection leaves the box holding a socket of that 4-tuple
// (established, closing or in TIME_WAIT for a minute after) and a
// bridged one leaves none. (A leg that fell back to another port, which a
// fresh lab does not cause, would read as bridged.)
func viaProxy(t *testing.T, b *lab.Appliance, local net.Addr, addr string) bool {
	t.Helper()
	// ss takes host:port as net.JoinHostPort writes it (IPv6 in brackets).
	return strings.TrimSpace(sh(t, b.Lab.Box, "ss", "-Htan", "src", local.String(), "dst", addr)) != ""
}

// probeOver is probe's exchange over c, which it closes: one byte out,
// the peer line and the byte echoed back.
func probeOver(c *net.TCPConn, timeout time.Duration) (peer string, local net.Addr, err error) {
	defer c.Close()
	c.SetDeadline(time.Now().Add(timeout))
	io.WriteString(c, "x")
	c.CloseWrite()
	got, err := io.ReadAll(c)
	if err != nil {
		return "", nil, err
	}
	line, rest, _ := strings.Cut(string(got), "\n")
	if rest != "x" {
		return "", nil, fmt.Errorf("echo came back as %q", rest)
	}
	return strings.TrimPrefix(line, "peer="), c.LocalAddr(), nil
}

// kill -9 of the proxy mid-transfer: new connections go straight through
// (bridged: the server sees the client's own address and port) within 1 s;
// the in-flight proxied transfer ends (it is lost) but does not hang.
func TestKill9FailsOpenWithin1s(t *testing.T) {
	b := proxiedBox(t, 80)
	addr := listenServer(t, b, b.Lab.ServerIP4.String(), "80", peerServer)

	// A transfer in flight through the proxy.
	inflight, err := lab.Dial(b.Lab.Client, "tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer inflight.Close()
	transferDone := make(chan error, 1)
	go func() {
		_, err := stream(inflight, 1<<40, 7) // until it breaks
		transferDone <- err
	}()
	// And a proxied probe, proving interception before the kill.
	if peer, local, err := probe(b, addr, 5*time.Second); err != nil || !viaProxy(t, b, local, addr) {
		t.Fatalf("before the kill: probe peer %s local %v err %v: want a proxied connection", peer, local, err)
	}

	if err := b.Proxy.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	killed := time.Now()
	<-b.Proxy.Done()

	// A stream of new connections: the first success must come within 1 s,
	// and it must be bridged, not proxied.
	var firstOK time.Duration
	for i := 0; time.Since(killed) < 3*time.Second; i++ {
		peer, local, err := probe(b, addr, 500*time.Millisecond)
		if err != nil {
			if firstOK > 0 {
				t.Errorf("connection %d at +%s failed after the wire was back: %v", i, time.Since(killed), err)
			}
			continue
		}
		if peer != local.String() || viaProxy(t, b, local, addr) {
			t.Errorf("after the kill, server saw %s for client %s, and the box holds it: still proxied?", peer, local)
		}
		if firstOK == 0 {
			firstOK = time.Since(killed)
		}
	}
	t.Logf("first bridged connection succeeded %s after kill -9", firstOK)
	if firstOK == 0 || firstOK > time.Second {
		t.Errorf("new connections succeeded only %s after kill -9, want within 1s", firstOK)
	}
	select {
	case err := <-transferDone:
		if err == nil {
			t.Error("the in-flight transfer reported success after its proxy died")
		}
	case <-time.After(10 * time.Second):
		t.Error("the in-flight transfer hangs after kill -9")
	}
	b.Proxy = nil
	if st, _ := b.Status(); !strings.HasPrefix(st, "ghostwire: bypassing") {
		t.Errorf("status after kill -9 = %q, want bypassing", st)
	}
}

// A flow that started while the proxy was down keeps working after the
// proxy returns (not hijacked midway), and new connections are proxied again.
func TestRestartResumesInterceptionOldFlowsSurvive(t *testing.T) {
	b := proxiedBox(t, 80)
	addr := listenServer(t, b, b.Lab.ServerIP4.String(), "80", peerServer)
	if err := b.StopProxy(syscall.SIGKILL); err == nil {
		t.Fatal("SIGKILL reported a clean exit")
	}

	old, err := lab.Dial(b.Lab.Client, "tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatalf("connection while the proxy is down: %v", err)
	}
	defer old.Close()
	old.SetDeadline(time.Now().Add(30 * time.Second))
	rd := newLineReader(old)
	if peer := rd.line(t); peer != "peer="+old.LocalAddr().String() {
		t.Fatalf("while down the server saw %q, want the client itself %s", peer, old.LocalAddr())
	}
	echo := func(msg string) {
		t.Helper()
		if _, err := io.WriteString(old, msg); err != nil {
			t.Fatalf("old flow write: %v", err)
		}
		if got := rd.n(t, len(msg)); got != msg {
			t.Fatalf("old flow echo = %q, want %q", got, msg)
		}
	}
	echo("before restart;")

	if err := b.StartProxy(); err != nil {
		t.Fatal(err)
	}
	peer, local, err := probe(b, addr, 5*time.Second)
	if err != nil {
		t.Fatalf("new connection after restart: %v", err)
	}
	if peer != local.String() || !viaProxy(t, b, local, addr) {
		t.Errorf("after restart the server saw %s for %s, want the client's own address, through the proxy", peer, local)
	}
	waitConnLog(t, b, local)

	echo(strings.Repeat("after restart;", 10000)) // well past one window
	old.CloseWrite()
	if rest, err := io.ReadAll(rd); err != nil || len(rest) != 0 {
		t.Fatalf("old flow did not end cleanly: %q, %v", rest, err)
	}
	if ls := b.ConnLogFor(old.LocalAddr()); len(ls) != 0 {
		t.Errorf("the flow from the down period was hijacked by the proxy: %v", ls)
	}
}

// `ghostwire status` in each state.
func TestStatusStates(t *testing.T) {
	needRoot(t)
	b := newBox(t, 80)
	want := func(stage, prefix string, code int) {
		t.Helper()
		out, got, err := b.StatusOutput()
		if st, _, _ := strings.Cut(out, "\n"); err != nil || !strings.HasPrefix(st, prefix) || got != code {
			t.Errorf("%s: status = %q, exit %d (%v), want %q, exit %d", stage, st, got, err, prefix, code)
		}
	}
	want("before apply", "ghostwire: not provisioned", 4)
	if _, err := b.Ghostwire("apply", "--no-diversion"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if b.Proxy != nil {
			b.StopProxy(syscall.SIGTERM)
		}
		b.Ghostwire("teardown")
	})
	want("provisioned, no proxy", "ghostwire: bypassing", 3)
	if err := b.StartProxy(); err != nil {
		t.Fatal(err)
	}
	want("proxy running", "ghostwire: intercepting", 0)
	// One proxied connection, ended: the running proxy's own view joins
	// the status, with the client and server among the busiest.
	addr := listenServer(t, b, b.Lab.ServerIP4.String(), "80", peerServer)
	_, local, err := probe(b, addr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if err := lab.WaitFor(5*time.Second, func() (bool, error) { return len(b.ConnLogFor(local)) > 0, nil }); err != nil {
		t.Fatalf("the proxied connection's end was not logged: %v", err)
	}
	out, _, _ := b.StatusOutput()
	if !strings.Contains(out, "owned by the running proxy") || !strings.Contains(out, "provisioning: in place") ||
		!strings.Contains(out, "since start: 1 connections accepted") ||
		!strings.Contains(out, "busiest clients: "+b.Lab.ClientIP4.String()+" (") ||
		!strings.Contains(out, "busiest servers: "+b.Lab.ServerIP4.String()+" (") ||
		!strings.Contains(out, "rules that matched") || !strings.Contains(out, "inet   tcp syn") {
		t.Errorf("status while intercepting:\n%s", out)
	}
	if _, err := b.Ghostwire("teardown"); err == nil {
		t.Error("teardown succeeded under a running proxy")
	}
	b.StopProxy(syscall.SIGKILL)
	want("proxy killed", "ghostwire: bypassing", 3)
	if _, err := b.Ghostwire("teardown"); err != nil {
		t.Fatal(err)
	}
	want("after teardown", "ghostwire: not provisioned", 4)
	b.Proxy = nil
}
