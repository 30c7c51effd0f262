package proxy

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// bufSize is the pooled read buffer for small messages: a read that fills
// it switches the direction to splicing.
const bufSize = 16 << 10

// maxChunk bounds one splice call chain so that activity is stamped at least
// every 256 KiB even when the receiver drains slowly: a transfer that keeps
// moving must not look idle.
const maxChunk = 256 << 10

// conn is one proxied connection: the accepted client side and the dialed
// server side. It owns no buffer: small messages borrow a pooled one for the
// length of a read and a write, bulk bytes are spliced in the kernel.
type conn struct {
	p        *Proxy
	client   *net.TCPConn
	src, dst *net.TCPAddr // client's address, original destination
	start    time.Time

	lastActive atomic.Int64 // p.now() at the last burst, in either direction
	directions atomic.Int32 // relay directions still running (or parked)
	parkAsked  atomic.Bool  // the sweeper woke the pumps to park them
	// kernelProgress is progress() of both sockets at the watchdog's last
	// look (atomic: a reload's rearm can run the watchdog twice at once).
	kernelProgress atomic.Uint64

	// up is client to server, down server to client.
	up, down direction

	mu         sync.Mutex
	server     *net.TCPConn       // nil until dialed
	cancelDial context.CancelFunc // non-nil while dialing
	watchdog   *time.Timer
	closed     bool   // sockets closed (or being closed) by abort or finish
	reason     string // why, for the log; "" = both sides ended with EOF
}

// direction is one way of a connection. n is written only by the goroutine
// relaying it (one at a time: parking hands it over) and read by finish
// after both ended.
type direction struct {
	src, dst *net.TCPConn
	from, to string // "client" / "server", for the log
	total    *atomic.Uint64
	n        int64
	relay    func(*conn) // the named relay function, to resume it
	sleepID  uint64      // non-zero while parked in the sleeper; guarded by conn.mu
	sleepFD  int
}

// accept takes a connection from a listener: it refuses direct ones and
// starts relaying diverted ones.
func (p *Proxy) accept(client *net.TCPConn) {
	src, _ := client.RemoteAddr().(*net.TCPAddr)
	dst := p.origDst(client)
	if src == nil || dst == nil {
		p.log.Error("cannot read the connection's addresses; resetting it")
		reset(client)
		return
	}
	c := &conn{p: p, client: client, src: src, dst: dst, start: time.Now()}
	// Addressed to the proxy port itself: nobody was diverted here, and
	// relaying it would dial the proxy again.
	if dst.Port == int(p.port) {
		p.refused.Add(1)
		reset(client)
		c.log(slog.LevelWarn, "direct connection to the proxy port")
		return
	}
	if p.lim.over(p.active.Load()) {
		// Not logged one by one: a flood would flood the log too. The
		// overload's end line counts them.
		p.lim.refused.Add(1)
		reset(client)
		return
	}
	p.mu.Lock()
	if p.stopped {
		p.mu.Unlock()
		reset(client)
		c.log(slog.LevelInfo, "shutdown")
		return
	}
	p.conns[c] = struct{}{}
	p.connWG.Add(1)
	p.mu.Unlock()
	p.accepted.Add(1)
	p.active.Add(1)
	go p.handle(c)
}

// handle dials upstream and hands the two directions to goroutines of
// their own; the last one to end finishes the connection. The dialing
// goroutine then exits: its stack grew deep in the dialer, and parking that
// for the life of an idle connection would cost more than a fresh one.
func (p *Proxy) handle(c *conn) {
	if !c.dialUpstream() {
		p.closeConn(c)
		return
	}
	// The directions exist before the watchdog can abort (which reads them).
	c.up = direction{src: c.client, dst: c.server, from: "client", to: "server", total: &p.up, relay: p.relayClientToServer}
	c.down = direction{src: c.server, dst: c.client, from: "server", to: "client", total: &p.down, relay: p.relayServerToClient}
	c.directions.Store(2)
	c.touch()
	c.mu.Lock()
	if !c.closed {
		c.watchdog = time.AfterFunc(p.idle(), c.checkIdle)
	}
	c.mu.Unlock()
	go p.relayServerToClient(c)
	go p.relayClientToServer(c)
}

// directionDone is called by each relay as it ends; the second one closes
// the connection and logs it.
func (p *Proxy) directionDone(c *conn) {
	if c.directions.Add(-1) == 0 {
		p.closeConn(c)
	}
}

