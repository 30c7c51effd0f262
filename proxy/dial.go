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
	tcp := []func(fd uintptr) error{
		setAbortOnClose,
		func(fd uintptr) error { return setReceiveBuffer(fd, rcvbuf) },
		setNoDelay,
	}
	fd, taken, err := bindConnect(unix.SOCK_STREAM, client, remote, tcp...)
	if !taken {
		return fd, nil, err
	}
	// Without IP_BIND_ADDRESS_NO_PORT, a bind to port 0 would reserve a
	// port for the client's IP alone, not per 4-tuple.
	fd, _, ferr := bindConnect(unix.SOCK_STREAM, netip.AddrPortFrom(client.Addr(), 0), remote, append(tcp, setBindNoPort)...)
	return fd, err, ferr
}

// bindConnect opens a transparent socket of type typ bound to local and
// connects it to remote (for TCP, starts the connect), after setting the
// type's own options, setup. taken says err is a conflict over local's
// port or the 4-tuple, which another port may avoid.
//
// SO_REUSEADDR lets the socket share local with the box's other sockets
// on the client's address and port: its UDP sessions and TCP legs to other
// servers, their TIME_WAITs, a fallback that got the port, the TIME_WAIT
// of its last connection to this server (which connect recycles if it had
// timestamps). The kernel lets a bind share an address and port only if
// both sockets set it; connect still refuses a taken 4-tuple, before any
// SYN, so a conflict is never reported later as SO_ERROR. A listener on
// the port (the proxy's own) makes the bind fail even so.
func bindConnect(typ int, local, remote netip.AddrPort, setup ...func(fd uintptr) error) (fd int, taken bool, err error) {
	lsa, err := sockaddr(local)
	if err != nil {
		return -1, false, err
	}
	rsa, err := sockaddr(remote)
	if err != nil {
		return -1, false, err
	}
	v6 := !remote.Addr().Is4()
	fd, err = newSocket(v6, typ, func(fd int) error {
		if err := setTransparent(uintptr(fd), v6); err != nil {
			return err
		}
		for _, set := range setup {
			if err := set(uintptr(fd)); err != nil {
				return err
			}
		}
		if err := setReuseAddr(fd); err != nil {
			return err
		}
		if err := unix.Bind(fd, lsa); err != nil {
			taken = err == unix.EADDRINUSE && local.Port() != 0
			return fmt.Errorf("binding to %v: %w", local, err)
		}
		if err := unix.Connect(fd, rsa); err != nil && err != unix.EINPROGRESS {
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
