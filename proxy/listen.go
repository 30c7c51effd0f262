package proxy

import (
	"context"
	"fmt"
	"net"
	"syscall"
)

// listenTransparent returns what opens a TPROXY listener. IP_TRANSPARENT
// must be set before bind: the tproxy expression only hands packets to
// transparent sockets, and a listener without it is never selected.
// rcvbuf is Config.ReceiveBuffer.
func listenTransparent(rcvbuf int) func(network, addr string) (net.Listener, error) {
	lc := net.ListenConfig{
		Control: func(network, address string, rc syscall.RawConn) error {
			return control(rc, func(fd uintptr) error {
				v6 := network == "tcp6"
				if v6 {
					if err := setV6Only(fd); err != nil {
						return err
					}
				}
				if err := setTransparent(fd, v6); err != nil {
					return err
				}
				// Both inherited by every accepted socket: no syscall per
				// connection (and the SYN-ACK's window already obeys rcvbuf).
				if err := setAbortOnClose(fd); err != nil {
					return err
				}
				if err := setReceiveBuffer(fd, rcvbuf); err != nil {
					return err
				}
				return setReusePort(fd)
			})
		},
		// The box must stay invisible: keepalive probes from the proxy would
		// be packets neither endpoint sent. Dead peers end with IdleTimeout.
		KeepAlive: -1,
	}
	// Go listens with MPTCP by default where the kernel has it. The proxy
	// must not: it would negotiate MPTCP with a client that offers it, on
	// behalf of a server that may not speak it (the box is visible), and an
	// MPTCP socket does not behave like TCP under splice and SIOCINQ.
	lc.SetMultipathTCP(false)
	return func(network, addr string) (net.Listener, error) {
		ln, err := lc.Listen(context.Background(), network, addr)
		if err != nil {
			return nil, fmt.Errorf("listening on %s: %w", addr, err)
		}
		return ln, nil
	}
}

// control runs fn on rc's file descriptor and returns fn's error, which
// RawConn.Control alone would drop.
func control(rc syscall.RawConn, fn func(fd uintptr) error) error {
	var ferr error
	if err := rc.Control(func(fd uintptr) { ferr = fn(fd) }); err != nil {
		return err
	}
	return ferr
}

// origDst is where a diverted client was going: TPROXY delivers the
// connection to our socket without rewriting it, so the accepted socket's
// local address is the original destination.
func origDst(c *net.TCPConn) *net.TCPAddr {
	a, _ := c.LocalAddr().(*net.TCPAddr)
	return a
}
