//go:build linux

package lab

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// netnsDir is where iproute2 looks for named namespaces.
const netnsDir = "/run/netns"

// NS is a named network namespace, bind-mounted at /run/netns/Name so that
// `ip netns` sees it. NS holds no file descriptor: every method opens the
// namespace by path, so an NS outlives nothing and leaks nothing.
type NS struct {
	Name string
}

// Path returns the namespace's bind mount, /run/netns/Name.
func (ns *NS) Path() string { return filepath.Join(netnsDir, ns.Name) }

func (ns *NS) open() (netns.NsHandle, error) {
	h, err := netns.GetFromPath(ns.Path())
	if err != nil {
		return netns.None(), fmt.Errorf("opening network namespace %s: %w", ns.Name, err)
	}
	return h, nil
}

// Do runs fn on a locked OS thread switched into ns, then switches the thread
// back. Sockets created by fn stay in ns after Do returns; goroutines started
// by fn do not run in ns. If fn panics, Do panics with the same value; if fn
// calls runtime.Goexit (t.FailNow, t.Fatal), so does Do, so t.Fatal inside
// fn behaves as in the calling test.
func (ns *NS) Do(fn func() error) error {
	target, err := ns.open()
	if err != nil {
		return err
	}
	defer target.Close()

	type result struct {
		err      error
		panicked bool
		value    any
		goexit   bool
	}
	resc := make(chan result, 1)
	// A separate goroutine keeps the caller's thread untouched. It is
	// unlocked only once switched back: if that fails the goroutine exits
	// still locked and the runtime discards the thread rather than let
	// another goroutine run in the wrong namespace.
	go func() {
		runtime.LockOSThread()
		var res result
		returned := false
		orig, err := netns.Get()
		if err != nil {
			resc <- result{err: fmt.Errorf("opening the current network namespace: %w", err)}
			return
		}
		defer orig.Close()
		if err := netns.Set(target); err != nil {
			runtime.UnlockOSThread()
			resc <- result{err: fmt.Errorf("entering network namespace %s: %w", ns.Name, err)}
			return
		}
		defer func() {
			if !returned {
				res.value = recover()
				res.panicked = res.value != nil
				res.goexit = !res.panicked
			}
			if err := netns.Set(orig); err != nil {
				res.err = errors.Join(res.err, fmt.Errorf("leaving network namespace %s: %w", ns.Name, err))
			} else {
				runtime.UnlockOSThread()
			}
			resc <- res
		}()
		res.err = fn()
		returned = true
	}()
	res := <-resc
	switch {
	case res.panicked:
		panic(res.value)
	case res.goexit:
		runtime.Goexit()
	}
	return res.err
}

// Command returns a command that runs name with args in ns through
// `ip netns exec`, which also mounts a /sys matching the namespace. ip execs
// name, so the started process's PID is name's own.
func (ns *NS) Command(ctx context.Context, name string, args ...string) *exec.Cmd {
	return exec.CommandContext(ctx, "ip", append([]string{"netns", "exec", ns.Name, name}, args...)...)
}

// Netlink returns a netlink handle whose sockets live in ns. The caller
// closes it.
func (ns *NS) Netlink() (*netlink.Handle, error) {
	h, err := ns.open()
	if err != nil {
		return nil, err
	}
	defer h.Close()
	nh, err := netlink.NewHandleAt(h)
	if err != nil {
		return nil, fmt.Errorf("opening netlink handle in %s: %w", ns.Name, err)
	}
	return nh, nil
}

// Sysctl writes value to the sysctl key inside ns. key is dotted
// (net.ipv4.ip_forward) or, as with sysctl(8), slash-separated when a
// component contains a dot (net/ipv6/conf/eth0.100/accept_dad).
func (ns *NS) Sysctl(key, value string) error {
	return ns.sysctls([][2]string{{key, value}})
}

// SysctlT sets key to value in ns until the test ends, then puts back
// what it was.
func (ns *NS) SysctlT(tb testing.TB, key, value string) {
	tb.Helper()
	old, err := ns.ReadSysctl(key)
	if err != nil {
		tb.Fatal(err)
	}
	if err := ns.Sysctl(key, value); err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() {
		if err := ns.Sysctl(key, old); err != nil {
			tb.Error(err)
		}
	})
}

