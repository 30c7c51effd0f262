//go:build linux

package lab

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// A Container is a Debian root filesystem booted under systemd-nspawn with
// a real systemd as PID 1, for tests that drive the installed units as an
// operator would. Its root is an overlay over a cached, read-only image
// (see Rootfs), so nothing a test does inside reaches the cache, and
// containers booted at once share one image. Commands run inside through
// nsenter into PID 1's namespaces, which works with no systemd on the host
// (machinectl needs one).
type Container struct {
	Name string // machine name and hostname
	// Root is the container's / as the host sees it (the overlay's merged
	// directory): files written here are at once visible inside.
	Root string
	// NS is the network namespace the container runs in.
	NS *NS

	dir     string // holds upper/, work/ and Root
	cmd     *exec.Cmd
	console syncBuffer // nspawn's output: the boot messages
	done    chan struct{}
	waitErr error // cmd.Wait's result, set before done is closed

	pid1  int // the container's PID 1, as the host sees it
	pidfd int // a pidfd of pid1: signals never hit a reused PID

	closeOnce sync.Once
	closeErr  error
}

const (
	// ContainerSuite is the Debian release the container runs: the
	// distribution the units are written for (systemd 252).
	ContainerSuite = "bookworm"
	// ContainerCacheDir keeps built root filesystems between runs.
	ContainerCacheDir = "/var/cache/ghostwire-test"

	containerBootTimeout = 30 * time.Second
	containerStopTimeout = 15 * time.Second
	containerExecTimeout = 60 * time.Second
	rootfsBuildTimeout   = 10 * time.Minute
)

// ContainerPackages is what Rootfs installs on top of mmdebstrap's minbase
// variant: systemd as init, and the tools a test reads state back with.
var ContainerPackages = []string{"systemd", "systemd-sysv", "dbus", "iproute2", "nftables", "procps"}

// NewContainerT boots a container named name (a lab prefix suits: it is a
// valid hostname) in network namespace ns, and shuts it down in
// tb.Cleanup. The root filesystem comes from the cache, or is built first
// (tens of seconds and a Debian mirror, once). It skips the test with
// -short, without root, without systemd-nspawn or nsenter, or without
// mmdebstrap when nothing is cached.
func NewContainerT(tb testing.TB, name string, ns *NS) *Container {
	tb.Helper()
	if testing.Short() {
		tb.Skip("boots systemd in a container (building its root filesystem first if not cached); skipped with -short")
	}
	if os.Geteuid() != 0 {
		tb.Skip("needs root to boot a systemd-nspawn container: run as root, e.g. sudo go test")
	}
	for _, tool := range []struct{ bin, pkg string }{{"systemd-nspawn", "systemd-container"}, {"nsenter", "util-linux"}} {
		if _, err := exec.LookPath(tool.bin); err != nil {
			tb.Skipf("needs %s to boot systemd in a container (apt-get install %s, or make deps)", tool.bin, tool.pkg)
		}
	}
	root := RootfsPath(ContainerCacheDir, ContainerSuite, ContainerPackages)
	if _, err := os.Stat(root); err != nil {
		if _, err := exec.LookPath("mmdebstrap"); err != nil {
			tb.Skipf("needs mmdebstrap to build the container's root filesystem (apt-get install mmdebstrap, or make deps); nothing cached at %s", root)
		}
	}
	start := time.Now()
	root, built, err := Rootfs(ContainerCacheDir, ContainerSuite, ContainerPackages)
	if err != nil {
		tb.Fatal(err)
	}
	if built {
		tb.Logf("built the container root filesystem %s in %s", root, time.Since(start).Round(time.Millisecond))
	}
	start = time.Now()
	c, err := StartContainer(name, root, ns)
	if err != nil {
		tb.Fatal(err)
	}
	tb.Logf("container %s booted (systemd running) in %s", name, time.Since(start).Round(time.Millisecond))
	tb.Cleanup(func() {
		if err := c.Close(); err != nil {
			tb.Errorf("shutting down container %s: %v", name, err)
		}
	})
	return c
}

// RootfsPath is where Rootfs keeps the image for suite and packages: one
// directory per package set, so changing ContainerPackages builds anew
// rather than reusing an image without the new package.
func RootfsPath(cacheDir, suite string, packages []string) string {
	pkgs := slices.Clone(packages)
	slices.Sort(pkgs)
	sum := sha256.Sum256([]byte("minbase\n" + suite + "\n" + strings.Join(pkgs, ",")))
	return filepath.Join(cacheDir, "rootfs-"+suite+"-"+hex.EncodeToString(sum[:6]))
}

