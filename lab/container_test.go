//go:build linux

package lab

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// TestContainer: the container runs systemd as PID 1 in the namespace it
// was given, with CAP_NET_ADMIN and a writable /proc/sys/net; its writes
// stay out of the cached image; Exec reports exit statuses and Run fails
// on them; Close leaves nothing behind.
func TestContainer(t *testing.T) {
	ns := NewNST(t)
	c := NewContainerT(t, ns.Name, ns)
	ctx := context.Background()

	if out, err := c.Run(ctx, "cat", "/proc/1/comm"); err != nil || strings.TrimSpace(out) != "systemd" {
		t.Errorf("PID 1 inside is %q (%v), want systemd", out, err)
	}
	if out, err := c.Run(ctx, "hostname"); err != nil || strings.TrimSpace(out) != c.Name {
		t.Errorf("hostname inside is %q (%v), want %s", out, err, c.Name)
	}
	// A sysctl set inside shows in ns from outside: same namespace, and
	// /proc/sys/net writable.
	if _, err := c.Run(ctx, "sh", "-c", "echo 1 > /proc/sys/net/ipv4/ip_forward"); err != nil {
		t.Fatal(err)
	}
	if v, err := ns.ReadSysctl("net.ipv4.ip_forward"); err != nil || v != "1" {
		t.Errorf("net.ipv4.ip_forward set inside reads %q (%v) in %s, want 1", v, err, ns.Name)
	}
	out, err := c.Run(ctx, "grep", "^CapBnd:", "/proc/1/status")
	if err != nil {
		t.Fatal(err)
	}
	if bnd, err := strconv.ParseUint(strings.TrimSpace(strings.TrimPrefix(out, "CapBnd:")), 16, 64); err != nil || bnd&(1<<unix.CAP_NET_ADMIN) == 0 {
		t.Errorf("PID 1's bounding set %q (%v) lacks CAP_NET_ADMIN", out, err)
	}

	// Writes land in the overlay, never in the image.
	if _, err := c.Run(ctx, "sh", "-c", "echo inside > /etc/ghostwire-container-test"); err != nil {
		t.Fatal(err)
	}
	if b, err := os.ReadFile(filepath.Join(c.Root, "etc/ghostwire-container-test")); err != nil || string(b) != "inside\n" {
		t.Errorf("a file written inside reads %q (%v) through Root", b, err)
	}
	image := RootfsPath(ContainerCacheDir, ContainerSuite, ContainerPackages)
	if _, err := os.Stat(filepath.Join(image, "etc/ghostwire-container-test")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("a file written inside reached the cached image %s: %v", image, err)
	}

	if r, err := c.Exec(ctx, "sh", "-c", "echo out; echo err >&2; exit 3"); err != nil || r.Code != 3 || r.Stdout != "out\n" || r.Stderr != "err\n" {
		t.Errorf("Exec of exit 3 = %+v, %v; want code 3, out, err", r, err)
	}
	if _, err := c.Run(ctx, "sh", "-c", "echo why >&2; exit 3"); err == nil || !strings.Contains(err.Error(), "exit status 3") || !strings.Contains(err.Error(), "why") || !strings.Contains(err.Error(), "`sh -c") {
		t.Errorf("Run of exit 3: %v; want an error naming the command, the status and the output", err)
	}

	pid1 := c.PID1()
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	if err := c.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
	if _, err := os.Stat(c.Root); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("the container's root %s is still there after Close: %v", c.Root, err)
	}
	if err := unix.Kill(pid1, 0); !errors.Is(err, unix.ESRCH) {
		if comm, _ := os.ReadFile(fmt.Sprintf("/proc/%d/comm", pid1)); strings.TrimSpace(string(comm)) == "systemd" {
			t.Errorf("the container's systemd (pid %d) survived Close", pid1)
		}
	}
	if _, err := c.Exec(ctx, "true"); err == nil {
		t.Error("Exec after Close succeeded")
	}
}