// sysctls writes several key/value pairs in one namespace switch.
func (ns *NS) sysctls(kvs [][2]string) error {
	return ns.Do(func() error {
		for _, kv := range kvs {
			path, err := sysctlPath(kv[0])
			if err != nil {
				return err
			}
			// /proc/sys/net resolves against the opening thread's namespace,
			// which is why this runs inside Do.
			if err := os.WriteFile(path, []byte(kv[1]), 0); err != nil {
				return fmt.Errorf("setting sysctl %s=%q in %s: %w", kv[0], kv[1], ns.Name, err)
			}
		}
		return nil
	})
}

// ReadSysctl reads the sysctl key inside ns, without the trailing newline.
// Key syntax is as for Sysctl.
func (ns *NS) ReadSysctl(key string) (string, error) {
	path, err := sysctlPath(key)
	if err != nil {
		return "", err
	}
	var b []byte
	err = ns.Do(func() error {
		var err error
		b, err = os.ReadFile(path)
		return err
	})
	if err != nil {
		return "", fmt.Errorf("reading sysctl %s in %s: %w", key, ns.Name, err)
	}
	return strings.TrimSuffix(string(b), "\n"), nil
}

func sysctlPath(key string) (string, error) {
	if !strings.Contains(key, "/") {
		key = strings.ReplaceAll(key, ".", "/")
	}
	for _, part := range strings.Split(key, "/") {
		if part == "" || part == "." || part == ".." {
			return "", fmt.Errorf("invalid sysctl key %q", key)
		}
	}
	return filepath.Join("/proc/sys", key), nil
}

// createNS creates the named namespace. netns.NewNamed unshares the calling
// thread into it, so it runs on a locked thread of its own that is switched
// back and only unlocked if that worked (else the runtime discards it).
func createNS(name string) (*NS, error) {
	// Best effort: an orphan that cannot be deleted now is tried again by
	// the next lab, and names are unique, so it never collides.
	_, _ = sweepOrphans()
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := netns.Get()
		if err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("opening the current network namespace: %w", err)
			return
		}
		defer orig.Close()
		h, err := netns.NewNamed(name)
		if err == nil {
			h.Close()
		}
		// NewNamed may have unshared before failing: switch back regardless.
		if serr := netns.Set(orig); serr != nil {
			errc <- errors.Join(err, fmt.Errorf("returning from new network namespace %s: %w", name, serr))
			return
		}
		runtime.UnlockOSThread()
		errc <- err
	}()
	if err := <-errc; err != nil {
		return nil, fmt.Errorf("creating network namespace %s: %w", name, err)
	}
	ns := &NS{Name: name}
	if err := recordOwner(name, ""); err != nil {
		return nil, errors.Join(err, deleteNS(ns))
	}
	return ns, nil
}

// deleteNS removes the namespace's bind mount; the kernel frees the
// namespace once no process or socket holds it. Repeating it is harmless.
func deleteNS(ns *NS) error {
	path := ns.Path()
	if err := unix.Unmount(path, unix.MNT_DETACH); err != nil && !errors.Is(err, unix.ENOENT) && !errors.Is(err, unix.EINVAL) {
		return fmt.Errorf("unmounting network namespace %s: %w", ns.Name, err)
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("removing network namespace %s: %w", ns.Name, err)
	}
	return forgetOwner(ns.Name)
}

// WaitNoTentative waits up to timeout for IPv6 duplicate address detection
// to finish on every address in ns: until then the kernel neither uses a
// new address nor answers neighbour solicitations for it, so the first
// IPv6 packets of a test would wait for a retransmit.
func (ns *NS) WaitNoTentative(timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for delay := 5 * time.Millisecond; ; delay = min(2*delay, 200*time.Millisecond) {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		out, err := ns.Command(ctx, "ip", "-6", "addr", "show", "tentative").CombinedOutput()
		cancel()
		if err == nil && strings.TrimSpace(string(out)) == "" {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("IPv6 duplicate address detection in %s did not finish within %s: %s", ns.Name, timeout, out)
		}
		time.Sleep(delay) // polling interval of a bounded wait: the kernel sends no event we could wait on here
	}
}

// Handle opens ns for callers that take a namespace handle (netlink,
// nftables.WithNetNSFd); the caller closes it.
func (ns *NS) Handle() (netns.NsHandle, error) { return ns.open() }
