package proxy

import (
	"errors"
	"net"
	"runtime"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ghostwire/ghostwire/proxy/inspect"
)

// loop is one event loop: an epoll set on a thread of its own, with one
// listener per family and the connections it accepted. Everything a
// connection does (accept, dial, relay, close) happens on its loop's
// thread, one event at a time, so a message costs its read and its write
// and the loop's share of one epoll_wait, with no goroutine to wake or
// park and no lock to take. There is one loop per CPU; the kernel spreads
// new connections over their listeners (SO_REUSEPORT).
type loop struct {
	p    *Proxy
	ep   int // epoll instance
	wake int // eventfd: a command was posted
	lns  []*listener

	mu   sync.Mutex
	cmds []func()
	done chan struct{} // closed when run returns

	// Only the loop's thread touches these.
	socks    map[int]*sock // by fd
	conns    map[*conn]struct{}
	usocks   map[int]*usock // UDP sessions' sockets, by fd
	sessions map[udpKey]*udpSession
	batch    *batch  // datagram buffers, once the loop has seen UDP
	again    []*conn // to move again after the next wait: their budget ran out
	buf      []byte
	pipes    []*pipe // spare splice pipes
	// pipesUsed is p.now() when a pipe was last taken or given back:
	// spares unused for pipeIdle are closed.
	pipesUsed time.Duration
	stop      bool
}

// listener is one listening socket, owned by one loop once Serve starts.
type listener struct {
	fd       int
	network  string // "tcp4", "tcp6", "udp4" or "udp6"
	udp      bool
	addr     net.Addr
	serving  bool          // in the epoll set
	pausedAt time.Duration // p.now() until which accepting is paused (out of fds)
	backoff  time.Duration
	ovfl     uint32 // a UDP listener's SO_RXQ_OVFL count, last seen
}

// Event masks. Sockets are edge-triggered: epoll reports a change once,
// and sock keeps what it said.
const (
	sockEvents = unix.EPOLLIN | unix.EPOLLOUT | unix.EPOLLRDHUP | unix.EPOLLET
	// Listeners are level-triggered: a loop that takes a batch and moves
	// on is told again while the queue is not empty.
	listenEvents = unix.EPOLLIN
	wakeTag      = -1 // the eventfd's tag in epoll data (fds are >= 0)
)

// tickEvery is how often a loop with connections checks its timers
// (dial, idle and close timeouts, idle pipes, paused listeners).
const tickEvery = 50 * time.Millisecond

func newLoop(p *Proxy) (*loop, error) {
	ep, err := unix.EpollCreate1(unix.EPOLL_CLOEXEC)
	if err != nil {
		return nil, errors.Join(errors.New("creating epoll instance"), err)
	}
	wake, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
	if err != nil {
		unix.Close(ep)
		return nil, errors.Join(errors.New("creating eventfd"), err)
	}
	if err := unix.EpollCtl(ep, unix.EPOLL_CTL_ADD, wake, &unix.EpollEvent{Events: unix.EPOLLIN, Fd: wakeTag}); err != nil {
		unix.Close(ep)
		unix.Close(wake)
		return nil, errors.Join(errors.New("adding eventfd to epoll"), err)
	}
	return &loop{
		p: p, ep: ep, wake: wake, done: make(chan struct{}),
		socks: map[int]*sock{}, conns: map[*conn]struct{}{},
		usocks: map[int]*usock{}, sessions: map[udpKey]*udpSession{},
		buf: make([]byte, bufSize),
	}, nil
}

// post runs f on the loop's thread, soon. After the loop stopped, f does
// not run.
func (l *loop) post(f func()) {
	l.mu.Lock()
	first := len(l.cmds) == 0
	l.cmds = append(l.cmds, f)
	l.mu.Unlock()
	if first {
		unix.Write(l.wake, []byte{1, 0, 0, 0, 0, 0, 0, 0})
	}
}

// call runs f on the loop's thread and waits for it; false if the loop
// has stopped (f did not run).
func (l *loop) call(f func()) bool {
	ran := make(chan struct{})
	l.post(func() { f(); close(ran) })
	select {
	case <-ran:
		return true
	case <-l.done:
		return false
	}
}

func (l *loop) run() {
	defer close(l.done)
	// The loop is the thread's only work: no hand-over between threads
	// per event.
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	events := make([]unix.EpollEvent, 256)
	lastTick := l.p.now()
	for !l.stop {
		timeout := -1
		switch {
		case len(l.again) > 0:
			timeout = 0
		case len(l.conns) > 0 || len(l.sessions) > 0 || len(l.pipes) > 0 || l.paused():
			timeout = int(tickEvery / time.Millisecond)
		}
		n, err := unix.EpollWait(l.ep, events, timeout)
		if err != nil && err != unix.EINTR {
			l.p.log.Error("event loop failed; its connections are reset", "err", err)
			l.abortAll("event loop failed")
			return
		}
		for _, ev := range events[:max(n, 0)] {
			l.dispatch(ev)
		}
		l.moveAgain()
		if now := l.p.now(); now-lastTick >= tickEvery {
			lastTick = now
			l.tick(now)
		}
	}
}

