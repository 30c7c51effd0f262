//go:build linux

package lab

import (
	"bufio"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"
)

// orphanEnv makes the test binary, run again as a child, build a lab and
// a container directory (a tmpfs standing in for the overlay root), print
// the lab's prefix and the directory, and wait to be killed (see TestMain).
const orphanEnv = "GHOSTWIRE_LAB_ORPHAN"

func TestMain(m *testing.M) {
	if os.Getenv(orphanEnv) != "" {
		l, err := New(UniquePrefix())
		if err != nil {
			os.Stderr.WriteString(err.Error() + "\n")
			os.Exit(1)
		}
		dir, err := orphanContainerDir()
		if err != nil {
			os.Stderr.WriteString(err.Error() + "\n")
			os.Exit(1)
		}
		os.Stdout.WriteString(l.Prefix + " " + dir + "\n")
		select {} // until killed: Close never runs
	}
	os.Exit(m.Run())
}

// A process killed with its lab open (no Close, no t.Cleanup) leaves its
// namespaces behind; the next namespace made on the machine deletes them,
// and leaves a live owner's alone.
func TestKilledOwnerSwept(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root (CAP_NET_ADMIN, CAP_SYS_ADMIN): run as root, e.g. sudo go test")
	}
	if testing.Short() {
		t.Skip("builds a lab in a child process; skipped with -short")
	}
	live := NewT(t) // ours: must survive the sweep
	cmd := exec.Command(os.Args[0])
	cmd.Env = append(os.Environ(), orphanEnv+"=1")
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	line, err := bufio.NewReader(out).ReadString('\n')
	prefix, dir, ok := strings.Cut(strings.TrimSpace(line), " ")
	if err != nil || !ok {
		cmd.Process.Kill()
		cmd.Wait()
		t.Fatalf("the child built no lab: %q, %v", line, err)
	}
	orphans := []string{prefix + "-client", prefix + "-box", prefix + "-server"}
	t.Cleanup(func() { // whatever the sweep left
		for _, n := range orphans {
			deleteNS(&NS{Name: n})
		}
		removeContainerDir(dir)
		forgetOwner(containerRecord(dir))
	})
	cmd.Process.Signal(syscall.SIGKILL)
	cmd.Wait()
	for _, n := range orphans {
		if !slices.Contains(netnsList(t), n) {
			t.Fatalf("namespace %s is gone with no sweep: the test no longer shows the hole", n)
		}
	}
	if _, err := os.Stat(filepath.Join(dir, "root")); err != nil {
		t.Fatalf("the container directory is gone with no sweep: %v", err)
	}

	NewNST(t) // making any namespace sweeps
	have := netnsList(t)
	for _, n := range orphans {
		if slices.Contains(have, n) {
			t.Errorf("namespace %s of a killed process was not swept", n)
		}
		if _, err := os.Stat(ownerDir + "/" + n); err == nil {
			t.Errorf("the owner record of %s is still there", n)
		}
	}
	if _, err := os.Stat(dir); err == nil {
		t.Errorf("the container directory %s of a killed process was not removed", dir)
	}
	if _, err := os.Stat(filepath.Join(ownerDir, containerRecord(dir))); err == nil {
		t.Errorf("the owner record of %s is still there", dir)
	}
	for _, n := range []string{live.Prefix + "-client", live.Prefix + "-box", live.Prefix + "-server"} {
		if !slices.Contains(have, n) {
			t.Errorf("the sweep deleted %s, whose owner (this process) runs", n)
		}
	}
}

// orphanContainerDir makes a directory laid out as StartContainer's, with
// a tmpfs mounted on its root, recorded as this process's.
func orphanContainerDir() (string, error) {
	dir, err := os.MkdirTemp("", "ghostwire-ct-orphan-")
	if err != nil {
		return "", err
	}
	if err := os.Mkdir(filepath.Join(dir, "root"), 0o755); err != nil {
		return "", err
	}
	if err := unix.Mount("tmpfs", filepath.Join(dir, "root"), "tmpfs", 0, "size=1m"); err != nil {
		return "", err
	}
	return dir, recordOwner(containerRecord(dir), dir)
}
