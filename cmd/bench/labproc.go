package main

import (
	"errors"
	"fmt"
	"os/exec"
	"strings"
	"syscall"
	"time"

	"github.com/ghostwire/ghostwire/lab"
)

// labPID is the PID of a process the lab started (ip netns exec execs the
// command in place, so it is the command's own PID).
func labPID(p *lab.Process) int { return p.PID() }

// labStop sends SIGTERM to p, waits up to timeout for it to exit, then
// sends SIGKILL. A process that had already exited on its own is an error
// (with the tail of its stderr): a proxy must not die under the bench.
func labStop(p *lab.Process, timeout time.Duration) error {
	select {
	case <-p.Done():
		return fmt.Errorf("pid %d had exited before the bench stopped it (%v): %s", p.PID(), p.Wait(), tail(p.Stderr(), 400))
	default:
	}
	err := p.Stop(syscall.SIGTERM, timeout)
	var exit *exec.ExitError
	if err == nil || errors.As(err, &exit) {
		return nil // exited; its status after SIGTERM is its own business
	}
	return fmt.Errorf("pid %d: %w", p.PID(), err)
}

// exitedEarly reports whether p has already exited, with its stderr tail.
func exitedEarly(p *lab.Process) error {
	select {
	case <-p.Done():
		return fmt.Errorf("pid %d exited (%v): %s", p.PID(), p.Wait(), tail(p.Stderr(), 400))
	default:
		return nil
	}
}

func tail(b []byte, n int) string {
	s := strings.TrimSpace(string(b))
	if len(s) > n {
		s = "…" + s[len(s)-n:]
	}
	return s
}
