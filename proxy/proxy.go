// Package proxy relays transparently intercepted TCP connections to their original destination, as the client.
//
// The box's nftables rules divert client SYNs with TPROXY to Config.Port,
// where Proxy accepts them as the server (the accepted socket's local
// address is the original destination) and dials that destination from the
// client's IP, relaying bytes both ways with splice(2).
//
// The proxy cannot loop onto itself. Its upstream sockets are locally
// originated: their packets take the output path and never traverse
// prerouting, where the tproxy rule lives, so they are never diverted back
// to the proxy port. A connection addressed to the proxy port directly (not
// diverted) is refused by the nft input rule, and if one gets through anyway
// Proxy resets it instead of relaying it (its original destination would be
// the proxy itself).
package proxy

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net"
	"os"
	"runtime"
	"runtime/debug"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"time"
)

// Config is what New needs. Timeouts can change later with SetTimeouts.
type Config struct {
	Port           uint16        // TPROXY listen port, on 0.0.0.0 and [::] (two listeners, v6 with V6ONLY)
	ConnectTimeout time.Duration // upstream dial timeout
	IdleTimeout    time.Duration // no bytes in EITHER direction for this long -> close both (a long one-way download is NOT idle)
	Logger         *slog.Logger  // nil = discard
	// ParkAfter is how long a connection stays idle before its two relay
	// goroutines hand it to an epoll set and exit, so that idle
	// connections cost no goroutine stacks (0 = 1s).
	ParkAfter time.Duration
	// ReceiveBuffer fixes each relayed socket's receive buffer (SO_RCVBUF,
	// which the kernel doubles for its own overhead), so that what a peer
	// can have queued on the box is known whatever tcp_rmem allows; it also
	// bounds the window a peer sees, so a single flow's rate is at most
	// about ReceiveBuffer / RTT. 0 leaves the kernel's autotuning, up to
	// tcp_rmem's maximum. See ConnMemoryBound.
	ReceiveBuffer int
	// MaxConns is how many connections the proxy relays at once (0 = no
	// limit; DefaultMaxConns derives one from the fd limit). Reaching it,
	// or running out of fds or kernel buffers, overloads the proxy (see
	// OnOverload) until the count is down to 90% of it.
	MaxConns int
	// RefuseOverload resets connections that reach the proxy while it is
	// overloaded; otherwise they are relayed. Either way they are the few
	// that raced the switch of the diversion (see OnOverload). SetRefuseOverload
	// changes it live.
	RefuseOverload bool
	// OnOverload is called when an overload starts and when it ends, one
	// call at a time, in order. It must not block: it is where the caller
	// switches the diversion so that new connections stop reaching the
	// proxy (bypass or refuse) while it lasts. Nil: only the log says so.
	OnOverload func(Overload)

	// Test hooks; nil means production behaviour.

	// Listen opens one listener: network is "tcp4" or "tcp6", addr
	// "0.0.0.0:PORT" or "[::]:PORT". Default: a transparent listener.
	Listen func(network, addr string) (net.Listener, error)
	// Dial connects upstream from local (client IP, port 0) to remote
	// within ctx's deadline. Default: a transparent dialer.
	Dial func(ctx context.Context, network string, local, remote *net.TCPAddr) (*net.TCPConn, error)
	// OrigDst returns the client's original destination. Default: the
	// accepted connection's local address.
	OrigDst func(c *net.TCPConn) *net.TCPAddr
}

// Stats are counters since New; all fields are read atomically.
type Stats struct {
	Active     int64  // connections open now (dialing or relaying)
	Accepted   uint64 // diverted connections taken for relaying
	Refused    uint64 // direct connections to the proxy port, reset unrelayed
	DialFailed uint64 // accepted connections whose upstream dial failed
	BytesUp    uint64 // client -> server
	BytesDown  uint64 // server -> client
	Overloaded bool   // at the limit or short of resources now (see Config.OnOverload)
	// OverloadRefused counts connections reset because the proxy was
	// overloaded (RefuseOverload, or no fd left to relay them with).
	OverloadRefused uint64
	Parked          int // relay directions idle in the epoll set, not on goroutines
}

