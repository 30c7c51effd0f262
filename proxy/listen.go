package proxy

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"syscall"

	"golang.org/x/sys/unix"
)

// listenBacklog is the accept queue's length (the kernel caps it at
// net.core.somaxconn).
const listenBacklog = 4096

// listenTransparent opens a TPROXY listener on port for network ("tcp4"
// or "tcp6"). IP_TRANSPARENT must be set before bind: the tproxy
// expression only hands packets to transparent sockets, and a listener
// without it is never selected. rcvbuf is Config.ReceiveBuffer.
//
// A plain socket(2), not Go's net package: the loop owns the fd. Go would
// also listen with MPTCP where the kernel has it, which the proxy must not
// (it would negotiate MPTCP with a client on behalf of a server that may
// not speak it), and would enable keepalive probes, packets neither
// endpoint sent (dead peers end with IdleTimeout).
func listenTransparent(network string, port uint16, rcvbuf int) (fd int, addr net.Addr, err error) {
	v6 := network == "tcp6"
	fd, err = newSocket(v6, unix.SOCK_STREAM, func(fd int) error {
		for _, set := range []func(uintptr) error{
			func(fd uintptr) error { return setV6OnlyIf(fd, v6) },
			func(fd uintptr) error { return setTransparent(fd, v6) },
			// These three inherited by every accepted socket: no syscall
			// per connection (and the SYN-ACK's window already obeys
			// rcvbuf).
			setAbortOnClose,
			func(fd uintptr) error { return setReceiveBuffer(fd, rcvbuf) },
			setNoDelay,
			setReusePort, // one listener per loop shares the port
		} {
			if err := set(uintptr(fd)); err != nil {
				return err
			}
		}
		if err := unix.Bind(fd, anyAddr(v6, port)); err != nil {
			return fmt.Errorf("binding to port %d: %w", port, err)
		}
		if err := unix.Listen(fd, listenBacklog); err != nil {
			return fmt.Errorf("listen: %w", err)
		}
		return nil
	})
	if err != nil {
		return -1, nil, err
	}
	local, err := localAddr(fd)
	if err != nil {
		unix.Close(fd)
		return -1, nil, fmt.Errorf("reading the listener's address: %w", err)
	}
	return fd, tcpAddr(local), nil
}

// anyAddr is the wildcard address of the family, on port.
func anyAddr(v6 bool, port uint16) unix.Sockaddr {
	if v6 {
		return &unix.SockaddrInet6{Port: int(port)}
	}
	return &unix.SockaddrInet4{Port: int(port)}
}

// takeFD moves a Go connection's or listener's socket to a plain,
// non-blocking fd of its own (a dup; the Go value is closed), for the
// loop to own: how sockets from the Listen and Dial hooks join a loop.
func takeFD(c interface {
	SyscallConn() (syscall.RawConn, error)
	Close() error
}) (int, error) {
	defer c.Close()
	rc, err := c.SyscallConn()
	if err != nil {
		return -1, err
	}
	fd := -1
	var derr error
	if err := rc.Control(func(f uintptr) { fd, derr = unix.FcntlInt(f, unix.F_DUPFD_CLOEXEC, 0) }); err != nil {
		return -1, err
	}
	if derr != nil {
		return -1, fmt.Errorf("duplicating socket: %w", derr)
	}
	if err := unix.SetNonblock(fd, true); err != nil {
		unix.Close(fd)
		return -1, fmt.Errorf("setting O_NONBLOCK: %w", err)
	}
	return fd, nil
}

// origDst is where a diverted client was going: TPROXY delivers the
// connection to our socket without rewriting it, so the accepted socket's
// local address is the original destination.
func origDst(local netip.AddrPort) netip.AddrPort { return local }

// sockaddr converts an address for bind and connect.
func sockaddr(ap netip.AddrPort) (unix.Sockaddr, error) {
	ip := ap.Addr()
	if ip.Is4() {
		return &unix.SockaddrInet4{Addr: ip.As4(), Port: int(ap.Port())}, nil
	}
	if !ip.Is6() {
		return nil, errors.New("no address")
	}
	sa := &unix.SockaddrInet6{Addr: ip.As16(), Port: int(ap.Port())}
	if z := ip.Zone(); z != "" {
		ifi, err := net.InterfaceByName(z)
		if err != nil {
			return nil, fmt.Errorf("zone %q: %w", z, err)
		}
		sa.ZoneId = uint32(ifi.Index)
	}
	return sa, nil
}

func tcpAddr(ap netip.AddrPort) *net.TCPAddr { return net.TCPAddrFromAddrPort(ap) }
