package proxy

import (
	"context"
	"io"
	"net"
	"net/netip"
	"os"
	"sync"
	"syscall"
	"testing"
	"time"
)

// overloads records OnOverload calls.
type overloads struct {
	mu   sync.Mutex
	got  []Overload
	seen chan struct{}
}

func newOverloads() *overloads { return &overloads{seen: make(chan struct{}, 16)} }

func (o *overloads) record(ev Overload) {
	o.mu.Lock()
	o.got = append(o.got, ev)
	o.mu.Unlock()
	o.seen <- struct{}{}
}

// wait returns the n-th call (1-based), failing t if it does not come.
func (o *overloads) wait(t *testing.T, n int) Overload {
	t.Helper()
	deadline := time.NewTimer(10 * time.Second)
	defer deadline.Stop()
	for {
		o.mu.Lock()
		if len(o.got) >= n {
			ev := o.got[n-1]
			o.mu.Unlock()
			return ev
		}
		o.mu.Unlock()
		select {
		case <-o.seen:
		case <-deadline.C:
			t.Fatalf("OnOverload called %d times, want %d", len(o.got), n)
		}
	}
}

func (o *overloads) count() int {
	o.mu.Lock()
	defer o.mu.Unlock()
	return len(o.got)
}

// logCount counts records with message msg.
func (s *logSink) count(msg string) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	n := 0
	for _, r := range s.recs {
		if r["msg"] == msg {
			n++
		}
	}
	return n
}

// holdOpen is a backend that keeps each connection until the client closes.
func holdOpen(c *net.TCPConn) { io.Copy(io.Discard, c) }

func TestOverloadAtLimitBypass(t *testing.T) {
	checkGoroutines(t)
	ov := newOverloads()
	h := startProxy(t, holdOpen, func(c *Config) {
		c.MaxConns = 3
		c.OnOverload = ov.record
	})
	var conns []*net.TCPConn
	for range 3 {
		conns = append(conns, h.dial())
	}
	waitFor(t, "3 active connections", func() bool { return h.p.Stats().Active == 3 })
	// The third reached the limit: the diversion is asked to stop sending.
	if ev := ov.wait(t, 1); !ev.On || ev.Reason != ReasonLimit || ev.Limit != 3 {
		t.Fatalf("first OnOverload = %+v, want on, %q, limit 3", ev, ReasonLimit)
	}
	if !h.p.Overloaded() || !h.p.Stats().Overloaded {
		t.Error("Overloaded() false during the overload")
	}
	// One more raced the switch: in bypass mode it is relayed, not reset,
	// within the overshoot (a tenth of the limit, at least one)...
	late := h.dial()
	if _, err := late.Write([]byte("x")); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "4 active connections", func() bool { return h.p.Stats().Active == 4 })
	// ...and past it, reset.
	wantReset(t, h.dialAndRead())
	if st := h.p.Stats(); st.OverloadRefused != 1 || st.Active != 4 {
		t.Errorf("past the overshoot: stats = %+v, want 1 refused for overload, 4 active", st)
	}
	// 90% of 3 is 2.7: the overload ends at 2 open, not before.
	late.Close()
	conns[0].Close()
	waitFor(t, "2 active connections", func() bool { return h.p.Stats().Active == 2 })
	if ev := ov.wait(t, 2); ev.On || ev.Active > 2 {
		t.Fatalf("second OnOverload = %+v, want off with at most 2 active", ev)
	}
	if h.p.Overloaded() {
		t.Error("still overloaded after the count fell below the low-water mark")
	}
	if s, e := h.logs.count("overload started; new connections are not proxied"), h.logs.count("overload ended; proxying new connections again"); s != 1 || e != 1 {
		t.Errorf("log has %d start and %d end lines, want one each", s, e)
	}
	if n := ov.count(); n != 2 {
		t.Errorf("OnOverload called %d times, want 2", n)
	}
}

func TestOverloadRefuseResetsAtOnce(t *testing.T) {
	checkGoroutines(t)
	ov := newOverloads()
	h := startProxy(t, holdOpen, func(c *Config) {
		c.MaxConns = 1
		c.RefuseOverload = true
		c.OnOverload = ov.record
	})
	first := h.dial()
	waitFor(t, "1 active connection", func() bool { return h.p.Stats().Active == 1 })
	// The Dial hook runs on a goroutine of its own: wait for it, so the
	// count below is about the refused ones only.
	waitFor(t, "the first connection's dial", func() bool { return h.dials.Load() == 1 })
	for range 5 {
		wantReset(t, h.dialAndRead())
	}
	if st := h.p.Stats(); st.OverloadRefused != 5 || st.Accepted != 1 || st.DialFailed != 0 {
		t.Errorf("stats = %+v, want 5 refused for overload, 1 accepted, no dial", st)
	}
	if d := h.dials.Load(); d != 1 {
		t.Errorf("%d upstream dials, want 1: a refused connection must not reach the server", d)
	}
	ov.wait(t, 1)
	first.Close()
	if ev := ov.wait(t, 2); ev.On {
		t.Fatalf("second OnOverload = %+v, want off", ev)
	}
	if s := h.logs.count("overload started; new connections are not proxied"); s != 1 {
		t.Errorf("%d overload start lines for 5 refused connections, want 1", s)
	}
	if n := len(h.logs.closed(t, 1)); n != 1 {
		t.Errorf("%d connection-closed lines, want 1 (refused ones are counted, not logged)", n)
	}
}

