// Package proxy relays transparently intercepted TCP connections to their original destination, as the client.
//
// The box's nftables rules divert client SYNs with TPROXY to Config.Port,
// where Proxy accepts them as the server (the accepted socket's local
// address is the original destination) and dials that destination from the
// client's IP, relaying bytes both ways: one event loop per CPU, each on a
// thread of its own with an edge-triggered epoll set (loop_linux.go).
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
	"cmp"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net"
	"net/netip"
	"runtime"
	"runtime/debug"
	"slices"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/ghostwire/ghostwire/proxy/inspect"
)

// Config is what New needs. Timeouts can change later with SetTimeouts.
type Config struct {
	Port           uint16        // TPROXY listen port, on 0.0.0.0 and [::] (two listeners, v6 with V6ONLY)
	ConnectTimeout time.Duration // upstream dial timeout
	IdleTimeout    time.Duration // no bytes in EITHER direction for this long -> close both (a long one-way download is NOT idle)
	Logger         *slog.Logger  // nil = discard
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
	// Policy allows or denies connections by the server name in their
	// first bytes (TLS SNI, HTTP Host). When it can deny anything
	// (Policy.Enabled), every connection waits, before its upstream SYN,
	// until the name is known, its first bytes say there is none, they
	// reach inspect.MaxPeek, or InspectTimeout (0 = 2s) runs out.
	// SetPolicy changes both live. Nil: no policy, nothing inspected.
	Policy         *inspect.Policy
	InspectTimeout time.Duration
	// UDPPort is the UDP TPROXY port, on 0.0.0.0 and [::] (0: no UDP).
	UDPPort uint16
	// UDPIdleTimeout ends a UDP session with no datagram either way for
	// this long (0 = 60s). SetUDP changes it live.
	UDPIdleTimeout time.Duration
	// MaxUDPSessions is how many UDP sessions the proxy keeps at once
	// (0 = no limit). At the limit new sessions are not set up (their
	// datagrams are counted as dropped) and OnOverload is called with
	// UDP set, so the caller lets new sessions cross the bridge untouched.
	MaxUDPSessions int
	// Loops is how many event loops relay connections, each on a thread
	// of its own with its own listeners (0 = GOMAXPROCS).
	Loops int
	// OnOverload is called when an overload starts and when it ends, one
	// call at a time, in order. It must not block: it is where the caller
	// switches the diversion so that new connections stop reaching the
	// proxy (bypass or refuse) while it lasts. Nil: only the log says so.
	OnOverload func(Overload)
	// OnUnanswered is called, from an event loop (it must not block),
	// when an upstream connect got no answer at all within the connect
	// timeout: no SYN-ACK, no reset, no ICMP. That is what a server
	// looks like to a box that sends to a MAC the server no longer has
	// (an invisible box cannot ask the network for the new one). Nil:
	// nothing but the dial's own failure.
	OnUnanswered func(server netip.Addr)

	// Test hooks; nil means production behaviour.

	// Listen opens one listener: network is "tcp4" or "tcp6", addr
	// "0.0.0.0:PORT" or "[::]:PORT". Default: a transparent listener. The
	// proxy takes its socket over (and closes the net.Listener).
	Listen func(network, addr string) (net.Listener, error)
	// Dial connects upstream from local (client IP, port 0) to remote
	// within ctx's deadline, blocking, on a goroutine of its own; the
	// proxy takes the socket over. Default: a non-blocking transparent
	// connect on the connection's loop.
	Dial func(ctx context.Context, network string, local, remote *net.TCPAddr) (*net.TCPConn, error)
	// OrigDst returns the client's original destination from the accepted
	// socket's local address. Default: that address.
	OrigDst func(local netip.AddrPort) netip.AddrPort
	// accept4 replaces accept4(2) on a listener's fd (failure injection).
	accept4 func(fd int) (int, netip.AddrPort, error)
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
	// PortFallbacks counts connections whose upstream socket could not
	// have the client's port (the box held it, or the 4-tuple) and got
	// another.
	PortFallbacks uint64

	// Closed counts ended connections by class of end reason (eof,
	// client reset, dial failed, ...); DialSeconds times successful
	// upstream connects.
	Closed      map[string]uint64
	DialSeconds Histogram
	// PolicyAllowed and PolicyDenied count the name policy's decisions.
	PolicyAllowed, PolicyDenied uint64
	// TopClients and TopServers are the five addresses with the most bytes
	// relayed (both ways) by connections and UDP sessions that ended.
	TopClients, TopServers []Talker

	UDPSessions      int64  // UDP sessions open now
	UDPSessionsTotal uint64 // UDP sessions set up since New
	// UDPPortFallbacks counts sessions whose upstream socket could not
	// have the client's port (taken on the box) and got another.
	UDPPortFallbacks uint64
	UDPOverloaded    bool
	// UDPDropped counts datagrams the proxy could not relay, by reason
	// (the Drop* constants); reasons with none are left out.
	UDPDropped map[string]uint64
}

