package rules

import (
	"crypto/rand"
	"encoding/hex"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"testing"

	"github.com/google/nftables"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
)

// testNS is a throwaway named network namespace with handles into it.
type testNS struct {
	name string
	ns   netns.NsHandle
	nft  *nftables.Conn
	nl   *netlink.Handle
}

// newTestNS requires root (and no -short), creates a namespace named "gwr" + random hex (so
// leftovers are recognisable) with lo up, and deletes it when t ends.
func newTestNS(t *testing.T) *testNS {
	t.Helper()
	if testing.Short() {
		t.Skip("kernel round-trip test in a network namespace; skipped with -short")
	}
	if os.Geteuid() != 0 {
		t.Skip("needs root (CAP_NET_ADMIN): creates network namespaces and programs nftables")
	}
	for _, tool := range []string{"ip", "nft"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("needs %s to read kernel state back (make deps): %v", tool, err)
		}
	}
	var b [4]byte
	if _, err := rand.Read(b[:]); err != nil {
		t.Fatal(err)
	}
	name := "gwr" + hex.EncodeToString(b[:])

	ns, err := createNamed(name)
	if err != nil {
		t.Fatalf("creating netns %s: %v", name, err)
	}
	t.Cleanup(func() {
		ns.Close()
		if err := netns.DeleteNamed(name); err != nil {
			t.Errorf("deleting netns %s: %v", name, err)
		}
	})
	tn := &testNS{name: name, ns: ns}
	tn.nft, err = nftables.New(nftables.WithNetNSFd(int(ns)))
	if err != nil {
		t.Fatalf("nftables conn in %s: %v", name, err)
	}
	tn.nl, err = netlink.NewHandleAt(ns)
	if err != nil {
		t.Fatalf("netlink handle in %s: %v", name, err)
	}
	t.Cleanup(tn.nl.Close)
	lo, err := tn.nl.LinkByName("lo")
	if err != nil {
		t.Fatal(err)
	}
	if err := tn.nl.LinkSetUp(lo); err != nil {
		t.Fatalf("setting lo up: %v", err)
	}
	return tn
}

// createNamed makes the namespace on a locked thread and switches that
// thread back. If switching back fails the thread stays locked, so the
// runtime discards it instead of reusing a thread in the wrong namespace.
func createNamed(name string) (netns.NsHandle, error) {
	runtime.LockOSThread()
	orig, err := netns.Get()
	if err != nil {
		runtime.UnlockOSThread()
		return 0, err
	}
	defer orig.Close()
	ns, err := netns.NewNamed(name)
	if err != nil {
		if serr := netns.Set(orig); serr == nil {
			runtime.UnlockOSThread()
		}
		return 0, err
	}
	if err := netns.Set(orig); err != nil {
		ns.Close()
		return 0, err
	}
	runtime.UnlockOSThread()
	return ns, nil
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
