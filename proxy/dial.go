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
// client's address, port included, so the server sees the client's
// address rather than the box's. The socket's first writable or error
// event says how it ended.
//
// The client's port cannot be had when the box already holds a socket
// with the same 4-tuple (the upstream socket of the client's previous
// connection from that port, still closing, or in TIME_WAIT without
// timestamps: connect fails with EADDRNOTAVAIL) or a listener on the port
// (bind fails with EADDRINUSE). Then a fresh socket connects from a port
// the kernel picks, and notKept says why; the connection goes on.
//
// The return path works because the server's replies to the client's IP
// reach the box (the bridge redirects them) and the nft `socket
// transparent 1` rule marks them for local delivery.
func connectTransparent(client, remote netip.AddrPort, rcvbuf int) (fd int, notKept, err error) {
	fd, taken, err := openUpstream(client, remote, rcvbuf)
	if !taken {
		return fd, nil, err
	}
	fd, _, ferr := openUpstream(netip.AddrPortFrom(client.Addr(), 0), remote, rcvbuf)
	return fd, err, ferr
}

// openUpstream opens the transparent upstream socket, bound to local, and
// starts its connect to remote. Port 0 in local lets connect pick the port.
// taken says err is a conflict over local's port or the 4-tuple, which
// another port may avoid.
func openUpstream(local, remote netip.AddrPort, rcvbuf int) (fd int, taken bool, err error) {
	lsa, err := sockaddr(local)
	if err != nil {
		return -1, false, err
	}
	rsa, err := sockaddr(remote)
	if err != nil {
		return -1, false, err
	}
	v6 := !remote.Addr().Is4()
	fd, err = newSocket(v6, unix.SOCK_STREAM, func(fd int) error {
		for _, set := range []func(uintptr) error{
			func(fd uintptr) error { return setTransparent(fd, v6) },
			setAbortOnClose,
			func(fd uintptr) error { return setReceiveBuffer(fd, rcvbuf) },
			setNoDelay,
			// The box's other sockets on the client's address and port
			// must not stop the bind: its connections to other servers,
			// their TIME_WAITs, a fallback that got the port, and the
			// TIME_WAIT of its last connection to this server, which
			// connect recycles if it had timestamps. The kernel lets a
			// bind share an address and port only if both sockets set
			// SO_REUSEADDR; connect still refuses a taken 4-tuple.
			func(fd uintptr) error { return setReuseAddr(int(fd)) },
		} {
			if err := set(uintptr(fd)); err != nil {
				return err
			}
		}
		if local.Port() == 0 {
			// Without it bind would reserve a port for the client's IP
			// alone, not per 4-tuple.
			if err := setBindNoPort(uintptr(fd)); err != nil {
				return err
			}
		}
		if err := unix.Bind(fd, lsa); err != nil {
			taken = err == unix.EADDRINUSE && local.Port() != 0
			return fmt.Errorf("binding to %v: %w", local, err)
		}
		if err := unix.Connect(fd, rsa); err != nil && err != unix.EINPROGRESS {
			// The kernel checks the 4-tuple within connect, before the
			// SYN, so a conflict is never reported later as SO_ERROR.
			taken = (err == unix.EADDRNOTAVAIL || err == unix.EADDRINUSE) && local.Port() != 0
			return fmt.Errorf("connecting to %v: %w", remote, err)
		}
		return nil
	})
	return fd, taken, err
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
