//go:build linux

package lab

import (
	"errors"
	"fmt"
	"net"
	"os"
	"sync"
	"time"

	"github.com/mdlayher/packet"
	"golang.org/x/sys/unix"
)

const (
	// captureReadBuffer is large enough that a short test exchange is not
	// dropped while the reader goroutine is descheduled.
	captureReadBuffer = 8 << 20
	// captureSnap fits a GSO super-frame, which packet sockets see whole.
	captureSnap = 256 << 10
	// Stop drains the socket until it stays empty for captureDrainIdle, and
	// for no longer than captureDrainMax under continuous traffic.
	captureDrainIdle = 50 * time.Millisecond
	captureDrainMax  = time.Second
)

// Capture records every frame crossing one interface, in both directions,
// until Stop.
type Capture struct {
	ifname   string
	conn     *packet.Conn
	stop     chan struct{}
	done     chan struct{}
	stopOnce sync.Once
	closeErr error

	// keep is how many bytes of each frame are parsed and kept
	// (captureSnap: all of it).
	keep int

	mu     sync.Mutex
	frames []Frame
	err    error // why the reader gave up early, if it did
}

// Capture starts capturing on ifname inside ns with an AF_PACKET socket
// (ETH_P_ALL), so frames not addressed to the interface are seen too. The
// caller must call Stop.
func (ns *NS) Capture(ifname string) (*Capture, error) {
	return ns.capture(ifname, captureSnap)
}

// headerBytes holds the Ethernet, IP (with IPv6 extension headers) and
// TCP/UDP headers of any frame a test looks at.
const headerBytes = 256

// CaptureHeaders is Capture keeping only each frame's first 256 bytes
// (its headers), for captures across bulk transfers.
func (ns *NS) CaptureHeaders(ifname string) (*Capture, error) {
	return ns.capture(ifname, headerBytes)
}

func (ns *NS) capture(ifname string, keep int) (*Capture, error) {
	var conn *packet.Conn
	err := ns.Do(func() error {
		ifi, err := net.InterfaceByName(ifname)
		if err != nil {
			return fmt.Errorf("finding %s: %w", ifname, err)
		}
		conn, err = packet.Listen(ifi, packet.Raw, unix.ETH_P_ALL, nil)
		if err != nil {
			return fmt.Errorf("opening packet socket: %w", err)
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("starting capture on %s in %s: %w", ifname, ns.Name, err)
	}
	if err := setReadBuffer(conn, captureReadBuffer); err != nil {
		conn.Close()
		return nil, fmt.Errorf("starting capture on %s in %s: %w", ifname, ns.Name, err)
	}
	c := &Capture{ifname: ifname, conn: conn, keep: keep, stop: make(chan struct{}), done: make(chan struct{})}
	go c.readFrames()
	return c, nil
}

// setReadBuffer uses SO_RCVBUFFORCE, which root may use to exceed
// net.core.rmem_max, and falls back to SO_RCVBUF.
func setReadBuffer(conn *packet.Conn, n int) error {
	rc, err := conn.SyscallConn()
	if err != nil {
		return fmt.Errorf("setting receive buffer: %w", err)
	}
	var serr error
	if err := rc.Control(func(fd uintptr) {
		serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, n)
		if serr != nil {
			serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_RCVBUF, n)
		}
	}); err != nil {
		return fmt.Errorf("setting receive buffer: %w", err)
	}
	if serr != nil {
		return fmt.Errorf("setting SO_RCVBUF to %d: %w", n, serr)
	}
	return nil
}

// readFrames runs until Stop. There is no read deadline until Stop sets one;
// the first timeout after that starts the drain of whatever is still queued.
func (c *Capture) readFrames() {
	defer close(c.done)
	buf := make([]byte, captureSnap)
	draining := false
	var drainEnd time.Time
	for {
		n, _, err := c.conn.ReadFrom(buf)
		if err != nil {
			if !errors.Is(err, os.ErrDeadlineExceeded) {
				select {
				case <-c.stop:
				default:
					c.setErr(fmt.Errorf("reading from %s: %w", c.ifname, err))
				}
				return
			}
			if draining {
				return // the queue stayed empty for captureDrainIdle
			}
			select {
			case <-c.stop:
			default:
				continue // not ours: only Stop sets deadlines
			}
			draining = true
			drainEnd = time.Now().Add(captureDrainMax)
		} else if f, err := ParseFrame(buf[:min(n, c.keep)]); err == nil {
			c.mu.Lock()
			c.frames = append(c.frames, f)
			c.mu.Unlock()
		}
		if draining {
			if time.Now().After(drainEnd) {
				return
			}
			if err := c.conn.SetReadDeadline(time.Now().Add(captureDrainIdle)); err != nil {
				c.setErr(fmt.Errorf("draining %s: %w", c.ifname, err))
				return
			}
		}
	}
}

func (c *Capture) setErr(err error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.err = err
}

// Frames returns a copy of the frames captured so far, without stopping.
func (c *Capture) Frames() []Frame {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]Frame(nil), c.frames...)
}

// Stop stops the capture and returns every frame received, including those
// still queued in the socket when Stop was called, in arrival order. The
// error reports a failed read or close; frames are returned regardless.
// Stop may be called more than once.
func (c *Capture) Stop() ([]Frame, error) {
	c.stopOnce.Do(func() {
		close(c.stop)
		// A deadline in the past wakes the blocked reader, which then drains.
		err := c.conn.SetReadDeadline(time.Now())
		if err != nil {
			// Closing is the other way to wake the reader; queued frames are lost.
			c.closeErr = fmt.Errorf("stopping capture on %s: %w", c.ifname, err)
			_ = c.conn.Close()
		}
		<-c.done
		if err == nil {
			if err := c.conn.Close(); err != nil {
				c.closeErr = fmt.Errorf("closing capture on %s: %w", c.ifname, err)
			}
		}
	})
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]Frame(nil), c.frames...), errors.Join(c.err, c.closeErr)
}
