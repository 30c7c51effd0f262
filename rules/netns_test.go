package rules

import (
	"os/exec"
	"strings"
	"testing"

	"github.com/google/nftables"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"

	"github.com/ghostwire/ghostwire/lab"
)

// testNS is a throwaway named network namespace with handles into it.
type testNS struct {
	name string
	ns   netns.NsHandle
	nft  *nftables.Conn
	nl   *netlink.Handle
}

// newTestNS requires root (and no -short) and a throwaway namespace from
// lab (named with a unique prefix, lo up, deleted when t ends), with
// handles into it.
func newTestNS(t *testing.T) *testNS {
	t.Helper()
	if testing.Short() {
		t.Skip("kernel round-trip test in a network namespace; skipped with -short")
	}
	for _, tool := range []string{"ip", "nft"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("needs %s to read kernel state back (make deps): %v", tool, err)
		}
	}
	ln := lab.NewNST(t)
	ns, err := ln.Handle()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ns.Close() })
	tn := &testNS{name: ln.Name, ns: ns}
	tn.nft, err = nftables.New(nftables.WithNetNSFd(int(ns)))
	if err != nil {
		t.Fatalf("nftables conn in %s: %v", ln.Name, err)
	}
	tn.nl, err = netlink.NewHandleAt(ns)
	if err != nil {
		t.Fatalf("netlink handle in %s: %v", ln.Name, err)
	}
	t.Cleanup(tn.nl.Close)
	return tn
}

// lasting opens a lasting nftables connection into the namespace.
func (n *testNS) lasting(t *testing.T) *nftables.Conn {
	t.Helper()
	c, err := nftables.New(nftables.AsLasting(), nftables.WithNetNSFd(int(n.ns)))
	if err != nil {
		t.Fatalf("lasting nftables conn: %v", err)
	}
	t.Cleanup(func() { c.CloseLasting() })
	return c
}

// run runs a command inside the namespace and returns its stdout.
func (n *testNS) run(t *testing.T, args ...string) string {
	t.Helper()
	out, err := n.try(args...)
	if err != nil {
		t.Fatalf("%s: %v", strings.Join(args, " "), err)
	}
	return out
}

func (n *testNS) try(args ...string) (string, error) {
	cmd := exec.Command("ip", append([]string{"netns", "exec", n.name}, args...)...)
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return string(out), &cmdError{err: err, stderr: stderr.String()}
	}
	return string(out), nil
}

type cmdError struct {
	err    error
	stderr string
}

func (e *cmdError) Error() string { return e.err.Error() + ": " + strings.TrimSpace(e.stderr) }