// closeConn finishes c (closes, logs) and stops tracking it.
func (p *Proxy) closeConn(c *conn) {
	c.finish()
	p.mu.Lock()
	delete(p.conns, c)
	p.mu.Unlock()
	p.active.Add(-1)
	p.connWG.Done()
}

// dialUpstream connects to the original destination from the client's IP.
// On failure it resets the client, so the client sees the failure at once
// instead of a connection that accepted and then hangs.
func (c *conn) dialUpstream() bool {
	p := c.p
	network := "tcp4"
	if c.dst.IP.To4() == nil {
		network = "tcp6"
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Duration(p.connectTimeout.Load()))
	defer cancel()
	c.mu.Lock()
	if c.closed { // Shutdown got here first
		c.mu.Unlock()
		return false
	}
	c.cancelDial = cancel
	c.mu.Unlock()

	server, err := p.dial(ctx, network, &net.TCPAddr{IP: c.src.IP, Zone: c.src.Zone}, c.dst)

	c.mu.Lock()
	c.cancelDial = nil
	closed := c.closed
	if err == nil && !closed {
		c.server = server
	}
	c.mu.Unlock()
	switch {
	case closed:
		if server != nil {
			reset(server)
		}
		return false
	case err != nil:
		p.dialFailed.Add(1)
		if isResourceShortage(err) {
			p.lim.short(err, p.active.Load(), p.now())
		}
		c.abort(dialReason(err))
		return false
	}
	return true
}

// relayClientToServer copies the client's bytes upstream until the client's
// EOF, then half-closes the server side.
func (p *Proxy) relayClientToServer(c *conn) { c.relay(&c.up) }

// relayServerToClient copies the server's bytes downstream until the
// server's EOF, then half-closes the client side.
func (p *Proxy) relayServerToClient(c *conn) { c.relay(&c.down) }

// relay runs d until it ends, or until it is parked (its goroutine then
// exits and the sleeper starts a new one when d has something to read).
func (c *conn) relay(d *direction) {
	err, readSide := c.pump(d)
	if errors.Is(err, errParked) {
		return
	}
	c.endDirection(err, readSide, d.dst, d.from, d.to)
	c.p.directionDone(c)
}

// pump moves src's bytes to dst until src's EOF (nil error) or a failure,
// saying whether the failure was src's (readSide) or dst's.
//
// Two regimes, because an appliance carries both chatty and bulk flows:
//   - small messages (HTTP requests, keep-alive responses): the readiness
//     callback itself reads into a pooled buffer, so a message costs one
//     read and one write, and a connection with nothing to send holds no
//     buffer and no splice pipe, only its parked goroutine;
//   - bulk: once a read fills the buffer, the direction splices (kernel to
//     kernel, no copy through user space) until EOF or an idle spell, in
//     calls of up to maxChunk, stamping activity after each so a slow
//     stream never looks idle. dst.ReadFrom with an io.LimitedReader over
//     a *net.TCPConn takes Go's splice path.
//
// Either way the proxy never holds more than one buffer of a direction's
// bytes, and only while the write of them blocks: what a peer sends beyond
// that waits in the kernel's socket buffers, so a receiver that stops
// reading stops its sender (TCP flow control end to end).
func (c *conn) pump(d *direction) (err error, readSide bool) {
	src, dst, total := d.src, d.dst, d.total
	// A past deadline is how the sweeper asks a parked pump to move to the
	// sleeper; a resumed pump must not see it again, and may be asked again.
	src.SetReadDeadline(time.Time{})
	c.parkAsked.Store(false)
	rc, err := src.SyscallConn()
	if err != nil {
		return err, true
	}
	var (
		buf  *[]byte
		got  int
		rerr error
	)
	readInto := func(fd uintptr) bool {
		buf = c.p.bufs.Get().(*[]byte)
		got, rerr = readFD(fd, *buf)
		if rerr == syscall.EAGAIN {
			c.p.bufs.Put(buf)
			return false // park until the poller says readable
		}
		return true
	}
	lr := &io.LimitedReader{R: src}
	for {
		if err := rc.Read(readInto); err != nil {
			if errors.Is(err, os.ErrDeadlineExceeded) {
				return c.park(d), true
			}
			return err, true
		}
		if rerr != nil {
			c.p.bufs.Put(buf)
			return rerr, true
		}
		c.touch()
		if got == 0 {
			c.p.bufs.Put(buf)
			return nil, false // EOF
		}
		w, err := dst.Write((*buf)[:got])
		full := got == len(*buf)
		c.p.bufs.Put(buf)
		d.n += int64(w)
		total.Add(uint64(w))
		if err != nil {
			return err, false
		}
		if !full {
			continue
		}
		// Bulk: stay on splice, as io.Copy would, until EOF or an idle
		// spell. Falling back to copying reads whenever the queue runs dry
		// (it does, many times a second, in a fast stream) cost a third of
		// the throughput.
		for {
			lr.N = maxChunk
			w, err := dst.ReadFrom(lr)
			d.n += w
			total.Add(uint64(w))
			if w > 0 {
				c.touch()
			}
			switch {
			case errors.Is(err, os.ErrDeadlineExceeded) && w == 0:
				// The sweeper's nudge found the flow idle: go back to
				// waiting the cheap way, where the deadline parks it.
			case errors.Is(err, os.ErrDeadlineExceeded):
				// The nudge landed on a busy flow: not idle.
				src.SetReadDeadline(time.Time{})
				c.parkAsked.Store(false)
				continue
			case err != nil:
				// splice reports either end's failure the same way; the
				// socket that was reset says which.
				return err, wasReset(src) && !wasReset(dst)
			case w < maxChunk:
				return nil, false // EOF
			default:
				continue
			}
			break
		}
	}
}