// Proxy is a transparent TCP relay. Create it with New.
type Proxy struct {
	port       uint16
	log        *slog.Logger
	listenHook func(network, addr string) (net.Listener, error)
	dialHook   func(ctx context.Context, network string, local, remote *net.TCPAddr) (*net.TCPConn, error)
	origDst    func(netip.AddrPort) netip.AddrPort
	accept4    func(fd int) (int, netip.AddrPort, error)
	rcvbuf     int
	// nloops is 1 with a test Listen hook (port 0 would give each
	// listener its own port), else one per CPU.
	nloops int

	connectTimeout atomic.Int64 // time.Duration
	idleTimeout    atomic.Int64 // time.Duration
	epoch          time.Time    // monotonic origin of p.now

	mu        sync.Mutex
	started   bool
	serving   bool
	stopped   bool // Shutdown called: no new conns are tracked
	settling  bool // StopAccepting called
	lnClosed  bool
	loopsDown bool
	loops     []*loop
	addrs     []net.Addr
	conns     map[*conn]struct{}
	quit      chan struct{} // closed by the first Shutdown
	settled   chan struct{} // closed when StopAccepting closed the listeners
	acceptErr chan error    // a listener's fatal accept error, for Serve
	connWG    sync.WaitGroup
	hookWG    sync.WaitGroup // Dial hook goroutines
	stopHK    chan struct{}  // ends the housekeeping goroutines

	bufs         sync.Pool // *[]byte of bufSize, held only while a peer is not taking bytes
	lim          *limiter
	onOverload   func(Overload)
	onUnanswered func(netip.Addr)

	udpPort                    uint16
	udpIdle                    atomic.Int64 // time.Duration
	udpLim                     *limiter
	udpActive                  atomic.Int64
	udpTotal, udpPortFallbacks atomic.Uint64
	udpDrops                   [len(udpDropReasons)]atomic.Uint64

	active                                  atomic.Int64
	accepted, refused, dialFailed, up, down atomic.Uint64
	portFallbacks                           atomic.Uint64
	closedBy                                [len(closeClasses)]atomic.Uint64
	talkers                                 talkers
	policy                                  atomic.Pointer[policy]
	policyAllowed, policyDenied             atomic.Uint64
	dialTime                                histogram
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
	if cfg.UDPIdleTimeout < 0 {
		errs = append(errs, fmt.Errorf("UDP idle timeout: %v is negative", cfg.UDPIdleTimeout))
	}
	if cfg.MaxUDPSessions < 0 {
		errs = append(errs, fmt.Errorf("max UDP sessions: %d is negative", cfg.MaxUDPSessions))
	}
	if cfg.Loops < 0 {
		errs = append(errs, fmt.Errorf("loops: %d is negative", cfg.Loops))
	}
	if cfg.MaxConns < 0 {
		errs = append(errs, fmt.Errorf("max connections: %d is negative", cfg.MaxConns))
	}
	if err := errors.Join(errs...); err != nil {
		return nil, fmt.Errorf("invalid proxy config: %w", err)
	}
	p := &Proxy{
		port:       cfg.Port,
		log:        cfg.Logger,
		listenHook: cfg.Listen,
		dialHook:   cfg.Dial,
		origDst:    cfg.OrigDst,
		accept4:    cfg.accept4,
		rcvbuf:     cfg.ReceiveBuffer,
		epoch:      time.Now(),
		conns:      make(map[*conn]struct{}),
		quit:       make(chan struct{}),
		settled:    make(chan struct{}),
		acceptErr:  make(chan error, 1),
	}
	p.bufs.New = func() any { b := make([]byte, bufSize); return &b }
	p.SetPolicy(cfg.Policy, cfg.InspectTimeout)
	p.lim = newLimiter(cfg.MaxConns, cfg.RefuseOverload)
	p.udpLim = newLimiter(cfg.MaxUDPSessions, false)
	p.udpPort = cfg.UDPPort
	p.udpIdle.Store(int64(cmp.Or(cfg.UDPIdleTimeout, defaultUDPIdle)))
	p.onOverload = cfg.OnOverload
	p.onUnanswered = cfg.OnUnanswered
	if p.onOverload == nil {
		p.onOverload = func(Overload) {}
	}
	if p.log == nil {
		p.log = slog.New(slog.DiscardHandler)
	}
	p.nloops = 1
	if p.listenHook == nil {
		p.nloops = cfg.Loops
		if p.nloops <= 0 {
			p.nloops = runtime.GOMAXPROCS(0)
		}
	}
	if p.origDst == nil {
		p.origDst = origDst
	}
	if p.accept4 == nil {
		p.accept4 = acceptFD
	}
	p.connectTimeout.Store(int64(cfg.ConnectTimeout))
	p.idleTimeout.Store(int64(cfg.IdleTimeout))
	return p, nil
}

