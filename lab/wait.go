//go:build linux

package lab

import (
	"fmt"
	"net"
	"time"
)

const (
	waitFirstBackoff = 5 * time.Millisecond
	waitMaxBackoff   = 200 * time.Millisecond
	waitMaxDial      = time.Second
)

// WaitTCP waits until a TCP listener at addr ("192.0.2.2:80",
// "[2001:db8:1::2]:80") accepts a connection dialled from ns, retrying with
// backoff for at most timeout. The probe connection is closed at once, so
// the listener sees one empty connection.
func (l *Lab) WaitTCP(ns *NS, addr string, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	return ns.Do(func() error {
		backoff := waitFirstBackoff
		for {
			remaining := time.Until(deadline)
			if remaining <= 0 {
				return fmt.Errorf("waiting %v for a TCP listener at %s from %s: timed out", timeout, addr, ns.Name)
			}
			// The dial runs on this goroutine, so its socket is made in ns.
			d := net.Dialer{Timeout: min(remaining, waitMaxDial)}
			c, err := d.Dial("tcp", addr)
			if err == nil {
				return c.Close()
			}
			if time.Until(deadline) <= backoff {
				return fmt.Errorf("waiting %v for a TCP listener at %s from %s: %w", timeout, addr, ns.Name, err)
			}
			time.Sleep(backoff)
			backoff = min(2*backoff, waitMaxBackoff)
		}
	})
}
