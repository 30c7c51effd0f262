package proxy

import (
	"context"
	"errors"
	"log/slog"
	"net/netip"
	"time"

	"golang.org/x/sys/unix"
)

// acceptBatch is how many connections a loop takes from a listener per
// event before it turns to its connections (the listener is
// level-triggered: the rest wake it again).
const acceptBatch = 64

// acceptFrom takes connections from ln's queue.
func (l *loop) acceptFrom(ln *listener) {
	p := l.p
	for range acceptBatch {
		fd, src, err := p.accept4(ln.fd)
		switch {
		case err == nil:
			ln.backoff = 0
			l.accept(fd, src)
		case err == unix.EAGAIN:
			return
		case err == unix.EINTR, err == unix.ECONNABORTED:
		case isResourceShortage(err):
			// Out of fds or memory: established connections will free
			// some; dying would cut them all. The limiter logs the spell
			// once and has the diversion stop sending new connections;
			// those already queued are shed, not left hanging.
			p.lim.short(err, p.active.Load(), p.now())
			if !p.shedOne(ln.fd) {
				l.pause(ln)
			}
			return
		default:
			p.acceptFailed(errors.Join(errors.New("accepting on "+ln.addr.String()), err))
			return
		}
	}
}

// accept starts relaying a diverted connection, or refuses one that must
// not be.
func (l *loop) accept(fd int, src netip.AddrPort) {
	p := l.p
	local, err := localAddr(fd)
	if err != nil {
		p.log.Error("cannot read the connection's addresses; resetting it", "err", err)
		resetFD(fd)
		return
	}
	c := &conn{
		l: l, src: src, dst: p.origDst(local), start: time.Now(),
		client: sock{fd: fd, name: "client"}, server: sock{fd: -1, name: "server"},
	}
	c.client.c, c.server.c = c, c
	c.up = half{src: &c.client, dst: &c.server, total: &p.up}
	c.down = half{src: &c.server, dst: &c.client, total: &p.down}
	// Addressed to the proxy port itself: nobody was diverted here, and
	// relaying it would dial the proxy again.
	if c.dst.Port() == p.port {
		p.refused.Add(1)
		resetFD(fd)
		c.log(slog.LevelWarn, "direct connection to the proxy port")
		return
	}
	if p.lim.over(p.active.Add(1)) {
		// Not logged one by one: a flood would flood the log too. The
		// overload's end line counts them.
		p.active.Add(-1)
		p.lim.refused.Add(1)
		resetFD(fd)
		return
	}
	if !p.track(c) {
		p.active.Add(-1)
		resetFD(fd)
		c.log(slog.LevelInfo, "shutdown")
		return
	}
	p.accepted.Add(1)
	c.state, c.since = dialing, p.now()
	l.conns[c] = struct{}{}
	if !l.add(&c.client) {
		return
	}
	if p.policy.Load().enabled() {
		c.state = inspecting // its first bytes come with the client's events
		return
	}
	l.dial(c)
}

// add puts s in the epoll set; on failure it aborts s's conn.
func (l *loop) add(s *sock) bool {
	if err := unix.EpollCtl(l.ep, unix.EPOLL_CTL_ADD, s.fd, &unix.EpollEvent{Events: sockEvents, Fd: int32(s.fd)}); err != nil {
		if isResourceShortage(err) {
			l.p.lim.short(err, l.p.active.Load(), l.p.now())
		}
		l.abort(s.c, "adding socket to epoll: "+err.Error())
		return false
	}
	l.socks[s.fd] = s
	return true
}

// dial starts the upstream connect from the client's address (its port
// too, unless the box holds that already) to the original destination; the
// server socket's first event ends it (connected). With a Dial hook the
// connect runs on a goroutine of its own and posts its socket back.
func (l *loop) dial(c *conn) {
	p := l.p
	if p.dialHook != nil {
		l.hookDial(c)
		return
	}
	fd, notKept, err := connectTransparent(c.src, c.dst, p.rcvbuf)
	if notKept != nil && err == nil {
		p.portFallbacks.Add(1)
		p.log.LogAttrs(context.Background(), slog.LevelDebug, "client port not kept",
			slog.String("client", c.src.String()), slog.String("server", c.dst.String()), slog.String("reason", notKept.Error()))
	}
	if err != nil {
		p.dialFailed.Add(1)
		if isResourceShortage(err) {
			p.lim.short(err, p.active.Load(), p.now())
		}
		l.abort(c, dialReason(err))
		return
	}
	c.server.fd = fd
	l.add(&c.server)
}

// hookDial runs Config.Dial for c and hands its socket to the loop.
func (l *loop) hookDial(c *conn) {
	p := l.p
	ctx, cancel := context.WithTimeout(context.Background(), time.Duration(p.connectTimeout.Load()))
	c.cancelDial = cancel
	network := "tcp4"
	if !c.dst.Addr().Is4() {
		network = "tcp6"
	}
	local := netip.AddrPortFrom(c.src.Addr(), 0)
	// stopLoops waits for these: a result posted to a stopped loop would
	// leak its socket.
	p.hookWG.Add(1)
	go func() {
		defer p.hookWG.Done()
		defer cancel()
		tc, err := p.dialHook(ctx, network, tcpAddr(local), tcpAddr(c.dst))
		fd := -1
		if err == nil {
			fd, err = takeFD(tc)
		}
		l.post(func() {
			c.cancelDial = nil
			switch {
			case c.state != dialing:
				if fd >= 0 {
					resetFD(fd)
				}
			case err != nil:
				p.dialFailed.Add(1)
				l.abort(c, dialReason(err))
			default:
				c.server.fd = fd
				l.add(&c.server)
			}
		})
	}()
}