// failingAccept is an accept4 that fails with err n times before
// accepting.
func failingAccept(n int, err error) func(int) (int, netip.AddrPort, error) {
	var mu sync.Mutex
	return func(fd int) (int, netip.AddrPort, error) {
		mu.Lock()
		defer mu.Unlock()
		if n > 0 {
			n--
			return -1, netip.AddrPort{}, err
		}
		return acceptFD(fd)
	}
}

// Running out of fds overloads the proxy once, not once per failed accept;
// the proxy goes on accepting what reaches it, and the overload ends once
// connections are back below 90% of the count at the failure.
func TestOverloadOnFDShortage(t *testing.T) {
	checkGoroutines(t)
	ov := newOverloads()
	h := startProxy(t, holdOpen, func(c *Config) {
		c.OnOverload = ov.record
		c.accept4 = failingAccept(5, syscall.EMFILE)
	})
	// The first client meets the shortage: the proxy fails to accept it
	// (pausing between tries), then takes it with its reserve fd and
	// resets it rather than leave it hanging in the queue.
	victim := h.dial()
	if ev := ov.wait(t, 1); !ev.On || ev.Reason != ReasonFDs {
		t.Fatalf("first OnOverload = %+v, want on, %q", ev, ReasonFDs)
	}
	_, err := victim.Read(make([]byte, 1))
	wantReset(t, err)
	// After the failures stop, the proxy serves again and the overload ends.
	c := h.dial()
	if _, err := c.Write([]byte("x")); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the connection to be relayed", func() bool { return h.p.Stats().Active == 1 })
	// The spell started with no connection open: it ends once none is
	// open again and nothing failed for a while.
	if ov.count() != 1 {
		t.Fatalf("overload ended with more connections open than at the failure")
	}
	c.Close()
	if ev := ov.wait(t, 2); ev.On {
		t.Fatalf("second OnOverload = %+v, want off", ev)
	}
	if s := h.logs.count("overload started; new connections are not proxied"); s != 1 {
		t.Errorf("%d overload start lines for 5 failed accepts, want 1", s)
	}
	if h.logs.count("accept failed; retrying") != 0 {
		t.Error("a line per failed accept was logged")
	}
}

func TestDialReason(t *testing.T) {
	wrap := func(e syscall.Errno) error {
		return &net.OpError{Op: "dial", Net: "tcp", Err: os.NewSyscallError("connect", e)}
	}
	for _, tc := range []struct {
		err  error
		want string
	}{
		{wrap(syscall.ECONNREFUSED), "dial: refused"},
		{wrap(syscall.ETIMEDOUT), "dial: timeout"},
		{context.DeadlineExceeded, "dial: timeout"},
		{wrap(syscall.ENETUNREACH), "dial: no route (network unreachable)"},
		{wrap(syscall.EHOSTUNREACH), "dial: no route (host unreachable)"},
		{wrap(syscall.EADDRNOTAVAIL), "dial: no local port free for this client and server (EADDRNOTAVAIL)"},
		{wrap(syscall.EMFILE), "dial: out of file descriptors"},
		{wrap(syscall.EPERM), "dial: operation not permitted"},
	} {
		if got := dialReason(tc.err); got != tc.want {
			t.Errorf("dialReason(%v) = %q, want %q", tc.err, got, tc.want)
		}
	}
}

func TestMaxConnsDefaults(t *testing.T) {
	d, c := DefaultMaxConns(), MaxConnsCeiling()
	if d < 1 || d > c {
		t.Errorf("DefaultMaxConns() = %d, MaxConnsCeiling() = %d: want 1 <= default <= ceiling", d, c)
	}
	var l syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &l); err == nil && l.Cur > 4096 {
		if want := (int(l.Cur) - reserveFDs) / 3; d != want {
			t.Errorf("DefaultMaxConns() = %d with RLIMIT_NOFILE %d, want %d", d, l.Cur, want)
		}
	}
}
