package proxy

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"syscall"

	"golang.org/x/sys/unix"
)

// connectTransparent starts a non-blocking connect to remote from the
// client's IP, so the server sees the
// client's address rather than the box's. The socket's first writable or
// error event says how it ended.
//
// The client's own port is not reused: the box's transparent TIME_WAIT
// sockets from earlier connections would collide with it under load
// (EADDRINUSE). IP_BIND_ADDRESS_NO_PORT lets connect pick the port per
// 4-tuple instead of reserving one per client IP at bind time.
//
// The return path works because the server's replies to the client's IP
// reach the box (the bridge redirects them) and the nft `socket
// transparent 1` rule marks them for local delivery.
func connectTransparent(client netip.Addr, remote netip.AddrPort, rcvbuf int) (int, error) {
	lsa, err := sockaddr(netip.AddrPortFrom(client, 0))
	if err != nil {
		return -1, err
	}
	rsa, err := sockaddr(remote)
	if err != nil {
		return -1, err
	}
	v6 := !remote.Addr().Is4()
	return newSocket(v6, unix.SOCK_STREAM, func(fd int) error {
		for _, set := range []func(uintptr) error{
			func(fd uintptr) error { return setTransparent(fd, v6) },
			setAbortOnClose,
			func(fd uintptr) error { return setReceiveBuffer(fd, rcvbuf) },
			setNoDelay,
			setBindNoPort,
		} {
			if err := set(uintptr(fd)); err != nil {
				return err
			}
		}
		if err := unix.Bind(fd, lsa); err != nil {
			return err
		}
		if err := unix.Connect(fd, rsa); err != nil && err != unix.EINPROGRESS {
			return err
		}
		return nil
	})
}

// dialReason condenses a dial error into the log's reason, e.g.
// "dial: refused" or "dial: timeout": the client is reset at once either
// way, and this is what says why.
func dialReason(err error) string {
	var errno syscall.Errno
	switch {
	case errors.Is(err, context.DeadlineExceeded), errors.Is(err, os.ErrDeadlineExceeded), errors.Is(err, syscall.ETIMEDOUT):
		return "dial: timeout"
	case errors.As(err, &errno):
		if r, ok := dialErrnos[errno]; ok {
			return "dial: " + r
		}
		return "dial: " + errno.Error()
	default:
		return fmt.Sprintf("dial: %v", err)
	}
}

// dialErrnos name the failures an operator meets, each with what it means
// on this path.
var dialErrnos = map[syscall.Errno]string{
	syscall.ECONNREFUSED:  "refused",
	syscall.ENETUNREACH:   "no route (network unreachable)",
	syscall.EHOSTUNREACH:  "no route (host unreachable)",
	syscall.EADDRNOTAVAIL: "no local port free for this client and server (EADDRNOTAVAIL)",
	syscall.EMFILE:        "out of file descriptors",
	syscall.ENFILE:        "out of file descriptors (system-wide)",
	syscall.ENOBUFS:       "out of kernel memory (ENOBUFS)",
}
