package proxy

import (
	"golang.org/x/sys/unix"

	"github.com/ghostwire/ghostwire/proxy/inspect"
)

// moveBudget bounds what one connection moves per event before the loop
// turns to the others (it comes back after the next epoll_wait): a bulk
// stream must not starve the loop's other connections.
const moveBudget = 2 * pipeSize

// event takes what epoll says of s and acts on it.
func (l *loop) event(s *sock, events uint32) {
	c := s.c
	if events&(unix.EPOLLIN|unix.EPOLLRDHUP|unix.EPOLLHUP|unix.EPOLLERR) != 0 {
		s.readable = true
	}
	if events&(unix.EPOLLRDHUP|unix.EPOLLHUP|unix.EPOLLERR) != 0 {
		s.rdhup = true
	}
	if events&(unix.EPOLLOUT|unix.EPOLLHUP|unix.EPOLLERR) != 0 {
		s.writable = true
	}
	failed := events&unix.EPOLLERR != 0
	switch c.state {
	case inspecting:
		if failed {
			l.abort(c, failReason(s.name, sockError(s.fd)))
			return
		}
		l.inspectEvent(c)
	case dialing:
		switch {
		case s == &c.server:
			l.connected(c)
		case failed: // the client gave up before the server answered
			l.abort(c, failReason(s.name, sockError(s.fd)))
		}
	case relaying:
		if failed {
			// A peer's reset: mirror it at once. What it had queued is
			// lost to it anyway.
			l.abort(c, failReason(s.name, sockError(s.fd)))
			return
		}
		l.relay(c)
	case closing:
		l.checkClosed(c, s)
	}
}

// relay moves both directions as far as the sockets allow, and starts the
// close once both have passed their EOF on.
func (l *loop) relay(c *conn) {
	if !l.move(c, &c.up) || !l.move(c, &c.down) {
		return // aborted
	}
	if c.up.shut && c.down.shut {
		c.state, c.since = closing, l.p.now()
		// A socket whose FIN the proxy sent just now cannot be closed
		// before its peer acks it, which wakes epoll: ask only the other.
		for _, s := range []*sock{&c.client, &c.server} {
			if !s.finNow {
				l.checkClosed(c, s)
			}
		}
	}
	c.client.finNow, c.server.finNow = false, false
}

// move relays h until src has nothing more, dst takes nothing more, or the
// budget is spent; it reports false if it aborted c.
//
// Two regimes, because an appliance carries both chatty and bulk flows:
//   - small messages: read into the loop's buffer, write on. A read that
//     did not fill the buffer took everything queued, so the next one waits
//     for epoll's next edge (unless the peer's FIN is known to be there):
//     two system calls per message. What dst does not take at once waits
//     in a pooled buffer, and src is not read until it is gone.
//   - bulk: once a read fills the buffer, the direction splices through a
//     pipe (kernel to kernel, no copy through user space). The pipe holds
//     at most its size; src is not read while it is not empty.
//
// Either way what a peer sends beyond one buffer or one pipe waits in the
// kernel's socket buffers: TCP flow control end to end.
func (l *loop) move(c *conn, h *half) bool {
	budget := moveBudget
	for {
		switch {
		case h.pipe != nil && h.pipe.n > 0:
			if !h.dst.writable {
				return true
			}
			n, err := spliceOut(h.pipe, h.dst.fd)
			if err == unix.EAGAIN {
				h.dst.writable = false
				return true
			}
			if err != nil {
				l.abort(c, failReason(h.dst.name, err))
				return false
			}
			h.pipe.n -= n
			h.sent(n)
			continue
		case len(h.pend) > 0:
			if !h.dst.writable {
				return true
			}
			n, err := writeFD(h.dst.fd, h.pend)
			if err == unix.EAGAIN {
				h.dst.writable = false
				return true
			}
			if err != nil {
				l.abort(c, failReason(h.dst.name, err))
				return false
			}
			h.pend = h.pend[n:]
			h.sent(n)
			if len(h.pend) == 0 {
				l.p.bufs.Put(h.pendBuf)
				h.pend, h.pendBuf = nil, nil
			}
			continue
		case h.eof:
			if !h.shut {
				// If this fails, dst is gone and its own event says why.
				unix.Shutdown(h.dst.fd, unix.SHUT_WR)
				h.shut, h.dst.finNow = true, true
				l.putPipe(h)
			}
			return true
		case !h.src.readable:
			return true
		case budget <= 0:
			if !c.again {
				c.again = true
				l.again = append(l.again, c)
			}
			return true
		}

		// Bulk splices into the (empty) pipe, small messages read into the
		// loop's buffer.
		piped := h.pipe != nil
		var (
			n, room int
			err     error
		)
		if piped {
			n, err = spliceIn(h.src.fd, h.pipe)
			room = pipeSize
		} else {
			n, err = readFD(h.src.fd, l.buf)
			room = len(l.buf)
		}
		switch {
		case err == unix.EAGAIN:
			h.src.readable = false
			return true
		case err != nil:
			l.abort(c, failReason(h.src.name, err))
			return false
		case n == 0:
			h.eof = true
			continue
		}
		c.lastActive = l.p.now()
		budget -= n
		// A short read took everything queued (tcp_recvmsg stops only on
		// an empty queue), so the next one waits for the next edge. A
		// short splice does not: a non-blocking tcp_splice_read takes one
		// pass over the queue and can stop on the pipe's slots with data
		// still queued, and with no new data no edge would come (a stalled
		// transfer, seen after packet loss). Bulk reads on to EAGAIN.
		if !piped && n < room && !h.src.rdhup {
			h.src.readable = false
		}
		if piped {
			h.pipe.n = n
			continue
		}
		if h == &c.up && !c.named {
			c.named = true
			if c.insp.decision == "" {
				// No policy peeked: name the connection from its first
				// read, for the log, at no cost to the path.
				c.insp.kind, c.insp.name, _ = inspect.Name(l.buf[:n])
			}
		}
		if n == room {
			h.pipe = l.getPipe() // nil if none can be had: go on copying
		}
		w := 0
		if h.dst.writable {
			w, err = writeFD(h.dst.fd, l.buf[:n])
			if err == unix.EAGAIN {
				w, err = 0, nil
				h.dst.writable = false
			}
			if err != nil {
				l.abort(c, failReason(h.dst.name, err))
				return false
			}
			h.sent(w)
		}
		if w < n {
			h.pendBuf = l.p.bufs.Get().(*[]byte)
			h.pend = (*h.pendBuf)[:copy(*h.pendBuf, l.buf[w:n])]
		}
	}
}

func (h *half) sent(n int) {
	h.n += int64(n)
	h.total.Add(uint64(n))
}

// checkClosed, for a closing c, notes whether s has reached TCP_CLOSE
// (both FINs exchanged and ours acknowledged, with every byte before it)
// and finishes c once both have. A socket that was reset instead ends the
// wait at once: its bytes will never be delivered.
//
// Why wait: a socket closed earlier would send the rest by itself, but
// only while the diversion exists; if the proxy then exits, its tables
// go, the server's ACKs are bridged to the real client, and the client
// resets the server's connection. So a connection counts as active (and
// Shutdown waits for it) until its bytes are delivered. Every change of
// TCP state wakes epoll, so this costs one getsockopt per change.
func (l *loop) checkClosed(c *conn, s *sock) {
	if c.state != closing || s.closed {
		return
	}
	inClose, err := closedState(s.fd)
	if err != nil {
		l.abort(c, failReason(s.name, err))
		return
	}
	s.closed = inClose
	if c.client.closed && c.server.closed {
		l.finish(c, "eof")
	}
}
