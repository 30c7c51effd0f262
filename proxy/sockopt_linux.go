package proxy

import (
	"fmt"
	"syscall"

	"golang.org/x/sys/unix"
)

// newSocket opens a non-blocking, close-on-exec socket, TCP or UDP (typ
// SOCK_STREAM or SOCK_DGRAM), IPv6 if v6, and runs setup on it; if setup
// fails the socket is closed.
func newSocket(v6 bool, typ int, setup func(fd int) error) (int, error) {
	family, proto := unix.AF_INET, unix.IPPROTO_TCP
	if v6 {
		family = unix.AF_INET6
	}
	if typ == unix.SOCK_DGRAM {
		proto = unix.IPPROTO_UDP
	}
	fd, err := unix.Socket(family, typ|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, proto)
	if err != nil {
		return -1, fmt.Errorf("creating socket: %w", err)
	}
	if err := setup(fd); err != nil {
		unix.Close(fd)
		return -1, err
	}
	return fd, nil
}

// setTransparent lets a socket bind (listener) or connect from (upstream) an
// address that is not the box's own: IP_TRANSPARENT for IPv4 sockets,
// IPV6_TRANSPARENT for IPv6 ones.
func setTransparent(fd uintptr, v6 bool) error {
	if v6 {
		if err := unix.SetsockoptInt(int(fd), unix.SOL_IPV6, unix.IPV6_TRANSPARENT, 1); err != nil {
			return fmt.Errorf("setting IPV6_TRANSPARENT: %w", err)
		}
		return nil
	}
	if err := unix.SetsockoptInt(int(fd), unix.SOL_IP, unix.IP_TRANSPARENT, 1); err != nil {
		return fmt.Errorf("setting IP_TRANSPARENT: %w", err)
	}
	return nil
}

// setV6OnlyIf sets IPV6_V6ONLY on an IPv6 socket (v6), nothing otherwise.
func setV6OnlyIf(fd uintptr, v6 bool) error {
	if !v6 {
		return nil
	}
	return setV6Only(fd)
}

// setV6Only keeps the [::] listener from also taking IPv4 connections (they
// belong to the 0.0.0.0 listener, which would otherwise fail with EADDRINUSE).
func setV6Only(fd uintptr) error {
	if err := unix.SetsockoptInt(int(fd), unix.SOL_IPV6, unix.IPV6_V6ONLY, 1); err != nil {
		return fmt.Errorf("setting IPV6_V6ONLY: %w", err)
	}
	return nil
}

// setBindNoPort defers the choice of the local port from bind to connect,
// so the kernel picks one that is unique for the 4-tuple rather than for the
// client IP alone: many clients' connections share few source IPs on the box.
// The option lives at SOL_IP for IPv6 sockets too.
func setBindNoPort(fd uintptr) error {
	if err := unix.SetsockoptInt(int(fd), unix.SOL_IP, unix.IP_BIND_ADDRESS_NO_PORT, 1); err != nil {
		return fmt.Errorf("setting IP_BIND_ADDRESS_NO_PORT: %w", err)
	}
	return nil
}

// readFD is one non-blocking read(2), retried on EINTR. EAGAIN means
// nothing is queued yet.
func readFD(fd int, b []byte) (int, error) {
	for {
		n, err := unix.Read(fd, b)
		if err == unix.EINTR {
			continue
		}
		if n < 0 {
			n = 0
		}
		return n, err
	}
}

// writeFD is one non-blocking write(2), retried on EINTR. EAGAIN means
// the socket's send buffer is full.
func writeFD(fd int, b []byte) (int, error) {
	for {
		n, err := unix.Write(fd, b)
		if err == unix.EINTR {
			continue
		}
		if n < 0 {
			n = 0
		}
		return n, err
	}
}

// resetFD closes fd with a reset (SO_LINGER 0), for a socket that is
// refused before it joins a connection.
func resetFD(fd int) {
	setAbortOnClose(uintptr(fd))
	unix.Close(fd)
}

// sockError is the socket's pending error (SO_ERROR): why a connect
// failed, or the reset a peer sent. nil if there is none.
func sockError(fd int) error {
	e, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_ERROR)
	if err != nil {
		return fmt.Errorf("reading SO_ERROR: %w", err)
	}
	if e != 0 {
		return syscall.Errno(e)
	}
	return nil
}