func (l *loop) dispatch(ev unix.EpollEvent) {
	if ev.Fd == wakeTag {
		l.runCommands()
		return
	}
	fd := int(ev.Fd)
	if s, ok := l.socks[fd]; ok {
		l.event(s, ev.Events)
		return
	}
	if u, ok := l.usocks[fd]; ok {
		l.udpEvent(u)
		return
	}
	for _, ln := range l.lns {
		if ln.fd == fd && ln.serving {
			if ln.udp {
				l.udpFrom(ln)
			} else {
				l.acceptFrom(ln)
			}
			return
		}
	}
}

func (l *loop) runCommands() {
	var b [8]byte
	unix.Read(l.wake, b[:])
	l.mu.Lock()
	cmds := l.cmds
	l.cmds = nil
	l.mu.Unlock()
	for _, f := range cmds {
		f()
	}
}

// moveAgain resumes the connections whose last move stopped on its budget
// rather than on an empty socket: edge-triggered epoll would not report
// them again.
func (l *loop) moveAgain() {
	again := l.again
	l.again = nil
	for _, c := range again {
		c.again = false
		if c.state == relaying {
			l.relay(c)
		}
	}
}

// tick runs the timers of every connection of the loop: cheap (a few
// comparisons each) next to the system calls one message costs.
func (l *loop) tick(now time.Duration) {
	p := l.p
	idle, dialTimeout := p.idle(), time.Duration(p.connectTimeout.Load())
	for c := range l.conns {
		switch c.state {
		case inspecting:
			if pol := p.policy.Load(); now-c.since >= pol.timeout {
				l.decide(c, inspect.Unknown, "", "nothing to go by within "+pol.timeout.String())
			}
		case dialing:
			if now-c.since >= dialTimeout {
				p.dialFailed.Add(1)
				if p.onUnanswered != nil {
					p.onUnanswered(c.dst.Addr())
				}
				l.abort(c, "dial: timeout")
			}
		case relaying:
			if now-c.lastActive >= idle {
				l.checkIdle(c, now)
			}
			if now-c.lastActive >= pipeIdle {
				l.putPipe(&c.up)
				l.putPipe(&c.down)
			}
		case closing:
			if now-c.since >= idle {
				l.abort(c, "close not acknowledged")
			} else {
				l.checkClosed(c, &c.client)
				l.checkClosed(c, &c.server)
			}
		}
	}
	l.udpTick(now)
	if len(l.pipes) > 0 && now-l.pipesUsed >= pipeIdle {
		for _, pp := range l.pipes {
			pp.close()
		}
		l.pipes = nil
	}
	for _, ln := range l.lns {
		if ln.pausedAt != 0 && now >= ln.pausedAt {
			ln.pausedAt = 0
			l.serve(ln)
		}
	}
}

// checkIdle closes c if nothing moved for IdleTimeout: neither the relay's
// reads nor, checked only when those say idle, the kernel's count of bytes
// received or acknowledged on either socket (a receiver slowly draining
// a pipe's worth is making progress the relay does not see).
func (l *loop) checkIdle(c *conn, now time.Duration) {
	if n := progress(c.client.fd) + progress(c.server.fd); n != c.progress {
		c.progress = n
		c.lastActive = now
		return
	}
	l.abort(c, "idle timeout")
}

// serve puts ln in the epoll set: its loop accepts from it from now on.
func (l *loop) serve(ln *listener) {
	if ln.serving || ln.fd < 0 {
		return
	}
	if err := unix.EpollCtl(l.ep, unix.EPOLL_CTL_ADD, ln.fd, &unix.EpollEvent{Events: listenEvents, Fd: int32(ln.fd)}); err != nil {
		l.p.acceptFailed(errors.Join(errors.New("adding listener to epoll"), err))
		return
	}
	ln.serving = true
}

// pause stops accepting from ln for its backoff: out of fds, the queue
// would report readable again at once, and spinning helps nobody.
func (l *loop) pause(ln *listener) {
	if !ln.serving {
		return
	}
	unix.EpollCtl(l.ep, unix.EPOLL_CTL_DEL, ln.fd, nil)
	ln.serving = false
	ln.backoff = min(max(2*ln.backoff, 5*time.Millisecond), time.Second)
	ln.pausedAt = l.p.now() + ln.backoff
}

func (l *loop) paused() bool {
	for _, ln := range l.lns {
		if ln.pausedAt != 0 {
			return true
		}
	}
	return false
}

// closeListeners stops accepting for good: later connections to the port
// are refused by the kernel (or, queued ones, reset by the close).
func (l *loop) closeListeners() {
	for _, ln := range l.lns {
		if ln.fd >= 0 {
			unix.Close(ln.fd) // leaves the epoll set with it
			ln.fd, ln.serving, ln.pausedAt = -1, false, 0
		}
	}
}

// abortAll resets every connection of the loop and ends its UDP sessions.
func (l *loop) abortAll(reason string) {
	for c := range l.conns {
		l.abort(c, reason)
	}
	for _, s := range l.sessions {
		l.closeSession(s, reason)
	}
}

// close releases the loop's own fds once it has stopped.
func (l *loop) close() {
	for _, pp := range l.pipes {
		pp.close()
	}
	l.pipes = nil
	unix.Close(l.ep)
	unix.Close(l.wake)
}
