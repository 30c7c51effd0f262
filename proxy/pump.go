package proxy

import (
	"errors"
	"io"
	"net"
	"os"
	"syscall"
	"time"
)

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
	src, dst := d.src, d.dst
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
		d.total.Add(uint64(w))
		if err != nil {
			return err, false
		}
		if !full {
			continue
		}
		if eof, err, readSide := c.splice(d, lr); eof || err != nil {
			return err, readSide
		}
	}
}

// splice is pump's bulk regime: it stays on splice, as io.Copy would, until
// EOF (eof), a failure (err, and whether src's), or an idle spell (all
// zero: pump goes back to waiting the cheap way, where the sweeper's
// deadline parks it). Falling back to copying reads whenever the queue
// runs dry (it does, many times a second, in a fast stream) cost a third
// of the throughput.
func (c *conn) splice(d *direction, lr *io.LimitedReader) (eof bool, err error, readSide bool) {
	src, dst := d.src, d.dst
	for {
		lr.N = maxChunk
		w, err := dst.ReadFrom(lr)
		d.n += w
		d.total.Add(uint64(w))
		if w > 0 {
			c.touch()
		}
		switch {
		case errors.Is(err, os.ErrDeadlineExceeded) && w == 0:
			return false, nil, false // the sweeper's nudge found the flow idle
		case errors.Is(err, os.ErrDeadlineExceeded):
			// The nudge landed on a busy flow: not idle.
			src.SetReadDeadline(time.Time{})
			c.parkAsked.Store(false)
		case err != nil:
			// splice reports either end's failure the same way; the
			// socket that was reset says which.
			return false, err, wasReset(src) && !wasReset(dst)
		case w < maxChunk:
			return true, nil, false
		}
	}
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