// Proxy is a transparent TCP relay. Create it with New.
type Proxy struct {
	port   uint16
	log    *slog.Logger
	listen func(network, addr string) (net.Listener, error)
	// listenersPerFamily is 1 with a test Listen hook (port 0 would give
	// each listener its own port), else one per CPU.
	listenersPerFamily int
	dial               func(ctx context.Context, network string, local, remote *net.TCPAddr) (*net.TCPConn, error)
	origDst            func(c *net.TCPConn) *net.TCPAddr

	connectTimeout atomic.Int64 // time.Duration
	idleTimeout    atomic.Int64 // time.Duration
	epoch          time.Time    // monotonic origin of conn.lastActive

	mu        sync.Mutex
	started   bool
	serving   bool
	stopped   bool          // Shutdown called: no new conns are tracked
	settling  bool          // StopAccepting called: a deadline ends the accept loops
	loopsDone chan struct{} // closed when Serve's accept loops have ended
	listeners []net.Listener
	conns     map[*conn]struct{}
	quit      chan struct{} // closed by the first Shutdown
	connWG    sync.WaitGroup

	bufs sync.Pool // *[]byte of bufSize, held only while a message is in hand

	parkAfter          time.Duration
	parkedSinceRelease atomic.Int64
	sleeper            *sleeper      // set by Start
	stopSweep          chan struct{} // closed by Shutdown once drained
	lim                *limiter
	onOverload         func(Overload)

	active                                  atomic.Int64
	accepted, refused, dialFailed, up, down atomic.Uint64
}

// New validates cfg and returns a Proxy ready to Start.
func New(cfg Config) (*Proxy, error) {
	var errs []error
	if cfg.Port == 0 {
		errs = append(errs, errors.New("proxy port: 0 is outside 1-65535"))
	}
	if cfg.ConnectTimeout <= 0 {
		errs = append(errs, fmt.Errorf("connect timeout: %v must be positive", cfg.ConnectTimeout))
	}
	if cfg.IdleTimeout <= 0 {
		errs = append(errs, fmt.Errorf("idle timeout: %v must be positive", cfg.IdleTimeout))
	}
	if cfg.ReceiveBuffer < 0 {
		errs = append(errs, fmt.Errorf("receive buffer: %d is negative", cfg.ReceiveBuffer))
	}
	if cfg.MaxConns < 0 {
		errs = append(errs, fmt.Errorf("max connections: %d is negative", cfg.MaxConns))
	}
	if err := errors.Join(errs...); err != nil {
		return nil, fmt.Errorf("invalid proxy config: %w", err)
	}
	p := &Proxy{
		port:    cfg.Port,
		log:     cfg.Logger,
		listen:  cfg.Listen,
		dial:    cfg.Dial,
		origDst: cfg.OrigDst,
		epoch:   time.Now(),
		conns:   make(map[*conn]struct{}),
		quit:    make(chan struct{}),
	}
	p.bufs.New = func() any { b := make([]byte, bufSize); return &b }
	p.lim = newLimiter(cfg.MaxConns, cfg.RefuseOverload)
	p.onOverload = cfg.OnOverload
	if p.onOverload == nil {
		p.onOverload = func(Overload) {}
	}
	p.parkAfter = cfg.ParkAfter
	if p.parkAfter <= 0 {
		p.parkAfter = time.Second
	}
	if p.log == nil {
		p.log = slog.New(slog.DiscardHandler)
	}
	p.listenersPerFamily = 1
	if p.listen == nil {
		p.listen = listenTransparent(cfg.ReceiveBuffer)
		p.listenersPerFamily = runtime.GOMAXPROCS(0)
	}
	if p.dial == nil {
		p.dial = dialTransparent(cfg.ReceiveBuffer)
	}
	if p.origDst == nil {
		p.origDst = origDst
	}
	p.connectTimeout.Store(int64(cfg.ConnectTimeout))
	p.idleTimeout.Store(int64(cfg.IdleTimeout))
	return p, nil
}

// Start opens the IPv4 and IPv6 listeners. If either fails, nothing stays
// open.
func (p *Proxy) Start() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.started || p.stopped {
		return errors.New("proxy already started (or shut down)")
	}
	port := strconv.Itoa(int(p.port))
	var lns []net.Listener
	for _, l := range []struct{ network, addr string }{
		{"tcp4", net.JoinHostPort("0.0.0.0", port)},
		{"tcp6", net.JoinHostPort("::", port)},
	} {
		ln, err := p.listen(l.network, l.addr)
		// One listener per CPU (SO_REUSEPORT): the kernel spreads new
		// connections over them, so accepting is not one goroutine's job.
		for i := 1; err == nil && i < p.listenersPerFamily; i++ {
			lns = append(lns, ln)
			ln, err = p.listen(l.network, l.addr)
		}
		if err != nil {
			for _, ln := range lns {
				ln.Close()
			}
			return fmt.Errorf("opening %s listener: %w", l.network, err)
		}
		lns = append(lns, ln)
	}
	sl, err := newSleeper()
	if err != nil {
		for _, ln := range lns {
			ln.Close()
		}
		return err
	}
	p.listeners = lns
	p.sleeper = sl
	p.lim.openReserve()
	p.stopSweep = make(chan struct{})
	go p.sweepIdle(p.stopSweep)
	go p.watchOverload(p.stopSweep)
	p.started = true
	return nil
}

