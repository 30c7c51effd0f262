package proxy

import (
	"errors"
	"runtime"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// Overload is one change of the proxy's overload state, as Config.OnOverload
// receives it and the log records it.
type Overload struct {
	On     bool
	UDP    bool   // UDP sessions, not TCP connections
	Reason string // why it started: ReasonLimit, ReasonFDs or ReasonMemory
	Active int64  // connections open at the change
	Limit  int64  // the connection count it ends below 90% of
}

// Overload reasons.
const (
	ReasonLimit  = "connection limit"
	ReasonFDs    = "out of file descriptors"
	ReasonMemory = "out of kernel memory"
)

// lowWater is the share of the limit the count must fall to before an
// overload ends: a count hovering at the limit must not flap the diversion.
const lowWater = 0.9

// shortageHold is how long after the last resource failure (EMFILE,
// ENOBUFS...) the proxy stays overloaded: the failure says nothing about
// when resources come back, only that they were short just now.
const shortageHold = time.Second

// reserveFDs is what DefaultMaxConns and MaxConnsCeiling keep for
// listeners, netlink, the log and the runtime.
const reserveFDs = 1024

// DefaultMaxConns derives a connection limit from the process's fd limit
// (RLIMIT_NOFILE, which Go raises to the hard limit at start): a
// connection holds two sockets, and while splicing, up to two pipes of two
// fds each, which Go creates on demand and falls back to copying without;
// a third of what is left after reserveFDs keeps EMFILE rare.
func DefaultMaxConns() int {
	return max(1, (nofile()-reserveFDs)/3)
}

// MaxConnsCeiling is the most connections the fd limit can carry at all
// (two sockets each): a configured limit above it can only end in EMFILE.
func MaxConnsCeiling() int {
	return max(1, (nofile()-reserveFDs)/2)
}

func nofile() int {
	var l syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &l); err != nil || l.Cur > 1<<30 {
		return 1 << 30
	}
	return int(l.Cur)
}

// limiter decides when the proxy is overloaded. The accept path and the
// failure paths only read counters and kick; one goroutine (watch) moves
// the state, so OnOverload calls and log lines come one at a time and in
// order, one line when an overload starts and one when it ends, however
// many connections or failures happen in between.
type limiter struct {
	max    atomic.Int64 // Config.MaxConns; 0 = no limit
	refuse atomic.Bool  // Config.RefuseOverload
	on     atomic.Bool
	kick   chan struct{}

	// lastShortage is p.now() at the last resource failure (0 = none);
	// shortageAt the active count then; shortage its reason.
	lastShortage atomic.Int64
	shortageAt   atomic.Int64
	shortage     atomic.Value // string

	refused   atomic.Uint64 // connections reset because of overload, ever
	failures  atomic.Uint64 // resource failures, ever
	reserveMu sync.Mutex
	reserve   int // an fd held back to accept (and reset) one connection at EMFILE; -1 if none
}

func newLimiter(maxConns int, refuse bool) *limiter {
	l := &limiter{kick: make(chan struct{}, 1), reserve: -1}
	l.max.Store(int64(maxConns))
	l.refuse.Store(refuse)
	return l
}

func (l *limiter) poke() {
	select {
	case l.kick <- struct{}{}:
	default:
	}
}

// over reports whether a connection that makes the count active (it is
// counted first, so the watcher it wakes sees it) must be reset rather
// than relayed: with RefuseOverload, any over the limit; otherwise any over
// the limit plus overshoot. The one that reaches the limit wakes the
// watcher, so the diversion switches.
//
// Why some are relayed over the limit: in a flood the kernel completes
// handshakes into the listen queue faster than the proxy accepts them, so
// when the count reaches the limit, hundreds or thousands of clients
// already think they are connected, sent there before the diversion
// switched. Relaying them is better than resetting them, up to a point:
// past the overshoot they are reset, which keeps the fd use of the
// default limit well clear of EMFILE.
func (l *limiter) over(active int64) bool {
	m := l.max.Load()
	if m <= 0 || active < m {
		return false
	}
	if !l.on.Load() {
		l.poke()
		// In a flood the accept loops never block (the queue is full), so
		// the watcher, and the runner after it, would wait for preemption
		// while hundreds more are accepted: let them run now.
		runtime.Gosched()
	}
	if l.refuse.Load() {
		return active > m
	}
	return active > m+max(m/overshootDiv, 1)
}

// overshootDiv sets the overshoot: a tenth of the limit (at least one).
const overshootDiv = 10

// short records a resource failure (err is EMFILE, ENOBUFS...) with active
// connections open.
func (l *limiter) short(err error, active int64, now time.Duration) {
	reason := ReasonMemory
	if errors.Is(err, syscall.EMFILE) || errors.Is(err, syscall.ENFILE) {
		reason = ReasonFDs
	}
	l.failures.Add(1)
	l.shortage.Store(reason)
	l.shortageAt.Store(active)
	l.lastShortage.Store(int64(max(now, 1)))
	if !l.on.Load() {
		l.poke()
	}
}