// tcpClose is TCP_CLOSE in the kernel's TCP state enum: where a socket goes
// when it receives a reset, or once both FINs were exchanged and acked.
const tcpClose = 7

// setAbortOnClose makes close(2) send a reset instead of a FIN
// (SO_LINGER with a zero timeout). The proxy sets it on every socket it
// relays, so that if the process dies mid-stream, the kernel's close of
// its fds tells both peers the stream broke instead of faking its end. An
// orderly close is unaffected: by then both FINs have been exchanged and
// acknowledged, the socket is in TCP_CLOSE, and close sends nothing.
// Accepted sockets inherit it from the listener.
func setAbortOnClose(fd uintptr) error {
	if err := unix.SetsockoptLinger(int(fd), unix.SOL_SOCKET, unix.SO_LINGER, &unix.Linger{Onoff: 1, Linger: 0}); err != nil {
		return fmt.Errorf("setting SO_LINGER: %w", err)
	}
	return nil
}

// setReceiveBuffer fixes the socket's receive buffer to n bytes (0: leave
// the kernel's autotuning). SO_RCVBUFFORCE, because net.core.rmem_max
// (208 KiB on a stock Debian) would silently cap SO_RCVBUF far below what
// a proxy at LAN speed needs; it takes CAP_NET_ADMIN, which the proxy has
// for IP_TRANSPARENT anyway.
func setReceiveBuffer(fd uintptr, n int) error {
	if n == 0 {
		return nil
	}
	if err := unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, n); err != nil {
		return fmt.Errorf("setting SO_RCVBUFFORCE to %d: %w", n, err)
	}
	return nil
}

// closedState reports whether fd's socket has reached TCP_CLOSE: after
// both FINs were exchanged and ours acknowledged, or after a reset. err is
// the socket's pending error (SO_ERROR, e.g. ECONNRESET), nil after an
// orderly end.
func closedState(fd int) (inClose bool, err error) {
	info, err := unix.GetsockoptTCPInfo(fd, unix.IPPROTO_TCP, unix.TCP_INFO)
	if err != nil {
		return true, fmt.Errorf("reading TCP_INFO: %w", err)
	}
	if info.State != tcpClose {
		return false, nil
	}
	return true, sockError(fd)
}

// progress is a counter that grows whenever fd's socket receives a byte or
// its peer acknowledges one: delivery, not just the proxy's own reads and
// writes. 0 when it cannot be read.
func progress(fd int) uint64 {
	info, err := unix.GetsockoptTCPInfo(fd, unix.IPPROTO_TCP, unix.TCP_INFO)
	if err != nil {
		return 0
	}
	return info.Bytes_received + info.Bytes_acked
}

// setNoDelay turns Nagle's algorithm off: the relay writes each message as
// it arrives, and holding a small one back until the previous is acked
// would add a delay neither endpoint asked for. Accepted sockets inherit
// it from the listener.
func setNoDelay(fd uintptr) error {
	if err := unix.SetsockoptInt(int(fd), unix.IPPROTO_TCP, unix.TCP_NODELAY, 1); err != nil {
		return fmt.Errorf("setting TCP_NODELAY: %w", err)
	}
	return nil
}

// setReusePort lets one listener per CPU share the proxy port.
func setReusePort(fd uintptr) error {
	if err := unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_REUSEPORT, 1); err != nil {
		return fmt.Errorf("setting SO_REUSEPORT: %w", err)
	}
	return nil
}

// openReserve opens an fd that shedOne can give up when the process is out
// of them. -1 if even that fails.
func openReserve() int {
	fd, err := unix.Open("/dev/null", unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return -1
	}
	return fd
}

func closeFD(fd int) { unix.Close(fd) }

// setReuseAddr lets several sockets bind one address, each connected to a
// different peer (see bindConnect).
func setReuseAddr(fd int) error {
	if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_REUSEADDR, 1); err != nil {
		return fmt.Errorf("setting SO_REUSEADDR: %w", err)
	}
	return nil
}
