package proxy

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// A UDP session is one (client address, original destination) pair. Its
// upstream socket is transparent, bound to the client's address (its port
// too when free) and connected to the server, so the server sees the
// client; its client-facing socket is transparent, bound to the original
// destination and connected to the client, so replies come from the
// server's address, and the client's later datagrams, which the kernel
// now delivers to that socket (the socket rule matches it before the
// tproxy rule), are read from there. The listener only sees a session's
// first datagrams.
//
// Flow control: a datagram is read, then sent at once; if the far socket's
// send buffer is full it is dropped and counted, never queued. The proxy
// holds no datagram between events.
type udpSession struct {
	l          *loop
	key        udpKey
	up, down   usock // to the server, to the client
	start      time.Time
	lastActive time.Duration
	portKept   bool // the upstream socket has the client's port
	// Datagrams and bytes relayed: up is client to server.
	dgUp, dgDown, bytesUp, bytesDown uint64
}

// udpKey identifies a session: who sent, and where to.
type udpKey struct{ client, dst netip.AddrPort }

// usock is one socket of a session.
type usock struct {
	s        *udpSession
	fd       int
	toServer bool // the upstream socket
}

// UDP drop reasons, as Stats.UDPDropped and the log count them.
const (
	DropSendBufferFull = "send buffer full"
	DropSessionLimit   = "session limit"
	DropDirect         = "addressed to the proxy port"
	DropNoOrigDst      = "no original destination"
	DropSetupFailed    = "session setup failed"
	DropTruncated      = "truncated"
	DropUnreachable    = "peer unreachable (ICMP)"
)

// udpDropReasons are every reason; udpDrops counts them in this order.
var udpDropReasons = [...]string{DropSendBufferFull, DropSessionLimit, DropDirect, DropNoOrigDst, DropSetupFailed, DropTruncated, DropUnreachable}

// defaultUDPIdle is Config.UDPIdleTimeout's default.
const defaultUDPIdle = 60 * time.Second

// udpDrop counts one datagram dropped for reason.
func (p *Proxy) udpDrop(reason string) { p.udpDropN(reason, 1) }

func (p *Proxy) udpDropN(reason string, n int) {
	for i, r := range udpDropReasons {
		if r == reason {
			p.udpDrops[i].Add(uint64(n))
			return
		}
	}
}

// SetUDP changes the UDP idle timeout and session limit live (SIGHUP);
// a non-positive idle timeout is ignored, a limit of 0 means none.
func (p *Proxy) SetUDP(idle time.Duration, maxSessions int) {
	if idle > 0 {
		p.udpIdle.Store(int64(idle))
	}
	p.udpLim.max.Store(int64(maxSessions))
	p.udpLim.poke()
}

// listenUDP opens a transparent UDP listener on port that reports each
// datagram's original destination.
func listenUDP(network string, port uint16) (int, error) {
	v6 := network == "udp6"
	return newSocket(v6, unix.SOCK_DGRAM, func(fd int) error {
		for _, set := range []func(uintptr) error{
			func(fd uintptr) error { return setV6OnlyIf(fd, v6) },
			func(fd uintptr) error { return setTransparent(fd, v6) },
			func(fd uintptr) error { return setRecvOrigDst(int(fd), v6) },
			setReusePort,
			// Sessions' client-facing sockets bind original
			// destinations with SO_REUSEADDR; so may the listener's
			// port (tests).
			func(fd uintptr) error { return setReuseAddr(int(fd)) },
		} {
			if err := set(uintptr(fd)); err != nil {
				return err
			}
		}
		if err := unix.Bind(fd, anyAddr(v6, port)); err != nil {
			return fmt.Errorf("binding to UDP port %d: %w", port, err)
		}
		return nil
	})
}

// udpFrom reads a batch of first datagrams from listener lfd and starts or
// feeds their sessions.
func (l *loop) udpFrom(ln *listener) {
	p := l.p
	b := l.udpBatch()
	for range 4 { // then let the others run; the listener is level-triggered
		n, err := b.recv(ln.fd, true)
		if err != nil {
			return // EAGAIN, or an error the next datagram will show again
		}
		for i := range n {
			msg := &b.msgs[i].hdr
			src := rawAddrPort((*unix.RawSockaddrAny)(unsafe.Pointer(msg.Name)))
			dst, ok := origDstFromCmsg(b.oob[i*cmsgSpace : i*cmsgSpace+int(msg.Controllen)])
			switch {
			case b.truncated(i):
				p.udpDrop(DropTruncated)
			case !ok:
				p.udpDrop(DropNoOrigDst)
			default:
				l.udpFirst(src, dst, b.datagram(i))
			}
		}
		if n < udpBatch {
			return
		}
	}
}

