package proxy

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"syscall"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// offloaded is the part of a conn the kernel forwards (see offloader): the
// process holds the two sockets as raw fds, outside Go's poller, which
// every forwarded message would otherwise wake, and watches them only for
// FINs and errors. Guarded by conn.mu; an fd is used only while the conn
// is not closed.
type offloaded struct {
	fd        [2]int    // client side, server side
	watch     [2]uint64 // sleeper ids, 0 when not watched
	ended     [2]bool   // that side's FIN has been passed on
	finishing bool      // closeConn has been called or is about to be
}

var sideName = [2]string{"client", "server"}

// offload hands c's bytes to the kernel, so that no relay goroutine is
// needed; both pumps are stopped (see hold). It fails (false, c untouched)
// when the kernel will not take the pair, e.g. a FIN already arrived; the
// caller relays on then.
func (c *conn) offload() bool {
	p := c.p
	a, err := dupFD(c.client)
	if err != nil {
		return false
	}
	b, err := dupFD(c.server)
	if err != nil {
		unix.Close(a)
		return false
	}
	if err := p.offload.pair(a, b); err != nil {
		unix.Close(a)
		unix.Close(b)
		p.log.Debug("relaying in user space", "client", c.src.String(), "err", err)
		return false
	}
	c.mu.Lock()
	if c.closed { // aborted meanwhile; its resets went to the Go side
		c.mu.Unlock()
		resetFD(a)
		resetFD(b)
		p.closeConn(c)
		return true
	}
	c.off = &offloaded{fd: [2]int{a, b}}
	c.handoff, c.handingOff = false, false
	c.parkAsked.Store(true) // nothing for the sweeper to park
	p.offloaded.Add(1)
	if c.watchdog == nil {
		c.watchdog = time.AfterFunc(p.idle(), c.checkIdle)
	}
	err = c.watchSide(0, peerClosed)
	if err == nil {
		err = c.watchSide(1, peerClosed)
	}
	c.mu.Unlock()
	// The duplicates keep the sockets open; Go's copies only cost wake-ups.
	c.client.Close()
	c.server.Close()
	if err != nil {
		c.abort(fmt.Sprintf("error: %v", err))
	}
	return true
}

// watchSide asks the sleeper to report side i's FIN or error. c.mu held.
func (c *conn) watchSide(i int, events uint32) error {
	id, err := c.p.sleeper.park(c.off.fd[i], events, func() {
		c.mu.Lock()
		c.off.watch[i] = 0
		c.mu.Unlock()
		go c.sideEvent(i)
	})
	if err != nil {
		return fmt.Errorf("watching offloaded socket: %w", err)
	}
	c.off.watch[i] = id
	return nil
}

// sideEvent handles what the sleeper saw on side i: an error is mirrored
// as resets; a FIN is passed on once every byte before it has reached the
// other socket's send queue.
func (c *conn) sideEvent(i int) {
	c.mu.Lock()
	off := c.off
	if c.closed || off.finishing {
		c.mu.Unlock()
		return
	}
	fds := []unix.PollFd{{Fd: int32(off.fd[i]), Events: unix.POLLRDHUP}}
	unix.Poll(fds, 0)
	ev := fds[0].Revents
	switch {
	case ev&unix.POLLERR != 0:
		errno, _ := unix.GetsockoptInt(off.fd[i], unix.SOL_SOCKET, unix.SO_ERROR)
		c.mu.Unlock()
		c.abort(failReason(sideName[i], syscall.Errno(errno)))
		return
	case off.ended[i] || ev&unix.POLLRDHUP == 0:
		// Nothing new: keep watching.
		events := uint32(peerClosed)
		if off.ended[i] {
			events = failed
		}
		err := c.watchSide(i, events)
		c.mu.Unlock()
		if err != nil {
			c.abort(fmt.Sprintf("error: %v", err))
		}
		return
	}
	c.mu.Unlock()

	if !c.awaitForwarded(i) {
		return
	}
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return
	}
	err := unix.Shutdown(off.fd[1-i], unix.SHUT_WR)
	off.ended[i] = true
	done := off.ended[1-i]
	if done {
		off.finishing = true
	} else if err == nil {
		// Side i may still reset while the other direction runs.
		err = c.watchSide(i, failed)
	}
	c.mu.Unlock()
	switch {
	case err != nil:
		c.abort(failReason(sideName[1-i], err))
	case done:
		c.p.closeConn(c)
	}
}

