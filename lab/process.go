//go:build linux

package lab

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"sync"
	"syscall"
	"time"
)

const (
	// closeGrace is how long Close lets a process handle SIGTERM.
	closeGrace = 3 * time.Second
	// killWait bounds the wait for a SIGKILLed process to be reaped.
	killWait = 5 * time.Second
)

// Process is a command started in a lab namespace with Lab.Start. Its
// standard output and error are kept in memory.
type Process struct {
	name   string
	cmd    *exec.Cmd
	stdout syncBuffer
	stderr syncBuffer
	done   chan struct{}
	err    error // Wait's result, set before done is closed
}

// Start runs name with args in ns (through `ip netns exec`) and tracks it:
// Close stops it if it is still running. Start fails if name is not found,
// rather than leaving that to ip's exit status.
func (l *Lab) Start(ns *NS, name string, args ...string) (*Process, error) {
	if _, err := exec.LookPath(name); err != nil {
		return nil, fmt.Errorf("starting %s in %s: %w", name, ns.Name, err)
	}
	p := &Process{name: name, done: make(chan struct{})}
	p.cmd = ns.Command(context.Background(), name, args...)
	p.cmd.Stdout = &p.stdout
	p.cmd.Stderr = &p.stderr
	// If the test binary dies without running Close, the kernel kills the
	// child too. The signal follows the spawning OS thread, so this relies on
	// Start not being called from a locked thread that is about to exit.
	p.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}

	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed {
		return nil, fmt.Errorf("starting %s in %s: lab %s is closed", name, ns.Name, l.Prefix)
	}
	if err := p.cmd.Start(); err != nil {
		return nil, fmt.Errorf("starting %s in %s: %w", name, ns.Name, err)
	}
	l.procs = append(l.procs, p)
	go p.wait()
	return p, nil
}

func (p *Process) wait() {
	p.err = p.cmd.Wait()
	close(p.done)
}

// PID returns the process ID. It is that of name itself, because ip execs
// name after switching namespaces; until then the PID still runs ip.
func (p *Process) PID() int { return p.cmd.Process.Pid }

// Done is closed once the process has exited and been reaped.
func (p *Process) Done() <-chan struct{} { return p.done }

// Wait waits for the process to exit and returns its exit error, as
// exec.Cmd.Wait does. It may be called any number of times.
func (p *Process) Wait() error {
	<-p.done
	return p.err
}

// Signal sends sig to the process; signalling an exited process is not an
// error.
func (p *Process) Signal(sig syscall.Signal) error {
	// os.Process signals through a pidfd, so a reused PID is never hit.
	if err := p.cmd.Process.Signal(sig); err != nil && !errors.Is(err, os.ErrProcessDone) {
		return fmt.Errorf("sending %v to %s (pid %d): %w", sig, p.name, p.PID(), err)
	}
	return nil
}

// Stop sends sig, waits up to timeout for the process to exit, then sends
// SIGKILL (at once if timeout ≤ 0). It returns the exit error as Wait does
// (so a process killed by the signal reports "signal: terminated"), or an
// error saying the process survived SIGKILL.
func (p *Process) Stop(sig syscall.Signal, timeout time.Duration) error {
	select {
	case <-p.done:
		return p.err
	default:
	}
	if timeout > 0 {
		if err := p.Signal(sig); err != nil {
			return err
		}
		t := time.NewTimer(timeout)
		defer t.Stop()
		select {
		case <-p.done:
			return p.err
		case <-t.C:
		}
	}
	if err := p.Signal(syscall.SIGKILL); err != nil {
		return err
	}
	t := time.NewTimer(killWait)
	defer t.Stop()
	select {
	case <-p.done:
		return p.err
	case <-t.C:
		return fmt.Errorf("stopping %s (pid %d): still running %v after SIGKILL", p.name, p.PID(), killWait)
	}
}

// Stdout returns a copy of what the process has written to standard output.
func (p *Process) Stdout() []byte { return p.stdout.Bytes() }

// Stderr returns a copy of what the process has written to standard error.
func (p *Process) Stderr() []byte { return p.stderr.Bytes() }

// syncBuffer is a bytes.Buffer safe to read while exec copies into it.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) Bytes() []byte {
	b.mu.Lock()
	defer b.mu.Unlock()
	return bytes.Clone(b.buf.Bytes())
}