// Rootfs returns the cached root filesystem of Debian suite (minbase plus
// packages), building it with mmdebstrap first if needed; built says
// whether it did. The build goes to a temporary directory next to the
// cache entry and is renamed into place only once complete, so a killed
// build never leaves a half image behind; a lock file serialises
// concurrent builders (test binaries of several packages run at once).
// The image must be treated as read-only: StartContainer mounts it as an
// overlay's lower layer.
func Rootfs(cacheDir, suite string, packages []string) (path string, built bool, err error) {
	path = RootfsPath(cacheDir, suite, packages)
	if _, err := os.Stat(path); err == nil {
		return path, false, nil
	}
	if err := os.MkdirAll(cacheDir, 0o755); err != nil {
		return "", false, fmt.Errorf("creating the rootfs cache %s: %w", cacheDir, err)
	}
	lock, err := os.OpenFile(filepath.Join(cacheDir, ".lock"), os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		return "", false, fmt.Errorf("opening the rootfs cache lock: %w", err)
	}
	defer lock.Close()
	if err := unix.Flock(int(lock.Fd()), unix.LOCK_EX); err != nil {
		return "", false, fmt.Errorf("locking the rootfs cache %s: %w", cacheDir, err)
	}
	defer unix.Flock(int(lock.Fd()), unix.LOCK_UN)
	// Another builder may have finished while this one waited.
	if _, err := os.Stat(path); err == nil {
		return path, false, nil
	}
	// With the lock held nobody else is building: any partial build left
	// here is from a killed run.
	if stale, err := filepath.Glob(filepath.Join(cacheDir, ".build-*")); err == nil {
		for _, s := range stale {
			if err := removeUnmounted(s); err != nil {
				return "", false, err
			}
		}
	}
	tmp, err := os.MkdirTemp(cacheDir, ".build-")
	if err != nil {
		return "", false, fmt.Errorf("creating a build directory in %s: %w", cacheDir, err)
	}
	defer removeUnmounted(tmp)
	ctx, cancel := context.WithTimeout(context.Background(), rootfsBuildTimeout)
	defer cancel()
	// unshare mode: as root it keeps ownership right and does its mounts
	// (proc, sys, dev in the chroot) in a mount namespace of its own, so a
	// killed build leaves none behind in the host's.
	build := filepath.Join(tmp, "root")
	args := []string{"--mode=unshare", "--variant=minbase", "--include=" + strings.Join(packages, ","), suite, build}
	cmd := exec.CommandContext(ctx, "mmdebstrap", args...)
	cmd.WaitDelay = 5 * time.Second
	// If the test is killed, so is mmdebstrap; and whatever of it lingers
	// still holds the lock (inherited), so the next builder waits for it
	// instead of deleting the directory under its feet.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	cmd.ExtraFiles = []*os.File{lock}
	if out, err := cmd.CombinedOutput(); err != nil {
		return "", false, fmt.Errorf("building the container rootfs: mmdebstrap %s: %w\n%s", strings.Join(args, " "), err, out)
	}
	if err := os.Rename(build, path); err != nil {
		return "", false, fmt.Errorf("moving the built rootfs into the cache: %w", err)
	}
	return path, true, nil
}