// awaitForwarded waits until the other socket has queued every byte side i
// sent before its FIN: the kernel forwards them asynchronously, and a FIN
// passed on earlier would cut them off. Usually true at once. False when c
// was closed meanwhile (or is, after a stall of IdleTimeout).
func (c *conn) awaitForwarded(i int) bool {
	var err error
	done, timedOut := c.waitUntil(20*time.Microsecond, 10*time.Millisecond, func() bool {
		got, gerr := unix.GetsockoptTCPInfo(c.off.fd[i], unix.IPPROTO_TCP, unix.TCP_INFO)
		sent, serr := unix.GetsockoptTCPInfo(c.off.fd[1-i], unix.IPPROTO_TCP, unix.TCP_INFO)
		if err = errors.Join(gerr, serr); err != nil {
			return true
		}
		return written(sent) >= got.Bytes_received-1 // the FIN counts one
	})
	switch {
	case err != nil:
		c.abort(fmt.Sprintf("error: reading TCP_INFO: %v", err))
		return false
	case timedOut:
		c.abort("idle timeout")
		return false
	}
	return done
}

// written is how many bytes a socket has taken for sending: sent once,
// plus not sent yet.
func written(ti *unix.TCPInfo) uint64 {
	return ti.Bytes_sent - ti.Bytes_retrans + uint64(ti.Notsent_bytes)
}

// offloadedActivity stamps c's last activity from the kernel's own record
// of when each socket last received data: no user-space code sees the
// bytes. c.mu held.
func (c *conn) offloadedActivity() {
	if c.closed {
		return
	}
	var since uint32 = 1<<32 - 1
	for _, fd := range c.off.fd {
		if ti, err := unix.GetsockoptTCPInfo(fd, unix.IPPROTO_TCP, unix.TCP_INFO); err == nil {
			since = min(since, ti.Last_data_recv)
		}
	}
	c.lastActive.Store(int64(c.p.now() - time.Duration(since)*time.Millisecond))
}

// countOffloaded records the bytes each socket took for sending, for the
// log and the totals. c.mu held, fds open.
func (c *conn) countOffloaded() {
	for i, d := range []*direction{&c.up, &c.down} {
		// Side i's bytes are what the other side's socket sent.
		// It counts what the relay wrote before the handoff too.
		if ti, err := unix.GetsockoptTCPInfo(c.off.fd[1-i], unix.IPPROTO_TCP, unix.TCP_INFO); err == nil {
			n := int64(written(ti))
			d.total.Add(uint64(n - d.n))
			d.n = n
		}
	}
}

// unwatchOffloaded stops the sleeper's reports. c.mu held.
func (c *conn) unwatchOffloaded() {
	for i, id := range c.off.watch {
		if id != 0 {
			c.p.sleeper.cancel(id, c.off.fd[i])
			c.off.watch[i] = 0
		}
	}
}

// abortOffloaded resets both sockets; closeConn runs unless a FIN path
// already owns it. c.mu held, c.closed just set; it unlocks.
func (c *conn) abortOffloaded() {
	c.unwatchOffloaded()
	c.countOffloaded()
	resetFD(c.off.fd[0])
	resetFD(c.off.fd[1])
	owner := !c.off.finishing
	c.off.finishing = true
	c.mu.Unlock()
	if owner {
		c.p.closeConn(c)
	}
}

// finishOffloaded closes both sockets after both FINs were passed on and
// acknowledged, then logs. Both sides have ended, or abort closed them.
func (c *conn) finishOffloaded() {
	// As awaitAcked, and closing anyway when the time runs out.
	c.waitUntil(time.Millisecond, 50*time.Millisecond, func() bool {
		return unackedFD(c.off.fd[0])+unackedFD(c.off.fd[1]) == 0
	})
	c.mu.Lock()
	if !c.closed {
		c.closed = true
		c.reason = "eof"
		c.unwatchOffloaded()
		c.countOffloaded()
		unix.Close(c.off.fd[0])
		unix.Close(c.off.fd[1])
	}
	if c.watchdog != nil {
		c.watchdog.Stop()
	}
	reason := c.reason
	c.mu.Unlock()
	c.p.offloaded.Add(-1)
	c.log(slog.LevelInfo, reason)
}

// dupFD duplicates c's socket as a raw fd that Go's poller does not know.
func dupFD(c *net.TCPConn) (int, error) {
	rc, err := c.SyscallConn()
	if err != nil {
		return -1, err
	}
	nfd := -1
	cerr := rc.Control(func(fd uintptr) {
		nfd, err = unix.FcntlInt(fd, unix.F_DUPFD_CLOEXEC, 0)
	})
	if cerr != nil {
		return -1, cerr
	}
	if err != nil {
		return -1, fmt.Errorf("duplicating socket: %w", err)
	}
	return nfd, nil
}

// resetFD closes fd with an RST instead of a FIN.
func resetFD(fd int) {
	unix.SetsockoptLinger(fd, unix.SOL_SOCKET, unix.SO_LINGER, &unix.Linger{Onoff: 1, Linger: 0})
	unix.Close(fd)
}

// unackedFD is SIOCOUTQ on a raw fd (see unacked).
func unackedFD(fd int) int {
	var q int32
	if _, _, e := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), unix.SIOCOUTQ, uintptr(unsafe.Pointer(&q))); e != 0 {
		return 0
	}
	return int(q)
}