// udpFirst relays a datagram that reached the listener: the first of a new
// session, or one of a session whose client-facing socket was not bound
// yet when it arrived.
func (l *loop) udpFirst(src, local netip.AddrPort, dgram []byte) {
	p := l.p
	if p.origDst(local).Port() == p.udpPort {
		// Nobody was diverted here, and relaying it would send it to
		// the proxy again.
		p.udpDrop(DropDirect)
		return
	}
	key := udpKey{src, local}
	s := l.sessions[key]
	if s == nil {
		if p.udpLim.over(p.udpActive.Add(1)) {
			p.udpActive.Add(-1)
			p.udpDrop(DropSessionLimit)
			return
		}
		var err error
		if s, err = l.newSession(key); err != nil {
			p.udpActive.Add(-1)
			if isResourceShortage(err) {
				p.udpLim.short(err, p.udpActive.Load(), p.now())
			}
			p.udpDrop(DropSetupFailed)
			p.log.Debug("udp session setup failed", "client", src.String(), "server", local.String(), "err", err)
			return
		}
	}
	s.lastActive = p.now()
	if _, err := writeFD(s.up.fd, dgram); err != nil {
		p.udpDrop(sendDropReason(err))
		return
	}
	s.dgUp++
	s.bytesUp += uint64(len(dgram))
}

// newSession opens both sockets of a session and puts them in the loop.
func (l *loop) newSession(key udpKey) (*udpSession, error) {
	p := l.p
	server := p.origDst(key.dst)
	up, kept, err := udpSocket(key.client, server, true)
	if err != nil {
		return nil, fmt.Errorf("opening the upstream socket: %w", err)
	}
	down, _, err := udpSocket(key.dst, key.client, false)
	if err != nil {
		unix.Close(up)
		return nil, fmt.Errorf("opening the client-facing socket: %w", err)
	}
	s := &udpSession{l: l, key: key, start: time.Now(), portKept: kept}
	s.up = usock{s: s, fd: up, toServer: true}
	s.down = usock{s: s, fd: down}
	for _, u := range []*usock{&s.up, &s.down} {
		if err := unix.EpollCtl(l.ep, unix.EPOLL_CTL_ADD, u.fd, &unix.EpollEvent{Events: unix.EPOLLIN | unix.EPOLLET, Fd: int32(u.fd)}); err != nil {
			l.closeSession(s, "")
			return nil, fmt.Errorf("adding socket to epoll: %w", err)
		}
		l.usocks[u.fd] = u
	}
	l.sessions[key] = s
	p.udpTotal.Add(1)
	if !kept {
		p.udpPortFallbacks.Add(1)
	}
	p.log.Debug("udp session started", "client", key.client.String(), "server", server.String(), "client_port_kept", kept)
	return s, nil
}

// udpSocket opens a transparent UDP socket bound to local and connected to
// remote. An upstream socket that cannot have local's port (taken on the
// box by a socket without SO_REUSEADDR) gets one the kernel picks; kept
// says which.
func udpSocket(local, remote netip.AddrPort, upstream bool) (fd int, kept bool, err error) {
	lsa, err := sockaddr(local)
	if err != nil {
		return -1, false, err
	}
	rsa, err := sockaddr(remote)
	if err != nil {
		return -1, false, err
	}
	v6 := !remote.Addr().Is4()
	fd, err = newSocket(v6, unix.SOCK_DGRAM, func(fd int) error {
		if err := setTransparent(uintptr(fd), v6); err != nil {
			return err
		}
		// Several sessions share an address: one client port talking to
		// several servers, or several clients to one server address.
		// Each socket is connected, so the kernel tells them apart.
		if err := setReuseAddr(fd); err != nil {
			return err
		}
		kept = true
		if err := unix.Bind(fd, lsa); err != nil {
			if !upstream || !errors.Is(err, unix.EADDRINUSE) {
				return fmt.Errorf("binding to %v: %w", local, err)
			}
			kept = false
			any, _ := sockaddr(netip.AddrPortFrom(local.Addr(), 0))
			if err := unix.Bind(fd, any); err != nil {
				return fmt.Errorf("binding to %v: %w", local.Addr(), err)
			}
		}
		if err := unix.Connect(fd, rsa); err != nil {
			return fmt.Errorf("connecting to %v: %w", remote, err)
		}
		return nil
	})
	return fd, kept, err
}