// StartContainer boots image (a Rootfs path, left untouched) under
// systemd-nspawn in network namespace ns, and returns once systemd inside
// reports the system running (or degraded). The container gets its own
// mount, PID, UTS and IPC namespaces and a writable overlay over image,
// discarded by Close. It keeps CAP_NET_ADMIN and a writable /proc/sys/net,
// as a box that configures its own network needs.
func StartContainer(name, image string, ns *NS) (ret *Container, err error) {
	dir, err := os.MkdirTemp("", "ghostwire-ct-"+name+"-")
	if err != nil {
		return nil, fmt.Errorf("creating the container directory: %w", err)
	}
	c := &Container{Name: name, Root: filepath.Join(dir, "root"), NS: ns, dir: dir, pidfd: -1, done: make(chan struct{})}
	if err := recordOwner(containerRecord(dir), dir); err != nil {
		os.Remove(dir)
		return nil, err
	}
	defer func() {
		if err != nil {
			err = errors.Join(err, c.Close())
			ret = nil
		}
	}()
	for _, d := range []string{"upper", "work", "root"} {
		if err := os.Mkdir(filepath.Join(dir, d), 0o755); err != nil {
			return c, fmt.Errorf("creating the overlay's %s: %w", d, err)
		}
	}
	// An overlay of our own rather than nspawn's --volatile=overlay: nspawn
	// locks the directory it boots, which would keep two containers off one
	// image, and its own upper directory is left behind if nspawn is killed.
	opts := "lowerdir=" + image + ",upperdir=" + filepath.Join(dir, "upper") + ",workdir=" + filepath.Join(dir, "work")
	if err := unix.Mount("overlay", c.Root, "overlay", 0, opts); err != nil {
		return c, fmt.Errorf("mounting the container's overlay root (%s) on %s: %w", opts, c.Root, err)
	}

	// mmdebstrap copies the build host's /etc/hostname into the image, and
	// systemd would set that rather than nspawn's machine name.
	if err := os.WriteFile(filepath.Join(c.Root, "etc/hostname"), []byte(name+"\n"), 0o644); err != nil {
		return c, fmt.Errorf("setting the container's hostname: %w", err)
	}

	// --network-namespace-path joins ns; --private-network with it is what
	// makes nspawn treat that namespace as the container's own: it keeps
	// CAP_NET_ADMIN and mounts /proc/sys/net writable (without it
	// /proc/sys/net is read-only and provisioning cannot set its sysctls).
	// --register=no and --keep-unit: there may be no systemd on the host to
	// register with or to ask for a scope.
	args := []string{
		"--directory=" + c.Root, "--boot", "--machine=" + name,
		"--network-namespace-path=" + ns.Path(), "--private-network",
		"--capability=CAP_NET_ADMIN",
		"--register=no", "--keep-unit",
		"--console=read-only",
	}
	c.cmd = exec.Command("systemd-nspawn", args...)
	// A cgroup v1 host would otherwise hand systemd 252 a legacy hierarchy.
	c.cmd.Env = append(os.Environ(), "SYSTEMD_NSPAWN_UNIFIED_HIERARCHY=1")
	c.cmd.Stdout = &c.console
	c.cmd.Stderr = &c.console
	// SIGTERM, not SIGKILL: nspawn turns it into an orderly shutdown of
	// the container, whereas a SIGKILLed nspawn orphans the container.
	c.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGTERM}
	if err := c.cmd.Start(); err != nil {
		return c, fmt.Errorf("starting systemd-nspawn %s: %w", strings.Join(args, " "), err)
	}
	go func() {
		c.waitErr = c.cmd.Wait()
		close(c.done)
	}()

	if err := c.waitBooted(); err != nil {
		return c, err
	}
	return c, nil
}

// waitBooted finds the container's PID 1 and waits for its systemd to
// finish booting.
func (c *Container) waitBooted() error {
	exited := func() error {
		select {
		case <-c.done:
			return fmt.Errorf("systemd-nspawn exited while booting container %s: %v\nconsole:\n%s", c.Name, c.waitErr, c.console.Bytes())
		default:
			return nil
		}
	}
	err := WaitFor(containerBootTimeout, func() (bool, error) {
		if err := exited(); err != nil {
			return false, err
		}
		pid, ok := containerInit(c.cmd.Process.Pid)
		if !ok {
			return false, nil
		}
		fd, err := unix.PidfdOpen(pid, 0)
		if err != nil {
			return false, fmt.Errorf("opening a pidfd for container %s's PID 1 (%d): %w", c.Name, pid, err)
		}
		c.pid1, c.pidfd = pid, fd
		return true, nil
	})
	if err != nil {
		return fmt.Errorf("finding container %s's PID 1: %w\nconsole:\n%s", c.Name, err, c.console.Bytes())
	}
	// nspawn's child is PID 1 before it execs systemd; until systemd is up
	// systemctl cannot connect, which polling covers like "starting".
	var last string
	err = WaitFor(containerBootTimeout, func() (bool, error) {
		if err := exited(); err != nil {
			return false, err
		}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		r, err := c.Exec(ctx, "systemctl", "is-system-running")
		if err != nil {
			return false, err
		}
		last = strings.TrimSpace(r.Stdout + r.Stderr)
		return last == "running" || last == "degraded", nil
	})
	if err != nil {
		return fmt.Errorf("waiting for systemd in container %s to finish booting (last state %q): %w\nconsole:\n%s", c.Name, last, err, c.console.Bytes())
	}
	return nil
}