// nudge asks c's pumps to park: their next wait ends at once with a
// deadline error, and they hand themselves to the sleeper.
func (c *conn) nudge() {
	c.mu.Lock()
	server, closed := c.server, c.closed
	c.mu.Unlock()
	if closed || server == nil || c.parkAsked.Swap(true) {
		return
	}
	past := time.Unix(1, 0)
	c.client.SetReadDeadline(past)
	server.SetReadDeadline(past)
}

// errParked says a direction's goroutine handed it to the sleeper.
var errParked = errors.New("parked")

// park hands d to the sleeper: its goroutine exits, and d.relay runs again
// on a new one when d.src has something to read (or fails).
func (c *conn) park(d *direction) error {
	d.src.SetReadDeadline(time.Time{})
	fd := -1
	if rc, err := d.src.SyscallConn(); err == nil {
		rc.Control(func(f uintptr) { fd = int(f) })
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed || fd < 0 {
		return net.ErrClosed
	}
	id, err := c.p.sleeper.park(fd, readable, func() {
		c.mu.Lock()
		d.sleepID = 0
		c.mu.Unlock()
		go d.relay(c) // pump clears the nudge and parkAsked
	})
	if err != nil {
		return fmt.Errorf("parking idle direction: %w", err)
	}
	d.sleepID, d.sleepFD = id, fd
	c.p.parkedSinceRelease.Add(1)
	return errParked
}

// unpark takes the parked directions back from the sleeper when the
// connection is being torn down: each one the sleeper had not woken yet is
// finished here, since no goroutine will come back for it. Called with
// c.mu held, before the sockets close.
func (c *conn) unpark() (finished int) {
	for _, d := range []*direction{&c.up, &c.down} {
		if d.sleepID != 0 && c.p.sleeper.cancel(d.sleepID, d.sleepFD) {
			finished++
		}
		d.sleepID = 0
	}
	return finished
}

// endDirection passes a clean EOF on as a half-close; any failure tears the
// whole connection down with resets, so neither end mistakes it for a
// complete stream.
func (c *conn) endDirection(err error, readSide bool, dst *net.TCPConn, srcName, dstName string) {
	switch {
	case err == nil:
		// If this fails the other direction fails too and says why.
		dst.CloseWrite()
	case errors.Is(err, net.ErrClosed):
		c.abort("closed") // we closed it: abort already recorded why
	case readSide:
		c.abort(failReason(srcName, err))
	default:
		c.abort(failReason(dstName, err))
	}
}

func failReason(side string, err error) string {
	var errno syscall.Errno
	switch {
	case errors.Is(err, syscall.ECONNRESET), errors.Is(err, syscall.EPIPE):
		return side + " reset"
	case errors.Is(err, syscall.ETIMEDOUT):
		return side + " timeout"
	case errors.As(err, &errno):
		return side + " error: " + errno.Error()
	default:
		return side + " error: " + err.Error()
	}
}

// abort resets both sides (and stops a dial in progress). The first reason
// wins; later calls do nothing.
//
// Resetting rather than closing is deliberate: the box is invisible, so it
// must never invent a clean end of stream that the real peer did not send.
// A peer's reset is mirrored; an idle timeout, a failed dial or a forced
// shutdown shows up as a reset too.
func (c *conn) abort(reason string) {
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return
	}
	c.closed = true
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

// finish closes what abort did not and writes the connection's log line.
// Both relay directions have ended.
func (c *conn) finish() {
	if !c.isClosed() {
		if reason := c.awaitClosed(); reason != "" {
			c.abort(reason)
		}
	}
	c.mu.Lock()
	wasClosed := c.closed
	c.closed = true
	if c.watchdog != nil {
		c.watchdog.Stop()
	}
	reason, server := c.reason, c.server
	c.mu.Unlock()
	if !wasClosed { // both sides sent EOF and got ours: an orderly close
		c.client.Close()
		server.Close()
		reason = "eof"
	}
	c.log(slog.LevelInfo, reason)
}

func (c *conn) log(level slog.Level, reason string) {
	c.p.log.LogAttrs(context.Background(), level, "connection closed",
		slog.String("client", c.src.String()),
		slog.String("server", c.dst.String()),
		slog.Int64("bytes_up", c.up.n),
		slog.Int64("bytes_down", c.down.n),
		slog.Duration("duration", time.Since(c.start)),
		slog.String("reason", reason),
	)
}

func (c *conn) touch() { c.lastActive.Store(int64(c.p.now())) }

func (p *Proxy) idle() time.Duration { return time.Duration(p.idleTimeout.Load()) }

// idleLeft is how long until c counts as idle under the current timeout.
func (c *conn) idleLeft() time.Duration {
	return c.p.idle() - (c.p.now() - time.Duration(c.lastActive.Load()))
}

// checkIdle is the watchdog: it closes c if nothing moved for IdleTimeout,
// else sleeps until the earliest moment that could be true. "Moved" is the
// relay's own reads and writes, or, checked only when those say idle, the
// kernel's count of bytes received or acknowledged on either socket: a
// receiver slowly draining one long splice is making progress, although
// the relay sees nothing until the splice returns.
func (c *conn) checkIdle() {
	left := c.idleLeft()
	if left <= 0 {
		c.mu.Lock()
		server := c.server
		c.mu.Unlock()
		if server != nil {
			if n := progress(c.client) + progress(server); c.kernelProgress.Swap(n) != n {
				c.touch()
				left = c.idleLeft()
			}
		}
	}
	if left <= 0 {
		c.abort("idle timeout")
		return
	}
	c.mu.Lock()
	if !c.closed {
		c.watchdog.Reset(left)
	}
	c.mu.Unlock()
}

// rearm reschedules the watchdog after the idle timeout changed.
func (c *conn) rearm() {
	c.mu.Lock()
	defer c.mu.Unlock()
	if !c.closed && c.watchdog != nil {
		c.watchdog.Reset(max(c.idleLeft(), 0))
	}
}

// reset closes c with an RST instead of a FIN.
func reset(c *net.TCPConn) {
	c.SetLinger(0)
	c.Close()
}

// awaitClosed waits, before an orderly close, until both sockets have
// reached TCP_CLOSE: each peer's FIN received (both directions ended) and
// ours acknowledged, with every byte before it. A closed socket would go
// on sending by itself, but only while the diversion exists: if the proxy
// then exits, its tables go, the server's ACKs are bridged to the real
// client, and the client resets the server's connection. So a connection
// counts as active (and Shutdown waits for it) until its bytes are
// delivered. It returns "" when both ended in order, else why not: a peer
// that resets now ends the wait at once (its bytes will never be
// delivered), and one that acknowledges nothing for IdleTimeout ends it
// too. abort ends it early.
func (c *conn) awaitClosed() (reason string) {
	done, timedOut := c.waitUntil(time.Millisecond, 50*time.Millisecond, func() bool {
		for _, s := range []struct {
			name string
			c    *net.TCPConn
		}{{"client", c.client}, {"server", c.server}} {
			closed, err := closedState(s.c)
			if err != nil {
				reason = failReason(s.name, err)
				return true
			}
			if !closed {
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

// waitUntil polls done (called with c.mu held, while c is open), sleeping
// first, then twice as long each time up to most, for at most IdleTimeout:
// for what it waits on, the kernel offers a counter but no event. done
// says whether done held; timedOut whether the time ran out. Both false:
// c was closed.
func (c *conn) waitUntil(first, most time.Duration, cond func() bool) (done, timedOut bool) {
	deadline := c.p.now() + c.p.idle()
	for delay := first; ; delay = min(2*delay, most) {
		c.mu.Lock()
		if c.closed {
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

func (c *conn) isClosed() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.closed
}