// sweepIdle nudges connections idle for parkAfter: a read deadline in the
// past wakes their parked pumps, which then move to the sleeper. The hot
// path pays nothing for this.
func (p *Proxy) sweepIdle(stop <-chan struct{}) {
	t := time.NewTicker(p.parkAfter / 2)
	defer t.Stop()
	// p.accepted at the last idle release and at the last tick: release
	// once per quiet spell, after a whole tick with no new connection.
	var releasedAt, lastTick uint64
	for {
		select {
		case <-stop:
			return
		case <-t.C:
		}
		now := p.now()
		var idle []*conn
		p.mu.Lock()
		for c := range p.conns {
			if now-time.Duration(c.lastActive.Load()) >= p.parkAfter && !c.parkAsked.Load() {
				idle = append(idle, c)
			}
		}
		p.mu.Unlock()
		for _, c := range idle {
			c.nudge()
		}
		// Parked goroutines leave their stacks in the runtime's pools, and
		// an idle process runs no GC to hand them back to the OS. After a
		// large batch, do it once.
		if p.parkedSinceRelease.Load() >= releaseAfterParks {
			p.parkedSinceRelease.Store(0)
			debug.FreeOSMemory()
		}
		// The same once the proxy has gone quiet after traffic: what a
		// burst grew (heap, stacks, the splice pipes Go pools and closes
		// only when a GC drops them from the pool) goes back, so an idle
		// box holds what an idle box needs.
		n := p.accepted.Load()
		if n == lastTick && n != releasedAt && p.active.Load() == 0 {
			releasedAt = n
			releaseMemory()
		}
		lastTick = n
	}
}

// releaseMemory returns what the process no longer uses to the OS. A pooled
// object survives one GC in the pool's victim cache, so it takes two to
// free it; a splice pipe's fds close in its finalizer after that.
func releaseMemory() {
	runtime.GC()
	runtime.GC()
	debug.FreeOSMemory()
}

// releaseAfterParks is how many parked directions make it worth a GC to
// return their stacks' memory.
const releaseAfterParks = 1024

// Serve accepts connections until ctx is done or Shutdown is called, then
// closes the listeners and returns: nil after Shutdown, ctx's error after
// ctx, or the accept error that stopped it. Established connections are not
// touched: they end with Shutdown.
func (p *Proxy) Serve(ctx context.Context) error {
	p.mu.Lock()
	switch {
	case p.stopped:
		p.mu.Unlock()
		return nil
	case !p.started:
		p.mu.Unlock()
		return errors.New("proxy not started")
	case p.serving:
		p.mu.Unlock()
		return errors.New("proxy already serving")
	}
	p.serving = true
	lns := p.listeners
	loopsDone := make(chan struct{})
	p.loopsDone = loopsDone
	p.mu.Unlock()

	watcherDone := make(chan struct{})
	go func() {
		defer close(watcherDone)
		select {
		case <-ctx.Done():
			p.closeListeners()
		case <-loopsDone:
		}
	}()
	errc := make(chan error, len(lns))
	for _, ln := range lns {
		go func() { errc <- p.acceptLoop(ln) }()
	}
	var first error
	for range lns {
		if err := <-errc; err != nil && first == nil {
			first = err
			p.closeListeners() // one family failing stops both: exit, fail open
		}
	}
	close(loopsDone)
	<-watcherDone
	if first != nil {
		return first
	}
	if p.isStopped() {
		return nil
	}
	return ctx.Err()
}

// acceptLoop takes connections from ln until it is closed.
func (p *Proxy) acceptLoop(ln net.Listener) error {
	var backoff time.Duration
	for {
		nc, err := ln.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) || errors.Is(err, os.ErrDeadlineExceeded) && p.isSettling() {
				return nil
			}
			if !isResourceShortage(err) {
				return fmt.Errorf("accepting on %s: %w", ln.Addr(), err)
			}
			// Out of fds or memory: established connections will free
			// some; dying would cut them all. The limiter logs the spell
			// once and has the diversion stop sending new connections;
			// those already queued are shed, not left hanging.
			p.lim.short(err, p.active.Load(), p.now())
			if p.shedOne(ln) {
				continue
			}
			backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
			t := time.NewTimer(backoff)
			select {
			case <-t.C:
			case <-p.quit:
				t.Stop()
			}
			continue
		}
		backoff = 0
		c, ok := nc.(*net.TCPConn)
		if !ok {
			p.log.Error("listener returned a non-TCP connection", "type", fmt.Sprintf("%T", nc))
			nc.Close()
			continue
		}
		p.accept(c)
	}
}