// containerInit returns the child of nspawn (pid) that is PID 1 of a PID
// namespace of its own: the container's init.
func containerInit(nspawn int) (int, bool) {
	children, err := os.ReadFile(fmt.Sprintf("/proc/%d/task/%d/children", nspawn, nspawn))
	if err != nil {
		return 0, false
	}
	for _, f := range strings.Fields(string(children)) {
		pid, err := strconv.Atoi(f)
		if err != nil {
			continue
		}
		status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
		if err != nil {
			continue
		}
		for _, line := range strings.Split(string(status), "\n") {
			if rest, ok := strings.CutPrefix(line, "NSpid:"); ok {
				ids := strings.Fields(rest)
				if len(ids) > 1 && ids[len(ids)-1] == "1" {
					return pid, true
				}
			}
		}
	}
	return 0, false
}

// PID1 returns the container's init (systemd) as the host sees it.
func (c *Container) PID1() int { return c.pid1 }

// Console returns what the container has written to its console so far
// (systemd's boot and shutdown messages).
func (c *Container) Console() []byte { return c.console.Bytes() }

// Done is closed once systemd-nspawn has exited.
func (c *Container) Done() <-chan struct{} { return c.done }

// Command returns a command running name with args inside the container:
// in all of PID 1's namespaces (mount, UTS, IPC, network, PID), so it sees
// the container's files, processes and systemd. Its environment is a
// fixed minimal one, not the test's.
func (c *Container) Command(ctx context.Context, name string, args ...string) *exec.Cmd {
	nsargs := []string{"-t", strconv.Itoa(c.pid1), "-m", "-u", "-i", "-n", "-p", "--", name}
	cmd := exec.CommandContext(ctx, "nsenter", append(nsargs, args...)...)
	cmd.Env = []string{
		"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
		"LANG=C.UTF-8", "SYSTEMD_PAGER=", "SYSTEMD_COLORS=0", "TERM=dumb",
	}
	// A daemon started by the command could hold its pipes open for ever.
	cmd.WaitDelay = 5 * time.Second
	return cmd
}

// ExecResult is the outcome of a command run with Exec.
type ExecResult struct {
	Stdout, Stderr string
	Code           int // exit status; -1 if killed by a signal
}

// Exec runs name with args inside the container (see Command) and
// returns its output and exit status. A non-zero exit is not an error:
// many commands (systemctl is-active, ghostwire status) answer by it.
// The error is for a command that could not run or did not finish (ctx,
// or at most a minute).
func (c *Container) Exec(ctx context.Context, name string, args ...string) (ExecResult, error) {
	select {
	case <-c.done:
		return ExecResult{}, fmt.Errorf("running %s in container %s: the container has exited", quoteCmd(name, args), c.Name)
	default:
	}
	ctx, cancel := context.WithTimeout(ctx, containerExecTimeout)
	defer cancel()
	var stdout, stderr bytes.Buffer
	cmd := c.Command(ctx, name, args...)
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	r := ExecResult{Stdout: stdout.String(), Stderr: stderr.String(), Code: cmd.ProcessState.ExitCode()}
	var exit *exec.ExitError
	if err != nil && !(errors.As(err, &exit) && ctx.Err() == nil) {
		return r, fmt.Errorf("running %s in container %s: %w\nstdout:\n%s\nstderr:\n%s", quoteCmd(name, args), c.Name, err, r.Stdout, r.Stderr)
	}
	return r, nil
}

// Run is Exec for a command that must succeed: a non-zero exit is an
// error naming the command and carrying its output. It returns stdout.
func (c *Container) Run(ctx context.Context, name string, args ...string) (string, error) {
	r, err := c.Exec(ctx, name, args...)
	if err != nil {
		return r.Stdout, err
	}
	if r.Code != 0 {
		return r.Stdout, fmt.Errorf("running %s in container %s: exit status %d\nstdout:\n%s\nstderr:\n%s", quoteCmd(name, args), c.Name, r.Code, r.Stdout, r.Stderr)
	}
	return r.Stdout, nil
}

func quoteCmd(name string, args []string) string {
	q := []string{name}
	for _, a := range args {
		if a == "" || strings.ContainsAny(a, " \t\n'\"$\\") {
			a = strconv.Quote(a)
		}
		q = append(q, a)
	}
	return "`" + strings.Join(q, " ") + "`"
}