// Start opens the IPv4 and IPv6 listeners (one of each per loop) and
// starts the loops. If anything fails, nothing stays open.
func (p *Proxy) Start() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.started || p.stopped {
		return errors.New("proxy already started (or shut down)")
	}
	var (
		loops []*loop
		addrs []net.Addr
	)
	undo := func() {
		for _, l := range loops {
			l.closeListeners()
			l.close()
		}
	}
	for range p.nloops {
		l, err := newLoop(p)
		if err != nil {
			undo()
			return err
		}
		loops = append(loops, l)
		for _, network := range []string{"tcp4", "tcp6"} {
			ln, err := p.openListener(network)
			if err != nil {
				undo()
				return fmt.Errorf("opening %s listener: %w", network, err)
			}
			l.lns = append(l.lns, ln)
			addrs = append(addrs, ln.addr)
		}
		for _, network := range []string{"udp4", "udp6"} {
			if p.udpPort == 0 {
				break
			}
			fd, err := listenUDP(network, p.udpPort, p.rcvbuf)
			if err != nil {
				undo()
				return fmt.Errorf("opening %s listener: %w", network, err)
			}
			l.lns = append(l.lns, &listener{fd: fd, network: network, udp: true})
		}
	}
	p.loops, p.addrs = loops, addrs
	for _, l := range loops {
		go l.run()
	}
	p.lim.openReserve()
	p.stopHK = make(chan struct{})
	go p.releaseIdle(p.stopHK)
	go p.watchOverload(p.stopHK, overloadWatch{lim: p.lim, active: &p.active})
	go p.watchOverload(p.stopHK, overloadWatch{lim: p.udpLim, active: &p.udpActive, udp: true})
	p.started = true
	return nil
}

// openListener opens one listener with the Listen hook or, by default, a
// transparent one on the proxy port.
func (p *Proxy) openListener(network string) (*listener, error) {
	if p.listenHook == nil {
		fd, addr, err := listenTransparent(network, p.port, p.rcvbuf)
		if err != nil {
			return nil, err
		}
		return &listener{fd: fd, network: network, addr: addr}, nil
	}
	host := "0.0.0.0"
	if network == "tcp6" {
		host = "::"
	}
	ln, err := p.listenHook(network, net.JoinHostPort(host, fmt.Sprint(p.port)))
	if err != nil {
		return nil, err
	}
	addr := ln.Addr()
	sc, ok := ln.(interface {
		SyscallConn() (syscall.RawConn, error)
		Close() error
	})
	if !ok {
		ln.Close()
		return nil, fmt.Errorf("listener %T has no socket to take over", ln)
	}
	fd, err := takeFD(sc)
	if err != nil {
		return nil, err
	}
	return &listener{fd: fd, network: network, addr: addr}, nil
}

