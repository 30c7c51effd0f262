package proxy

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"time"

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
	toServer bool   // the upstream socket
	ovfl     uint32 // the kernel's count of datagrams it dropped, last seen
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
	DropNoSession      = "reply for no session"
	DropQueueFull      = "receive queue full"
)

// udpDropReasons are every reason; udpDrops counts them in this order.
var udpDropReasons = [...]string{DropSendBufferFull, DropSessionLimit, DropDirect, DropNoOrigDst, DropSetupFailed, DropTruncated, DropUnreachable, DropNoSession, DropQueueFull}

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
func listenUDP(network string, port uint16, rcvbuf int) (int, error) {
	v6 := network == "udp6"
	return newSocket(v6, unix.SOCK_DGRAM, func(fd int) error {
		for _, set := range []func(uintptr) error{
			func(fd uintptr) error { return setV6OnlyIf(fd, v6) },
			func(fd uintptr) error { return setTransparent(fd, v6) },
			func(fd uintptr) error { return setRecvOrigDst(int(fd), v6) },
			func(fd uintptr) error { return setRxqOverflow(int(fd)) },
			// A burst of new sessions waits here until the loop reads it.
			func(fd uintptr) error { return setReceiveBuffer(fd, rcvbuf) },
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
		p.udpOverflow(&ln.ovfl, b, n)
		for i := range n {
			src := b.source(i)
			dst, ok := b.origDst(i)
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
// remote. Several sessions share an address (one client port talking to
// several servers, or several clients to one server address); each socket
// is connected, so the kernel tells them apart. An upstream socket that
// cannot have local's port (a listener of the box's has it) gets one the
// kernel picks; kept says which.
func udpSocket(local, remote netip.AddrPort, upstream bool) (fd int, kept bool, err error) {
	rxqOverflow := func(fd uintptr) error { return setRxqOverflow(int(fd)) }
	fd, taken, err := bindConnect(unix.SOCK_DGRAM, local, remote, rxqOverflow)
	if !taken || !upstream {
		return fd, err == nil, err
	}
	fd, _, err = bindConnect(unix.SOCK_DGRAM, netip.AddrPortFrom(local.Addr(), 0), remote, rxqOverflow)
	return fd, false, err
}

// udpEvent relays what one of a session's sockets has queued to the other.
// Each datagram's source is checked: a socket is bound a moment before it
// is connected, and in that moment it may take a datagram of another
// client to the same server (or of another server to the same client
// port), which connect does not take back. Such a datagram goes where it
// belongs, never into this session.
func (l *loop) udpEvent(u *usock) {
	p := l.p
	s := u.s
	to, want := &s.up, s.key.client
	if u.toServer {
		to, want = &s.down, p.origDst(s.key.dst)
	}
	b := l.udpBatch()
	for {
		n, err := b.recv(u.fd, true)
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
		p.udpOverflow(&u.ovfl, b, n)
		start := 0
		for i := 0; i <= n; i++ {
			if i < n && b.source(i) == want {
				continue
			}
			l.udpSend(s, !u.toServer, to.fd, b, start, i)
			if i < n {
				l.udpStray(u, b.source(i), b.datagram(i))
			}
			start = i + 1
		}
		if n < udpBatch {
			return
		}
	}
}

// udpSend sends the batch's datagrams [from, to) on fd for s, upstream
// (towards the server) or not, and counts them.
func (l *loop) udpSend(s *udpSession, upstream bool, fd int, b *batch, from, to int) {
	if from == to {
		return
	}
	sent, err := b.send(fd, from, to)
	var bytes uint64
	for i := from; i < from+sent; i++ {
		bytes += uint64(b.msgs[i].n)
	}
	if upstream {
		s.dgUp += uint64(sent)
		s.bytesUp += bytes
	} else {
		s.dgDown += uint64(sent)
		s.bytesDown += bytes
	}
	if sent < to-from {
		l.p.udpDropN(sendDropReason(err), to-from-sent)
	}
}

// udpStray relays a datagram that reached u but is not its session's: on
// a client-facing socket, a client's datagram to the same original
// destination (relayed as the listener would); on an upstream socket, a
// server's reply to the same client address (relayed by its own session,
// if there is one).
func (l *loop) udpStray(u *usock, src netip.AddrPort, dgram []byte) {
	s := u.s
	if !u.toServer {
		l.udpFirst(src, s.key.dst, dgram)
		return
	}
	t := l.sessions[udpKey{s.key.client, src}]
	if t == nil {
		l.p.udpDrop(DropNoSession)
		return
	}
	if _, err := writeFD(t.down.fd, dgram); err != nil {
		l.p.udpDrop(sendDropReason(err))
		return
	}
	t.dgDown++
	t.bytesDown += uint64(len(dgram))
}

// udpOverflow counts what the kernel dropped because a socket's receive
// queue was full: each datagram carries the socket's running count
// (SO_RXQ_OVFL), last is the count seen before.
func (p *Proxy) udpOverflow(last *uint32, b *batch, n int) {
	for i := range n {
		if v, ok := b.overflows(i); ok && v != *last {
			p.udpDropN(DropQueueFull, int(v-*last))
			*last = v
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
	l.p.talkers.add(s.key.client.Addr(), l.p.origDst(s.key.dst).Addr(), s.bytesUp+s.bytesDown)
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

// setRxqOverflow has the kernel attach to each datagram read the count of
// datagrams it dropped for a full receive queue, so those drops are
// counted too.
func setRxqOverflow(fd int) error {
	if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RXQ_OVFL, 1); err != nil {
		return fmt.Errorf("setting SO_RXQ_OVFL: %w", err)
	}
	return nil
}
