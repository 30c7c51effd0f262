package e2e

import (
	"bufio"
	"crypto/sha256"
	"encoding/hex"
	"io"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/ghostwire/ghostwire/lab"
)

type lineReader struct{ *bufio.Reader }

func newLineReader(r io.Reader) *lineReader { return &lineReader{bufio.NewReader(r)} }

func (r *lineReader) line(t *testing.T) string {
	t.Helper()
	s, err := r.ReadString('\n')
	if err != nil {
		t.Fatalf("reading a line: %v", err)
	}
	return strings.TrimSuffix(s, "\n")
}

func (r *lineReader) n(t *testing.T, n int) string {
	t.Helper()
	b := make([]byte, n)
	if _, err := io.ReadFull(r, b); err != nil {
		t.Fatalf("reading %d bytes: %v", n, err)
	}
	return string(b)
}

// SIGHUP with a new port list: interception follows the new list at once,
// an in-flight transfer on a port that was dropped keeps going to its end,
// and the dropped port stops being diverted once it is idle.
func TestSIGHUPChangesPortsWithoutDropping(t *testing.T) {
	b := proxiedBox(t, 80)
	addr80 := listenServer(t, b, b.Lab.ServerIP4.String(), "80", peerServer)
	addr8080 := listenServer(t, b, b.Lab.ServerIP4.String(), "8080", peerServer)

	inflight, err := lab.Dial(b.Lab.Client, "tcp", addr80, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer inflight.Close()
	inflight.SetDeadline(time.Now().Add(60 * time.Second))
	rd := newLineReader(inflight)
	rd.line(t)
	// Echo traffic through the transfer in both directions, before and
	// after the reload, checking every byte.
	sent, recv := sha256.New(), sha256.New()
	pump := func(seed uint64) {
		t.Helper()
		done := make(chan error, 1)
		go func() { _, err := io.CopyN(recv, rd, 4<<20); done <- err }()
		if _, err := stream(io.MultiWriter(inflight, sent), 4<<20, seed); err != nil {
			t.Fatalf("in-flight write: %v", err)
		}
		if err := <-done; err != nil {
			t.Fatalf("in-flight read: %v", err)
		}
	}
	pump(1)

	if err := b.WriteConfig([]int{8080}, ""); err != nil {
		t.Fatal(err)
	}
	if err := b.Proxy.Signal(syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	if err := lab.WaitFor(10*time.Second, func() (bool, error) { return len(b.ProxyLog("reloaded")) > 0, nil }); err != nil {
		t.Fatalf("no reload: %v\n%s", err, b.Proxy.Stderr())
	}
	pump(2)

	// New connections follow the new list: 8080 proxied, 80 not.
	peer, local, err := probe(b, addr8080, 5*time.Second)
	if err != nil || !viaProxy(t, b, local, addr8080) {
		t.Errorf("8080 after reload: peer %s local %v err %v, want proxied", peer, local, err)
	}
	peer, local, err = probe(b, addr80, 5*time.Second)
	if err != nil || peer != local.String() || viaProxy(t, b, local, addr80) {
		t.Errorf("80 after reload: peer %s local %v err %v, want straight through", peer, local, err)
	}

	pump(3)
	inflight.CloseWrite()
	if rest, err := io.ReadAll(rd); err != nil || len(rest) != 0 {
		t.Fatalf("in-flight transfer did not end cleanly: %d stray bytes, %v", len(rest), err)
	}
	if hex.EncodeToString(sent.Sum(nil)) != hex.EncodeToString(recv.Sum(nil)) {
		t.Error("in-flight transfer corrupted across the reload")
	}
	waitConnLog(t, b, inflight.LocalAddr())
	// With its last proxied connection gone, port 80 leaves the bridge set.
	err = lab.WaitFor(10*time.Second, func() (bool, error) {
		return len(b.ProxyLog("stopped diverting ports with no proxied connections left")) > 0, nil
	})
	if err != nil {
		t.Errorf("port 80 still diverted after its last connection: %v", err)
	}
}

// Config that cannot change live is refused on SIGHUP and the running
// config is kept.
func TestSIGHUPRefusesFixedKeys(t *testing.T) {
	b := proxiedBox(t, 80)
	cfg, err := readFile(b.Config)
	if err != nil {
		t.Fatal(err)
	}
	if err := writeFile(b.Config, strings.Replace(cfg, "tcp_port: 9876", "tcp_port: 9877", 1)); err != nil {
		t.Fatal(err)
	}
	b.Proxy.Signal(syscall.SIGHUP)
	err = lab.WaitFor(10*time.Second, func() (bool, error) { return len(b.ProxyLog("reload refused; keeping the running config")) > 0, nil })
	if err != nil {
		t.Fatalf("no refusal logged: %v\n%s", err, b.Proxy.Stderr())
	}
	if ls := b.ProxyLog("reload refused; keeping the running config"); !strings.Contains(ls[0]["err"].(string), "proxy.tcp_port cannot change on reload") {
		t.Errorf("refusal does not name the key: %v", ls[0])
	}
	addr := listenServer(t, b, b.Lab.ServerIP4.String(), "80", peerServer)
	if peer, local, err := probe(b, addr, 5*time.Second); err != nil || !viaProxy(t, b, local, addr) {
		t.Errorf("after a refused reload: peer %s local %v err %v, want still proxied", peer, local, err)
	}
}