// releaseIdle returns what a burst of traffic grew (heap, buffers, the
// pooled pipes' pages) to the OS once the proxy has gone quiet, so an idle
// box holds what an idle box needs: an idle process runs no GC.
func (p *Proxy) releaseIdle(stop <-chan struct{}) {
	t := time.NewTicker(time.Second)
	defer t.Stop()
	// p.accepted at the last release and at the last tick: release once
	// per quiet spell, after a whole tick with no new connection.
	var releasedAt, lastTick uint64
	for {
		select {
		case <-stop:
			return
		case <-t.C:
		}
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
// free it.
func releaseMemory() {
	runtime.GC()
	runtime.GC()
	debug.FreeOSMemory()
}

// Serve accepts connections until ctx is done, Shutdown is called or
// StopAccepting has settled, then closes the listeners and returns: nil
// after Shutdown or StopAccepting, ctx's error after ctx, or the accept
// error that stopped it. Established connections are not touched: they
// end with Shutdown.
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
	loops := p.loops
	p.mu.Unlock()
	for _, l := range loops {
		l.post(func() {
			for _, ln := range l.lns {
				l.serve(ln)
			}
		})
	}
	var err error
	select {
	case <-ctx.Done():
	case <-p.quit:
	case <-p.settled:
	case err = <-p.acceptErr:
	}
	p.closeListeners()
	switch {
	case err != nil:
		return err
	case p.isStopped():
		return nil
	}
	return ctx.Err()
}

// acceptFailed stops Serve with err: one family failing stops both, and
// the process exits (failing open).
func (p *Proxy) acceptFailed(err error) {
	select {
	case p.acceptErr <- err:
	default:
	}
}

// StopAccepting keeps taking connections for settle, then stops. Call it
// after the diversion stopped sending new SYNs here (the draining ruleset):
// handshakes already under way still complete into the listen queue within
// a round trip, and closing the listener then would reset them. Each one
// taken is relayed as usual.
func (p *Proxy) StopAccepting(settle time.Duration) {
	p.mu.Lock()
	first := !p.settling
	p.settling = true
	p.mu.Unlock()
	t := time.NewTimer(settle)
	select {
	case <-t.C:
	case <-p.quit:
		t.Stop()
	}
	p.closeListeners()
	if first {
		close(p.settled)
	}
}

func (p *Proxy) isSettling() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.settling
}

// Shutdown stops accepting at once, waits for established connections to
// finish until ctx is done, then resets the rest (reason "shutdown") and
// stops the loops. It returns nil if everything drained, else an error
// wrapping ctx's.
func (p *Proxy) Shutdown(ctx context.Context) error {
	p.mu.Lock()
	if !p.stopped {
		p.stopped = true
		close(p.quit)
	}
	p.mu.Unlock()
	p.closeListeners()
	defer p.stopLoops()

	// No Add can follow: track checks p.stopped under p.mu.
	drained := make(chan struct{})
	go func() {
		p.connWG.Wait()
		close(drained)
	}()
	select {
	case <-drained:
		return nil
	case <-ctx.Done():
	}
	p.mu.Lock()
	open, loops := len(p.conns), p.loops
	p.mu.Unlock()
	for _, l := range loops {
		l.post(func() { l.abortAll("shutdown") })
	}
	<-drained
	return fmt.Errorf("closed %d connections still open after the grace period: %w", open, ctx.Err())
}

// stopLoops ends the loops and the housekeeping once no connection is left.
func (p *Proxy) stopLoops() {
	p.mu.Lock()
	if p.loopsDown || !p.started {
		p.mu.Unlock()
		return
	}
	p.loopsDown = true
	loops := p.loops
	close(p.stopHK)
	p.mu.Unlock()
	p.hookWG.Wait()
	for _, l := range loops {
		l.post(func() {
			l.abortAll("shutdown") // only UDP sessions are left
			l.stop = true
		})
		<-l.done
		l.close()
	}
	p.lim.closeReserve()
}

// closeListeners closes every listener, on its loop's thread (or directly
// once the loop is gone), and returns when they are closed.
func (p *Proxy) closeListeners() {
	p.mu.Lock()
	if p.lnClosed {
		p.mu.Unlock()
		return
	}
	p.lnClosed = true
	loops := p.loops
	p.mu.Unlock()
	for _, l := range loops {
		if !l.call(l.closeListeners) {
			l.closeListeners()
		}
	}
}