// Close shuts the container down and removes every trace of it: SIGTERM
// to nspawn (an orderly poweroff of the container), SIGKILL to nspawn and
// to the container's PID 1 (which takes its whole PID namespace with it)
// after a bounded wait, then the overlay is unmounted and its directory
// removed. Calling it again returns the first call's result.
func (c *Container) Close() error {
	c.closeOnce.Do(func() { c.closeErr = c.close() })
	return c.closeErr
}

func (c *Container) close() error {
	var errs []error
	if c.cmd != nil && c.cmd.Process != nil {
		_ = c.cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-c.done:
		case <-time.After(containerStopTimeout):
			errs = append(errs, fmt.Errorf("container %s did not power off within %s of SIGTERM to systemd-nspawn; killed\nconsole:\n%s", c.Name, containerStopTimeout, c.console.Bytes()))
			_ = c.cmd.Process.Signal(syscall.SIGKILL)
			select {
			case <-c.done:
			case <-time.After(killWait):
				errs = append(errs, fmt.Errorf("systemd-nspawn (pid %d) still running %s after SIGKILL", c.cmd.Process.Pid, killWait))
			}
		}
	}
	if c.pidfd >= 0 {
		// nspawn normally reaps its container; this catches an orphaned one.
		if err := unix.PidfdSendSignal(c.pidfd, unix.SIGKILL, nil, 0); err == nil {
			if !pidfdExited(c.pidfd, killWait) {
				errs = append(errs, fmt.Errorf("container %s's PID 1 (%d) still running %s after SIGKILL", c.Name, c.pid1, killWait))
			}
		} else if !errors.Is(err, unix.ESRCH) {
			errs = append(errs, fmt.Errorf("killing container %s's PID 1 (%d): %w", c.Name, c.pid1, err))
		}
		unix.Close(c.pidfd)
		c.pidfd = -1
	}
	if err := removeContainerDir(c.dir); err != nil {
		errs = append(errs, err)
	} else if err := forgetOwner(containerRecord(c.dir)); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// removeContainerDir unmounts the overlay root inside a container
// directory and removes the directory.
func removeContainerDir(dir string) error {
	if err := unmountRetry(filepath.Join(dir, "root")); err != nil {
		return err
	}
	return removeUnmounted(dir)
}

// removeUnmounted removes dir and everything in it, unless something is
// still mounted inside (os.RemoveAll would walk into the mount: a
// bind-mounted /dev, or the overlay's lower layer, the cache itself).
func removeUnmounted(dir string) error {
	info, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return fmt.Errorf("reading mountinfo before removing %s: %w", dir, err)
	}
	for _, line := range strings.Split(string(info), "\n") {
		// Field 5 is the mount point, with space, tab, newline and
		// backslash octal-escaped; none of those are in the paths here.
		f := strings.Fields(line)
		if len(f) > 4 && (f[4] == dir || strings.HasPrefix(f[4], dir+"/")) {
			return fmt.Errorf("not removing %s: %s is still mounted", dir, f[4])
		}
	}
	if err := os.RemoveAll(dir); err != nil {
		return fmt.Errorf("removing %s: %w", dir, err)
	}
	return nil
}

// pidfdExited waits up to timeout for the process behind fd to exit (a
// pidfd polls readable then).
func pidfdExited(fd int, timeout time.Duration) bool {
	deadline := time.Now().Add(timeout)
	for {
		ms := int(time.Until(deadline).Milliseconds())
		if ms <= 0 {
			return false
		}
		n, err := unix.Poll([]unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}, ms)
		if err == unix.EINTR {
			continue
		}
		return err == nil && n > 0
	}
}

// unmountRetry unmounts the overlay at dir. Right after the container
// dies a process of it may still be exiting with the mount busy, so EBUSY
// is retried briefly before falling back to a lazy unmount.
func unmountRetry(dir string) error {
	var err error
	for range 50 {
		err = unix.Unmount(dir, 0)
		if err == nil || errors.Is(err, unix.EINVAL) || errors.Is(err, unix.ENOENT) { // EINVAL: not mounted (never, or already)
			return nil
		}
		if !errors.Is(err, unix.EBUSY) {
			break
		}
		time.Sleep(20 * time.Millisecond) // bounded retry of a busy unmount
	}
	if lerr := unix.Unmount(dir, unix.MNT_DETACH); lerr != nil {
		return fmt.Errorf("unmounting the container overlay %s: %w (lazy unmount: %v)", dir, err, lerr)
	}
	return nil
}