func isResourceShortage(err error) bool {
	return errors.Is(err, syscall.EMFILE) || errors.Is(err, syscall.ENFILE) ||
		errors.Is(err, syscall.ENOBUFS) || errors.Is(err, syscall.ENOMEM)
}

// overloadWatch is what watchOverload watches: TCP connections or UDP
// sessions.
type overloadWatch struct {
	lim    *limiter
	active *atomic.Int64
	udp    bool
}

// watchOverload is a limiter's goroutine: it starts an overload when the
// count reaches the limit or a resource failed, and ends it once the
// count is down to lowWater of the limit (of the count at the failure, for
// a resource failure) and nothing failed for shortageHold.
func (p *Proxy) watchOverload(stop <-chan struct{}, w overloadWatch) {
	l := w.lim
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	var (
		cur                 Overload
		since               time.Duration
		refused0, failures0 uint64
	)
	what, limitKey, mode := "connections", "max_connections", p.overloadMode()
	if w.udp {
		what, limitKey, mode = "udp sessions", "max_udp_sessions", "bypass"
	}
	for {
		select {
		case <-stop:
			return
		case <-l.kick:
		case <-tick.C:
			if !l.on.Load() {
				continue // nothing to end; a start comes with a kick
			}
		}
		now := p.now()
		active := w.active.Load()
		m := l.max.Load()
		last := time.Duration(l.lastShortage.Load())
		shortNow := last != 0 && now-last < shortageHold
		if !l.on.Load() {
			reason, limit := "", m
			switch {
			case shortNow:
				reason, limit = l.shortage.Load().(string), l.shortageAt.Load()
				if m > 0 {
					limit = min(limit, m)
				}
			case m > 0 && active >= m:
				reason = ReasonLimit
			default:
				continue
			}
			cur = Overload{On: true, UDP: w.udp, Reason: reason, Active: active, Limit: limit}
			since, refused0, failures0 = now, l.refused.Load(), l.failures.Load()
			l.on.Store(true)
			if !w.udp {
				mode = p.overloadMode()
			}
			p.log.Warn("overload started; new "+what+" are not proxied",
				"reason", reason, "active", active, limitKey, m,
				"overload", mode, "ends_below", int64(float64(limit)*lowWater))
			p.onOverload(cur)
			continue
		}
		if m > 0 && m < cur.Limit {
			cur.Limit = m // lowered on reload
		}
		if shortNow || float64(active) > float64(cur.Limit)*lowWater {
			continue
		}
		l.on.Store(false)
		cur.On, cur.Active = false, active
		p.log.Info("overload ended; proxying new "+what+" again",
			"reason", cur.Reason, "lasted", (now - since).Round(time.Millisecond), "active", active,
			"refused", l.refused.Load()-refused0, "resource_failures", l.failures.Load()-failures0)
		p.onOverload(cur)
	}
}

func (p *Proxy) overloadMode() string {
	if p.lim.refuse.Load() {
		return "refuse"
	}
	return "bypass"
}

// shedOne takes one connection off listener lfd's queue with the reserve
// fd and resets it, when accept fails for want of fds: otherwise the
// queued clients, whose handshakes the kernel already completed, would
// hang until some connection closes. It reports whether it took one.
func (p *Proxy) shedOne(lfd int) bool {
	l := p.lim
	if p.isSettling() {
		return false
	}
	l.reserveMu.Lock()
	defer l.reserveMu.Unlock()
	if l.reserve < 0 {
		l.reserve = openReserve()
		return false
	}
	closeFD(l.reserve)
	l.reserve = -1
	fd, _, err := p.accept4(lfd) // non-blocking: the queue may be empty by now
	l.reserve = openReserve()
	if err != nil {
		return false
	}
	l.refused.Add(1)
	resetFD(fd)
	return true
}

// openReserve takes the reserve fd when the proxy starts.
func (l *limiter) openReserve() {
	l.reserveMu.Lock()
	defer l.reserveMu.Unlock()
	if l.reserve < 0 {
		l.reserve = openReserve()
	}
}

// closeReserve gives the reserve fd back once the proxy is shut down.
func (l *limiter) closeReserve() {
	l.reserveMu.Lock()
	defer l.reserveMu.Unlock()
	if l.reserve >= 0 {
		closeFD(l.reserve)
		l.reserve = -1
	}
}

// Overloaded reports whether the proxy is overloaded now.
func (p *Proxy) Overloaded() bool { return p.lim.on.Load() }

// UDPOverloaded reports whether new UDP sessions are not set up now
// (max UDP sessions, or short of fds).
func (p *Proxy) UDPOverloaded() bool { return p.udpLim.on.Load() }

// SetMaxConns changes the connection limit live (0 = none); an overload in
// progress ends by the new limit.
func (p *Proxy) SetMaxConns(n int) {
	p.lim.max.Store(int64(n))
	p.lim.poke()
}

// SetRefuseOverload changes what happens to connections that reach the
// proxy while it is at the limit: reset (true) or relayed (false).
func (p *Proxy) SetRefuseOverload(refuse bool) { p.lim.refuse.Store(refuse) }
