package proxy

import (
	"log/slog"

	"golang.org/x/sys/unix"
)

// connState is where a proxied connection is in its life. Every change of
// state happens on the connection's loop, and each connection is closed,
// logged and untracked exactly once, by finish.
//
//	[inspecting ──allowed──▶] dialing ──connected──▶ relaying ──both EOFs passed on──▶ closing ──both TCP_CLOSE──▶ closed ("eof")
//	     │                       │                      │                                │
//	     └──── abort(reason): both sides reset (a denied name: the client) ──────────────┴──▶ closed (reason)
//
// Who moves a connection: accept creates it inspecting when a name
// policy is on (decide moves it to dialing or aborts it), else dialing; connected (the
// upstream socket became writable without error) moves it to relaying;
// relay moves it to closing once both directions passed their EOF on;
// checkClosed finishes it; abort, from any state, for a peer's reset, a
// write error, a timeout (dial, idle, close), a failed dial or Shutdown,
// resets both sides and finishes it.
type connState uint8

const (
	inspecting connState = iota // accepted; its first bytes are read for a name (Config.Policy), nothing dialed
	dialing                     // the upstream connect is under way
	relaying                    // bytes flow (or wait) both ways
	closing                     // both EOFs passed on; waiting for the peers' acks
	closed                      // sockets closed, logged, untracked
)

// abort resets both sides and finishes c, from any state before closed.
//
// Resetting rather than closing is deliberate: the box is invisible, so it
// must never invent a clean end of stream that the real peer did not send.
// A peer's reset is mirrored; an idle timeout, a failed dial or a forced
// shutdown shows up as a reset too.
func (l *loop) abort(c *conn, reason string) {
	if c.state == closed {
		return
	}
	if c.cancelDial != nil {
		c.cancelDial()
	}
	for _, s := range []*sock{&c.client, &c.server} {
		if s.fd >= 0 {
			// Every relayed socket has SO_LINGER 0 already (inherited from
			// the listener, or set at the dial), except a test hook's:
			// make sure close sends a reset.
			setAbortOnClose(uintptr(s.fd))
		}
	}
	l.finish(c, reason)
}

// finish closes c's sockets, logs it and forgets it.
func (l *loop) finish(c *conn, reason string) {
	c.state = closed
	for _, s := range []*sock{&c.client, &c.server} {
		if s.fd >= 0 {
			delete(l.socks, s.fd)
			unix.Close(s.fd)
			s.fd = -1
		}
	}
	for _, h := range []*half{&c.up, &c.down} {
		if h.pendBuf != nil {
			l.p.bufs.Put(h.pendBuf)
			h.pend, h.pendBuf = nil, nil
		}
		l.putPipe(h)
	}
	delete(l.conns, c)
	l.p.closedBy[closeClass(reason)].Add(1)
	l.p.talkers.add(c.src.Addr(), c.dst.Addr(), uint64(c.up.n+c.down.n))
	c.log(slog.LevelInfo, reason)
	l.p.untrack(c)
}

// connected is the end of the upstream connect: on success c starts
// relaying (the client may have sent already), else the client is reset
// with the reason.
func (l *loop) connected(c *conn) {
	if err := sockError(c.server.fd); err != nil {
		l.p.dialFailed.Add(1)
		if isResourceShortage(err) {
			l.p.lim.short(err, l.p.active.Load(), l.p.now())
		}
		l.abort(c, dialReason(err))
		return
	}
	if !c.server.writable {
		return // an early event (e.g. the client's); wait for the connect
	}
	c.state = relaying
	c.lastActive = l.p.now()
	l.p.dialTime.observe(c.lastActive - c.since)
	l.relay(c)
}
