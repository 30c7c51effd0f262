package proxy

import (
	"log/slog"
	"net"
	"time"
)

// connState is where a proxied connection is in its life. Every change of
// state happens in this file, under conn.mu, and each connection is closed,
// logged and untracked exactly once, by finish.
//
//	dialing ──dialed──▶ relaying ──both EOF──▶ closing ──both TCP_CLOSE──▶ closed ("eof")
//	   │                   │                      │
//	   └── abort(reason) ──┴──────────────────────┴──▶ aborted ──last direction ends──▶ closed
//
// Who moves a connection: accept creates it dialing and tracks it; handle
// moves it to relaying (dialed); abort, from anyone (a peer's reset, a
// write error, the idle watchdog, Shutdown, a failed dial, a peer that
// resets or never acknowledges while closing), moves any earlier state to
// aborted, resetting both sides; the last relay direction to end
// (directionDone), or handle after a failed dial, calls finish, which
// takes relaying through closing (awaitClosed) and ends every path in
// closed.
type connState uint8

const (
	dialing  connState = iota // accepted; the upstream dial is under way (server nil)
	relaying                  // both directions relaying, or parked in the sleeper
	closing                   // both directions ended with EOF; waiting for the peers' acks
	aborted                   // both sides reset; directions winding down
	closed                    // sockets closed, logged, untracked
)

// dialed moves c from dialing to relaying with server as its upstream, and
// reports whether it did: false if c was aborted meanwhile (Shutdown), in
// which case server is the caller's to reset.
func (c *conn) dialed(server *net.TCPConn) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.cancelDial = nil
	if c.state != dialing {
		return false
	}
	c.server = server
	c.state = relaying
	return true
}

// abort resets both sides (and stops a dial in progress), from any state
// before aborted: a peer's reset or a write error while relaying, the idle
// watchdog, Shutdown, a failed dial, or a closing connection whose peer
// resets or never acknowledges. The first reason wins; later calls do
// nothing.
//
// Resetting rather than closing is deliberate: the box is invisible, so it
// must never invent a clean end of stream that the real peer did not send.
// A peer's reset is mirrored; an idle timeout, a failed dial or a forced
// shutdown shows up as a reset too.
func (c *conn) abort(reason string) {
	c.mu.Lock()
	if c.state >= aborted {
		c.mu.Unlock()
		return
	}
	c.state = aborted
	c.reason = reason
	server, cancel := c.server, c.cancelDial
	parked := c.unpark()
	c.mu.Unlock()
	if cancel != nil {
		cancel()
	}
	reset(c.client)
	if server != nil {
		reset(server)
	}
	for range parked {
		go c.p.directionDone(c)
	}
}

// directionDone is called by each relay as it ends; the second one
// finishes the connection.
func (p *Proxy) directionDone(c *conn) {
	if c.directions.Add(-1) == 0 {
		p.finish(c)
	}
}

// finish ends c's life: a connection still relaying has had both EOFs, so
// it waits in closing for the peers' acknowledgements (aborting if they do
// not come); then c is closed, logged and untracked. Called once, when no
// direction runs any more.
func (p *Proxy) finish(c *conn) {
	c.mu.Lock()
	orderly := c.state == relaying
	if orderly {
		c.state = closing
	}
	c.mu.Unlock()
	if orderly {
		if reason := c.awaitClosed(); reason != "" {
			c.abort(reason)
		}
	}
	c.mu.Lock()
	wasClosing := c.state == closing
	c.state = closed
	if c.watchdog != nil {
		c.watchdog.Stop()
	}
	reason, server := c.reason, c.server
	c.mu.Unlock()
	if wasClosing { // both sides sent EOF and got ours: an orderly close
		c.client.Close()
		server.Close()
		reason = "eof"
	}
	c.log(slog.LevelInfo, reason)
	p.mu.Lock()
	delete(p.conns, c)
	p.mu.Unlock()
	p.active.Add(-1)
	p.connWG.Done()
}

// reset closes c with an RST instead of a FIN.
func reset(c *net.TCPConn) {
	c.SetLinger(0)
	c.Close()
}

// awaitClosed waits, in closing, until both sockets have reached
// TCP_CLOSE: each peer's FIN received (both directions ended) and ours
// acknowledged, with every byte before it. A closed socket would go on
// sending by itself, but only while the diversion exists: if the proxy
// then exits, its tables go, the server's ACKs are bridged to the real
// client, and the client resets the server's connection. So a connection
// counts as active (and Shutdown waits for it) until its bytes are
// delivered. It returns "" when both ended in order, else why not: a peer
// that resets now ends the wait at once (its bytes will never be
// delivered), and one that acknowledges nothing for IdleTimeout ends it
// too. An abort (Shutdown's) ends it early.
func (c *conn) awaitClosed() (reason string) {
	done, timedOut := c.waitUntil(time.Millisecond, 50*time.Millisecond, func() bool {
		for _, s := range []struct {
			name string
			c    *net.TCPConn
		}{{"client", c.client}, {"server", c.server}} {
			inClose, err := closedState(s.c)
			if err != nil {
				reason = failReason(s.name, err)
				return true
			}
			if !inClose {
				return false
			}
		}
		return true
	})
	switch {
	case timedOut:
		return "close not acknowledged"
	case done:
		return reason
	}
	return "" // aborted meanwhile: abort has its reason
}

// waitUntil polls cond (called with c.mu held, while c is closing),
// sleeping first, then twice as long each time up to most, for at most
// IdleTimeout: for what it waits on, the kernel offers a counter but no
// event. done says whether cond held; timedOut whether the time ran out.
// Both false: c was aborted.
func (c *conn) waitUntil(first, most time.Duration, cond func() bool) (done, timedOut bool) {
	deadline := c.p.now() + c.p.idle()
	for delay := first; ; delay = min(2*delay, most) {
		c.mu.Lock()
		if c.state != closing {
			c.mu.Unlock()
			return false, false
		}
		done = cond()
		c.mu.Unlock()
		if done {
			return true, false
		}
		if c.p.now() >= deadline {
			return false, true
		}
		time.Sleep(delay)
	}
}