func (p *Proxy) isStopped() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.stopped
}

// track records c as open, unless Shutdown has begun.
func (p *Proxy) track(c *conn) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.stopped {
		return false
	}
	p.conns[c] = struct{}{}
	p.connWG.Add(1)
	return true
}

// untrack is the end of a tracked c.
func (p *Proxy) untrack(c *conn) {
	p.mu.Lock()
	delete(p.conns, c)
	p.mu.Unlock()
	p.active.Add(-1)
	p.connWG.Done()
}

// SetTimeouts changes the timeouts live (SIGHUP). The connect timeout
// applies to dials that start later; the idle timeout to every connection,
// counted from its last activity, so a connection already idle for longer
// than the new value closes at its loop's next tick. Non-positive values
// are ignored.
func (p *Proxy) SetTimeouts(connect, idle time.Duration) {
	if connect > 0 {
		p.connectTimeout.Store(int64(connect))
	}
	if idle > 0 {
		p.idleTimeout.Store(int64(idle))
	}
}

func (p *Proxy) idle() time.Duration { return time.Duration(p.idleTimeout.Load()) }

// SetPolicy changes the name policy live (SIGHUP): connections accepted
// from now on are inspected by it (or not, if it cannot deny anything).
func (p *Proxy) SetPolicy(pol *inspect.Policy, timeout time.Duration) {
	p.policy.Store(&policy{p: pol, timeout: cmp.Or(timeout, defaultInspectTimeout)})
}

// defaultInspectTimeout is Config.InspectTimeout's default.
const defaultInspectTimeout = 2 * time.Second

// Active is how many TCP connections are open now.
func (p *Proxy) Active() int64 { return p.active.Load() }

// Stats returns the current counters.
func (p *Proxy) Stats() Stats {
	top5c, top5s := p.talkers.top(5)
	return Stats{
		Active:          p.active.Load(),
		Accepted:        p.accepted.Load(),
		Refused:         p.refused.Load(),
		DialFailed:      p.dialFailed.Load(),
		PortFallbacks:   p.portFallbacks.Load(),
		BytesUp:         p.up.Load(),
		BytesDown:       p.down.Load(),
		Overloaded:      p.lim.on.Load(),
		OverloadRefused: p.lim.refused.Load(),

		Closed:        p.closedCounts(),
		PolicyAllowed: p.policyAllowed.Load(),
		TopClients:    top5c,
		TopServers:    top5s,
		PolicyDenied:  p.policyDenied.Load(),
		DialSeconds:   p.dialTime.snapshot(),

		UDPSessions:      p.udpActive.Load(),
		UDPSessionsTotal: p.udpTotal.Load(),
		UDPPortFallbacks: p.udpPortFallbacks.Load(),
		UDPOverloaded:    p.udpLim.on.Load(),
		UDPDropped:       p.udpDropped(),
	}
}

func (p *Proxy) closedCounts() map[string]uint64 {
	m := make(map[string]uint64, len(closeClasses))
	for i, c := range closeClasses {
		m[c] = p.closedBy[i].Load()
	}
	return m
}

func (p *Proxy) udpDropped() map[string]uint64 {
	m := map[string]uint64{}
	for i, r := range udpDropReasons {
		if n := p.udpDrops[i].Load(); n > 0 {
			m[r] = n
		}
	}
	return m
}

// Addrs returns the listeners' addresses (nil before Start).
func (p *Proxy) Addrs() []net.Addr {
	p.mu.Lock()
	defer p.mu.Unlock()
	return slices.Clone(p.addrs)
}

// now is the monotonic time since New, cheap enough to stamp every read.
func (p *Proxy) now() time.Duration { return time.Since(p.epoch) }

// ActivePorts are the original destination ports of the open connections,
// sorted: a reload that stops intercepting a port keeps its frames
// diverted while any of these remain.
func (p *Proxy) ActivePorts() []uint16 {
	p.mu.Lock()
	seen := map[uint16]bool{}
	for c := range p.conns {
		seen[c.dst.Port()] = true
	}
	p.mu.Unlock()
	return slices.Sorted(maps.Keys(seen))
}
