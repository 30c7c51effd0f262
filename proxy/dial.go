package proxy

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"syscall"
)

// dialTransparent connects to remote from local (the client's IP, port 0),
// so the server sees the client's address rather than the box's.
//
// The client's own port is not reused: the box's transparent TIME_WAIT
// sockets from earlier connections would collide with it under load
// (EADDRINUSE). IP_BIND_ADDRESS_NO_PORT lets connect pick the port per
// 4-tuple instead of reserving one per client IP at bind time.
//
// The timeout comes from ctx. The return path works because the server's
// replies to the client's IP reach the box (the bridge redirects them) and
// the nft `socket transparent 1` rule marks them for local delivery.
func dialTransparent(rcvbuf int) func(ctx context.Context, network string, local, remote *net.TCPAddr) (*net.TCPConn, error) {
	d := &net.Dialer{
		Control: func(network, address string, rc syscall.RawConn) error {
			return control(rc, func(fd uintptr) error {
				if err := setTransparent(fd, network == "tcp6"); err != nil {
					return err
				}
				if err := setAbortOnClose(fd); err != nil {
					return err
				}
				if err := setReceiveBuffer(fd, rcvbuf); err != nil {
					return err
				}
				return setBindNoPort(fd)
			})
		},
		KeepAlive: -1, // see listenTransparent
	}
	d.SetMultipathTCP(false) // plain TCP, as the client spoke it (see listenTransparent)
	return func(ctx context.Context, network string, local, remote *net.TCPAddr) (*net.TCPConn, error) {
		// DialTCP with netip addresses: no formatting and re-parsing of
		// address strings on every connection (a measurable share of the
		// new-connection path).
		rp := remote.AddrPort()
		return d.DialTCP(ctx, network, netip.AddrPortFrom(local.AddrPort().Addr().Unmap(), 0), netip.AddrPortFrom(rp.Addr().Unmap(), rp.Port()))
	}
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