// StopAccepting keeps taking connections for settle, then stops. Call it
// after the diversion stopped sending new SYNs here (the draining ruleset):
// handshakes already under way still complete into the listen queue within
// a round trip, and closing the listener then would reset them. Each one
// taken is relayed as usual. Shutdown closes the listeners afterwards.
func (p *Proxy) StopAccepting(settle time.Duration) {
	p.mu.Lock()
	p.settling = true
	lns, done := p.listeners, p.loopsDone
	p.mu.Unlock()
	deadline := time.Now().Add(settle)
	for _, ln := range lns {
		if d, ok := ln.(interface{ SetDeadline(time.Time) error }); ok {
			d.SetDeadline(deadline)
		}
	}
	if done != nil {
		<-done
	}
}

func (p *Proxy) isSettling() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.settling
}

// Shutdown stops accepting at once, waits for established connections to
// finish until ctx is done, then resets the rest (reason "shutdown") and
// waits for their goroutines. It returns nil if everything drained, else an
// error wrapping ctx's.
func (p *Proxy) Shutdown(ctx context.Context) error {
	p.mu.Lock()
	if !p.stopped {
		p.stopped = true
		close(p.quit)
	}
	p.mu.Unlock()
	p.closeListeners()

	// No Add can follow: accept checks p.stopped under p.mu.
	drained := make(chan struct{})
	go func() {
		p.connWG.Wait()
		close(drained)
	}()
	defer p.stopSleeper()
	select {
	case <-drained:
		return nil
	case <-ctx.Done():
	}
	p.mu.Lock()
	open := make([]*conn, 0, len(p.conns))
	for c := range p.conns {
		open = append(open, c)
	}
	p.mu.Unlock()
	for _, c := range open {
		c.abort("shutdown")
	}
	<-drained
	return fmt.Errorf("closed %d connections still open after the grace period: %w", len(open), ctx.Err())
}

// stopSleeper ends the sweeper and the sleeper once no connection is left.
func (p *Proxy) stopSleeper() {
	p.mu.Lock()
	s, stop := p.sleeper, p.stopSweep
	p.stopSweep = nil
	p.mu.Unlock()
	if stop != nil {
		close(stop)
		s.close()
	}
	p.lim.closeReserve()
}

func (p *Proxy) closeListeners() {
	p.mu.Lock()
	lns := p.listeners
	p.mu.Unlock()
	for _, ln := range lns {
		ln.Close() // a second close only returns an error
	}
}

func (p *Proxy) isStopped() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.stopped
}

// SetTimeouts changes the timeouts live (SIGHUP). The connect timeout
// applies to dials that start later; the idle timeout to every connection,
// counted from its last activity, so a connection already idle for longer
// than the new value closes now. Non-positive values are ignored.
func (p *Proxy) SetTimeouts(connect, idle time.Duration) {
	if connect > 0 {
		p.connectTimeout.Store(int64(connect))
	}
	if idle <= 0 {
		return
	}
	p.idleTimeout.Store(int64(idle))
	p.mu.Lock()
	defer p.mu.Unlock()
	for c := range p.conns {
		c.rearm()
	}
}

// Stats returns the current counters.
func (p *Proxy) Stats() Stats {
	return Stats{
		Active:          p.active.Load(),
		Accepted:        p.accepted.Load(),
		Refused:         p.refused.Load(),
		DialFailed:      p.dialFailed.Load(),
		BytesUp:         p.up.Load(),
		BytesDown:       p.down.Load(),
		Parked:          p.parked(),
		Overloaded:      p.lim.on.Load(),
		OverloadRefused: p.lim.refused.Load(),
	}
}

func (p *Proxy) parked() int {
	p.mu.Lock()
	s := p.sleeper
	p.mu.Unlock()
	if s == nil {
		return 0
	}
	return s.sleeping()
}

// Addrs returns the listeners' addresses (nil before Start).
func (p *Proxy) Addrs() []net.Addr {
	p.mu.Lock()
	defer p.mu.Unlock()
	addrs := make([]net.Addr, 0, len(p.listeners))
	for _, ln := range p.listeners {
		addrs = append(addrs, ln.Addr())
	}
	return addrs
}

// now is the monotonic time since New, cheap enough to stamp every burst.
func (p *Proxy) now() time.Duration { return time.Since(p.epoch) }

// ActivePorts are the original destination ports of the open connections,
// sorted: a reload that stops intercepting a port keeps its frames
// diverted while any of these remain.
func (p *Proxy) ActivePorts() []uint16 {
	p.mu.Lock()
	seen := map[uint16]bool{}
	for c := range p.conns {
		seen[uint16(c.dst.Port)] = true
	}
	p.mu.Unlock()
	return slices.Sorted(maps.Keys(seen))
}