// udpEvent relays what one of a session's sockets has queued to the other.
func (l *loop) udpEvent(u *usock) {
	p := l.p
	s := u.s
	to := &s.down
	if !u.toServer {
		to = &s.up
	}
	b := l.udpBatch()
	for {
		n, err := b.recv(u.fd, false)
		if err == unix.EAGAIN {
			return
		}
		if err != nil {
			// A connected UDP socket reports an ICMP error from its peer
			// on the next receive: count it and go on.
			p.udpDrop(DropUnreachable)
			continue
		}
		s.lastActive = p.now()
		sent, err := b.send(to.fd, 0, n)
		var bytes uint64
		for i := range sent {
			bytes += uint64(b.msgs[i].n)
		}
		if u.toServer {
			s.dgDown += uint64(sent)
			s.bytesDown += bytes
		} else {
			s.dgUp += uint64(sent)
			s.bytesUp += bytes
		}
		if sent < n {
			p.udpDropN(sendDropReason(err), n-sent)
		}
		if n < udpBatch {
			return
		}
	}
}

// sendDropReason names why a datagram could not be sent.
func sendDropReason(err error) string {
	switch {
	case errors.Is(err, unix.EAGAIN), errors.Is(err, unix.ENOBUFS):
		return DropSendBufferFull
	case errors.Is(err, unix.ECONNREFUSED), errors.Is(err, unix.EHOSTUNREACH), errors.Is(err, unix.ENETUNREACH):
		return DropUnreachable
	}
	return DropSetupFailed
}

// udpTick expires sessions idle for the UDP idle timeout.
func (l *loop) udpTick(now time.Duration) {
	idle := time.Duration(l.p.udpIdle.Load())
	for _, s := range l.sessions {
		if now-s.lastActive >= idle {
			l.closeSession(s, "idle timeout")
		}
	}
}

// closeSession closes s's sockets and, if reason is not empty (s was
// counted), logs its end.
func (l *loop) closeSession(s *udpSession, reason string) {
	for _, u := range []*usock{&s.up, &s.down} {
		if u.fd >= 0 {
			delete(l.usocks, u.fd)
			unix.Close(u.fd)
			u.fd = -1
		}
	}
	if reason == "" {
		return
	}
	delete(l.sessions, s.key)
	l.p.udpActive.Add(-1)
	l.p.log.LogAttrs(context.Background(), slog.LevelInfo, "udp session closed",
		slog.String("client", s.key.client.String()),
		slog.String("server", l.p.origDst(s.key.dst).String()),
		slog.Uint64("datagrams_up", s.dgUp), slog.Uint64("bytes_up", s.bytesUp),
		slog.Uint64("datagrams_down", s.dgDown), slog.Uint64("bytes_down", s.bytesDown),
		slog.Duration("duration", time.Since(s.start)),
		slog.String("reason", reason),
	)
}

// udpBatch is the loop's datagram buffers, allocated on first use.
func (l *loop) udpBatch() *batch {
	if l.batch == nil {
		l.batch = newBatch()
	}
	return l.batch
}

// origDstFromCmsg finds IP_ORIGDSTADDR or IPV6_ORIGDSTADDR among a
// datagram's control messages.
func origDstFromCmsg(oob []byte) (netip.AddrPort, bool) {
	msgs, err := unix.ParseSocketControlMessage(oob)
	if err != nil {
		return netip.AddrPort{}, false
	}
	for _, m := range msgs {
		var rsa unix.RawSockaddrAny
		switch {
		case m.Header.Level == unix.SOL_IP && m.Header.Type == unix.IP_ORIGDSTADDR && len(m.Data) >= unix.SizeofSockaddrInet4,
			m.Header.Level == unix.SOL_IPV6 && m.Header.Type == unix.IPV6_ORIGDSTADDR && len(m.Data) >= unix.SizeofSockaddrInet6:
			copy((*[unix.SizeofSockaddrAny]byte)(unsafe.Pointer(&rsa))[:], m.Data)
			if ap := rawAddrPort(&rsa); ap.IsValid() {
				return ap, true
			}
		}
	}
	return netip.AddrPort{}, false
}

// setRecvOrigDst asks for each datagram's original destination (where
// TPROXY found it going) as a control message.
func setRecvOrigDst(fd int, v6 bool) error {
	if v6 {
		if err := unix.SetsockoptInt(fd, unix.SOL_IPV6, unix.IPV6_RECVORIGDSTADDR, 1); err != nil {
			return fmt.Errorf("setting IPV6_RECVORIGDSTADDR: %w", err)
		}
		return nil
	}
	if err := unix.SetsockoptInt(fd, unix.SOL_IP, unix.IP_RECVORIGDSTADDR, 1); err != nil {
		return fmt.Errorf("setting IP_RECVORIGDSTADDR: %w", err)
	}
	return nil
}

// setReuseAddr lets several UDP sockets bind one address; each is
// connected to a different peer.
func setReuseAddr(fd int) error {
	if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_REUSEADDR, 1); err != nil {
		return fmt.Errorf("setting SO_REUSEADDR: %w", err)
	}
	return nil
}
