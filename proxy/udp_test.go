package proxy

import (
	"bytes"
	"net"
	"net/netip"
	"os"
	"testing"
	"time"
)

// udpHarness is a proxy whose UDP listener relays every session to one
// loopback echo server (the OrigDst hook stands in for TPROXY: clients
// send to the proxy's UDP port directly).
type udpHarness struct {
	*harness
	port uint16 // the proxy's UDP port
	echo netip.AddrPort
}

func startUDPProxy(t *testing.T, tweak func(*Config)) *udpHarness {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("skipping: UDP sessions need IP_TRANSPARENT (CAP_NET_ADMIN); run as root")
	}
	echo := startUDPEcho(t)
	port := freeUDPPort(t)
	h := startProxy(t, nil, func(c *Config) {
		c.UDPPort = port
		c.OrigDst = func(netip.AddrPort) netip.AddrPort { return echo }
		if tweak != nil {
			tweak(c)
		}
	})
	return &udpHarness{harness: h, port: port, echo: echo}
}

// startUDPEcho serves a UDP echo on loopback until the test ends.
func startUDPEcho(t *testing.T) netip.AddrPort {
	t.Helper()
	c, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		buf := make([]byte, 1<<16)
		for {
			n, from, err := c.ReadFromUDPAddrPort(buf)
			if err != nil {
				return
			}
			c.WriteToUDPAddrPort(buf[:n], from)
		}
	}()
	t.Cleanup(func() { c.Close(); <-done })
	return addrOf(&net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: c.LocalAddr().(*net.UDPAddr).Port})
}

func freeUDPPort(t *testing.T) uint16 {
	t.Helper()
	c, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	return uint16(c.LocalAddr().(*net.UDPAddr).Port)
}

// client is a UDP socket talking to the proxy's port.
func (h *udpHarness) client() *net.UDPConn {
	h.t.Helper()
	c, err := net.DialUDP("udp4", nil, &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1), Port: int(h.port)})
	if err != nil {
		h.t.Fatal(err)
	}
	c.SetDeadline(time.Now().Add(ioDeadline))
	h.t.Cleanup(func() { c.Close() })
	return c
}

// exchange sends msg and wants it echoed back, from the address the client
// sent to.
func exchange(t *testing.T, c *net.UDPConn, msg []byte) {
	t.Helper()
	if _, err := c.Write(msg); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 1<<16)
	n, err := c.Read(buf)
	if err != nil {
		t.Fatalf("no echo of a %d-byte datagram: %v", len(msg), err)
	}
	if !bytes.Equal(buf[:n], msg) {
		t.Fatalf("echo of a %d-byte datagram came back as %d bytes, different", len(msg), n)
	}
}

func TestUDPSession(t *testing.T) {
	checkGoroutines(t)
	h := startUDPProxy(t, nil)
	c := h.client()
	// The first datagram goes through the listener and sets the session
	// up; the next ones through its client-facing socket.
	for i := range 5 {
		exchange(t, c, []byte{'a' + byte(i)})
	}
	big := bytes.Repeat([]byte("0123456789"), 6000) // 60,000 bytes
	exchange(t, c, big)
	st := h.p.Stats()
	if st.UDPSessions != 1 || st.UDPSessionsTotal != 1 {
		t.Errorf("sessions: %d open, %d in all; want 1 and 1", st.UDPSessions, st.UDPSessionsTotal)
	}
	// The test client holds its port on this host without SO_REUSEADDR,
	// so the upstream socket cannot have it.
	if st.UDPPortFallbacks != 1 {
		t.Errorf("port fallbacks = %d, want 1", st.UDPPortFallbacks)
	}
	if len(st.UDPDropped) != 0 {
		t.Errorf("dropped = %v, want none", st.UDPDropped)
	}
}

func TestUDPSessionExpires(t *testing.T) {
	checkGoroutines(t)
	h := startUDPProxy(t, func(c *Config) { c.UDPIdleTimeout = 150 * time.Millisecond })
	c := h.client()
	start := time.Now()
	exchange(t, c, []byte("one"))
	exchange(t, c, []byte("two"))
	r := h.logs.records(t, "udp session closed", 1)[0]
	if el := time.Since(start); el < 150*time.Millisecond {
		t.Errorf("session closed %v after it started, before its idle timeout", el)
	}
	for k, want := range map[string]string{"reason": "idle timeout", "datagrams_up": "2", "datagrams_down": "2", "bytes_up": "6", "bytes_down": "6"} {
		if got := field(r, k); got != want {
			t.Errorf("log %s = %q, want %q (%v)", k, got, want, r)
		}
	}
	if n := h.p.Stats().UDPSessions; n != 0 {
		t.Errorf("%d sessions open after expiry", n)
	}
	// A datagram after expiry starts a new session.
	exchange(t, c, []byte("three"))
	if n := h.p.Stats().UDPSessionsTotal; n != 2 {
		t.Errorf("sessions in all = %d, want 2", n)
	}
}

func TestUDPSessionLimit(t *testing.T) {
	checkGoroutines(t)
	ov := newOverloads()
	h := startUDPProxy(t, func(c *Config) { c.MaxUDPSessions = 2; c.OnOverload = ov.record })
	var cs []*net.UDPConn
	for range 2 {
		c := h.client()
		exchange(t, c, []byte("hi"))
		cs = append(cs, c)
	}
	if ev := ov.wait(t, 1); !ev.On || !ev.UDP || ev.Reason != ReasonLimit {
		t.Fatalf("OnOverload = %+v, want a UDP overload at the limit", ev)
	}
	// As for TCP in bypass, a tenth over the limit (at least one) is
	// still set up: those raced the switch of the diversion. The next is
	// dropped, and counted.
	exchange(t, h.client(), []byte("overshoot"))
	h.client().Write([]byte("over"))
	waitFor(t, "the datagram over the limit to be counted", func() bool {
		return h.p.Stats().UDPDropped[DropSessionLimit] == 1
	})
	// Sessions already set up go on.
	exchange(t, cs[0], []byte("still here"))
}
