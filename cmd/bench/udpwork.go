package main

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ghostwire/ghostwire/lab"
)

// Transparent UDP (issue 12). One UDP port is intercepted, 5201 (the
// iperf3 port; the TCP workloads keep theirs): iperf3 -u, the sink of
// udp-64 and the echo server of udp-rss and of the path check take turns
// on it in the server namespace, each only while its workload runs
// (iperf3's server binds its UDP socket only during a UDP test).
const (
	udpPort      = iperfPort // intercept.udp_ports: [5201]
	udpProxyPort = 9877      // proxy.udp_port, written into the config
	udpBigSize   = 1400      // udp-1400's datagrams
	udpSmallSize = 64        // udp-64's datagrams
	// udpIdleTimeout is ghostwire's default proxy.udp_idle_timeout: udp-rss
	// measures well within it, or its sessions would be gone.
	udpIdleTimeout = 60 * time.Second
	// udpWarmup sessions are opened before udp-rss reads the proxy's RSS:
	// the first datagram an event loop relays allocates its datagram
	// buffers (16 × 64 KiB), a one-off cost that is not per session.
	udpWarmup = 64
	// udpDrain is how long the sink keeps counting after the flood ends,
	// for datagrams still queued on the way (in the proxy too).
	udpDrain = 200 * time.Millisecond
)

// measureIperfUDP is udp-1400: iperf3 -u at an unlimited rate, 1,400-byte
// datagrams; the figure is what the server received.
func (b *bench) measureIperfUDP(ctx context.Context, round int, mode string) error {
	secs := max(int(b.o.udpDur.Seconds()), 1)
	args := []string{"-c", serverIP4, "-p", strconv.Itoa(udpPort), "-u", "-b", "0", "-l", strconv.Itoa(udpBigSize),
		"-t", strconv.Itoa(secs), "-J"}
	s := sample{Round: round, Mode: mode, Workload: wlUDP1400, Unit: "Gbit/s"}
	out, runErr := b.clientRun(ctx, time.Duration(secs)*time.Second, &s, "iperf3", args...)
	r, err := parseIperf3UDP(out)
	if err != nil {
		return fmt.Errorf("iperf3 -u: %w", errors.Join(err, runErr))
	}
	s.Value, s.Work, s.WorkUnit = r.Gbps, float64(r.Bytes), "bytes received"
	s.Note = fmt.Sprintf("sent %s Gbit/s, %s%% lost", fmtVal(r.SentGbps), fmtVal(r.LossPct))
	b.add(s)
	b.add(sample{Round: round, Mode: mode, Workload: wlUDP1400Loss, Unit: "%", Value: r.LossPct})
	b.addCPU(s, wlUDP1400CPU)
	return nil
}

// measureUDPFlood is udp-64: the bench's flood (-udp-flood) sends 64-byte
// datagrams from the client for the run time, the bench's sink
// (-udp-sink) counts what arrives; the figure is datagrams delivered per
// second of sending.
func (b *bench) measureUDPFlood(ctx context.Context, round int, mode string) (err error) {
	sink, err := b.startHelper(ctx, b.lab.Server, "-udp-sink", fmt.Sprintf(":%d", udpPort))
	if err != nil {
		return fmt.Errorf("starting the UDP sink: %w", err)
	}
	stopped := false
	defer func() {
		if !stopped {
			err = errors.Join(err, stopProcess(sink, 5*time.Second))
		}
	}()
	s := sample{Round: round, Mode: mode, Workload: wlUDP64, Unit: "dgram/s"}
	out, runErr := b.clientRun(ctx, b.o.udpDur, &s, b.self, "-udp-flood", floodAddr(),
		"-udp-flows", strconv.Itoa(b.o.udpFlows), "-udp-size", strconv.Itoa(udpSmallSize),
		"-udp-time", b.o.udpDur.String())
	var f floodResult
	if err := lastJSONLine(out, &f); err != nil {
		return fmt.Errorf("UDP flood: %w", errors.Join(err, runErr))
	}
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-time.After(udpDrain):
	}
	stopped = true
	if err := stopProcess(sink, 5*time.Second); err != nil {
		return fmt.Errorf("stopping the UDP sink: %w", err)
	}
	var r sinkResult
	if err := lastJSONLine(sink.Stdout(), &r); err != nil {
		return fmt.Errorf("UDP sink: %w (stderr: %s)", err, tail(sink.Stderr(), 300))
	}
	perSec, loss, err := udpDelivery(f, r)
	if err != nil {
		return fmt.Errorf("udp-64: %w", err)
	}
	s.Value, s.Work, s.WorkUnit = perSec, float64(r.Datagrams), "datagrams received"
	s.Note = fmt.Sprintf("sent %s/s over %d flows, %s%% lost", fmtVal(float64(f.Sent)/f.Seconds), f.Flows, fmtVal(loss))
	if f.Errors > 0 {
		s.Note += fmt.Sprintf(", %d send errors (first: %s)", f.Errors, f.FirstError)
	}
	b.add(s)
	b.add(sample{Round: round, Mode: mode, Workload: wlUDP64Loss, Unit: "%", Value: loss})
	b.addCPU(s, wlUDP64CPU)
	return nil
}

// startHelper re-executes the bench in ns with args (one of the UDP
// helpers) and waits until it says it is listening.
func (b *bench) startHelper(ctx context.Context, ns *lab.NS, args ...string) (*lab.Process, error) {
	p, err := b.lab.Start(ns, b.self, args...)
	if err != nil {
		return nil, err
	}
	err = poll(ctx, 10*time.Second, strings.Join(args, " ")+" to listen", func() (bool, error) {
		if err := exitedEarly(p); err != nil {
			return false, err
		}
		return strings.Contains(string(p.Stdout()), "listening"), nil
	})
	if err != nil {
		stopProcess(p, 2*time.Second)
		return nil, err
	}
	return p, nil
}

// udpSockets counts UDP sockets in ns matching an ss filter.
func (b *bench) udpSockets(ctx context.Context, ns *lab.NS, filter string) (int, error) {
	out, err := b.nsOutput(ctx, ns, "ss", "-Huan", filter)
	if err != nil {
		return 0, fmt.Errorf("ss: %w: %s", err, out)
	}
	return countLines(out), nil
}

// sessionUpFilter matches the upstream sockets of the proxy's sessions
// from the client to the intercepted UDP port: bound to the client's
// address, connected to the server's.
var sessionUpFilter = fmt.Sprintf("( src %s and dst %s:%d )", clientIP4, serverIP4, udpPort)

const clientIP4 = "192.0.2.1"

// checkUDPPath is checkPath for UDP: a datagram from the client to the
// server's intercepted UDP port is echoed back (by a socket of the bench's
// own in the server namespace), and
//   - with a proxy, the box holds the session: a socket bound to the
//     server's address and connected to the client's port (the
//     client-facing one) and one bound to the client's address and
//     connected to the server (upstream);
//   - in plain and divert mode the box holds neither; the datagram reaches
//     the server with the TTL it was sent with (plain: bridged) or one less
//     (divert: routed by the box, whose forwarded-datagrams counter moved,
//     with nothing listening on the UDP proxy port).
//
// In every mode the server sees the client's address.
func (b *bench) checkUDPPath(ctx context.Context, mode string) error {
	var fwd0 int64
	if mode == modeDivert {
		n, err := b.udpSockets(ctx, b.lab.Box, fmt.Sprintf("( sport = :%d )", udpProxyPort))
		if err != nil {
			return err
		}
		if n != 0 {
			return fmt.Errorf("UDP path check: divert, yet %d socket(s) on the UDP proxy port %d in the box", n, udpProxyPort)
		}
		if _, fwd0, err = b.boxForwarding(ctx); err != nil {
			return err
		}
	}
	ex, err := b.udpExchange(ctx)
	if err != nil {
		return fmt.Errorf("UDP path check: %w", err)
	}
	if ex.from.Addr().String() != clientIP4 {
		return fmt.Errorf("UDP path check: %s: the server saw %s, not the client's address %s", mode, ex.from, clientIP4)
	}
	down := fmt.Sprintf("( src %s:%d and dst %s:%d )", serverIP4, udpPort, clientIP4, ex.clientPort)
	nDown, err := b.udpSockets(ctx, b.lab.Box, down)
	if err != nil {
		return err
	}
	nUp, err := b.udpSockets(ctx, b.lab.Box, sessionUpFilter)
	if err != nil {
		return err
	}
	if hasProxy(mode) {
		if nDown == 0 || nUp == 0 {
			return fmt.Errorf("UDP path check: %s, yet the box holds no session for %s:%d -> %s:%d "+
				"(client-facing sockets %d, upstream sockets %d): the datagram was not proxied",
				mode, clientIP4, ex.clientPort, serverIP4, udpPort, nDown, nUp)
		}
		fmt.Fprintf(os.Stderr, "  UDP path: the box holds the session of %s:%d (server saw %s)\n", clientIP4, ex.clientPort, ex.from)
		return nil
	}
	if nDown != 0 || nUp != 0 {
		return fmt.Errorf("UDP path check: %s, yet the box holds %d client-facing and %d upstream UDP socket(s)", mode, nDown, nUp)
	}
	if ex.from.Port() != ex.clientPort {
		return fmt.Errorf("UDP path check: %s: the server saw port %d, the client sent from %d", mode, ex.from.Port(), ex.clientPort)
	}
	wantTTL := udpCheckTTL
	if mode == modeDivert {
		wantTTL-- // routed by the box
	}
	if ex.ttl != wantTTL {
		return fmt.Errorf("UDP path check: %s: the datagram arrived with TTL %d, want %d (sent with %d)", mode, ex.ttl, wantTTL, udpCheckTTL)
	}
	if mode != modeDivert {
		fmt.Fprintf(os.Stderr, "  UDP path: no socket of %s:%d in the box, TTL %d at the server (bridged)\n", clientIP4, ex.clientPort, ex.ttl)
		return nil
	}
	var fwd int64
	err = poll(ctx, 5*time.Second, "the box to route the datagram", func() (bool, error) {
		_, n, err := b.boxForwarding(ctx)
		fwd = n - fwd0
		return fwd >= 1, err
	})
	if err != nil {
		return fmt.Errorf("UDP path check: divert: %w (forwarded %d datagrams)", err, fwd)
	}
	fmt.Fprintf(os.Stderr, "  UDP path: no socket of %s:%d in the box, TTL %d at the server, %d datagram(s) forwarded (routed)\n",
		clientIP4, ex.clientPort, ex.ttl, fwd)
	return nil
}

// udpCheckTTL is the TTL the path check's datagram is sent with.
const udpCheckTTL = 64

// udpExchangeResult is what the path check's exchange saw.
type udpExchangeResult struct {
	clientPort uint16
	from       netip.AddrPort // the datagram's source as the server saw it
	ttl        int            // its TTL on arrival
}

// udpExchange sends one datagram from a new client socket to the server's
// intercepted UDP port, receives it on a new server socket (with its TTL),
// echoes it and reads the echo: up to three tries, each waiting 2 s.
//
// The client socket stays open until the mode ends (inMode closes it):
// with a proxy its session outlives it for the idle timeout, and a socket
// udp-rss opens later that the kernel gave its port would share that
// session instead of opening one (a round then counted one session short,
// about one round in six with 9,000 sessions).
func (b *bench) udpExchange(ctx context.Context) (res udpExchangeResult, err error) {
	var srv, cli int = -1, -1
	defer func() {
		closeFD(srv)
		if err == nil {
			b.heldFDs = append(b.heldFDs, cli)
		} else {
			closeFD(cli)
		}
	}()
	timeout := unix.NsecToTimeval((2 * time.Second).Nanoseconds())
	err = b.lab.Server.Do(func() error {
		fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, unix.IPPROTO_UDP)
		if err != nil {
			return err
		}
		srv = fd
		if err := unix.SetsockoptInt(fd, unix.SOL_IP, unix.IP_RECVTTL, 1); err != nil {
			return fmt.Errorf("IP_RECVTTL: %w", err)
		}
		if err := unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &timeout); err != nil {
			return err
		}
		if err := unix.Bind(fd, &unix.SockaddrInet4{Port: udpPort}); err != nil {
			return fmt.Errorf("binding the server side to :%d/udp: %w", udpPort, err)
		}
		return nil
	})
	if err != nil {
		return res, fmt.Errorf("server socket: %w", err)
	}
	err = b.lab.Client.Do(func() error {
		fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, unix.IPPROTO_UDP)
		if err != nil {
			return err
		}
		cli = fd
		if err := unix.SetsockoptInt(fd, unix.SOL_IP, unix.IP_TTL, udpCheckTTL); err != nil {
			return fmt.Errorf("IP_TTL: %w", err)
		}
		if err := unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &timeout); err != nil {
			return err
		}
		dst := &unix.SockaddrInet4{Port: udpPort, Addr: netip.MustParseAddr(serverIP4).As4()}
		if err := unix.Connect(fd, dst); err != nil {
			return fmt.Errorf("connect: %w", err)
		}
		sa, err := unix.Getsockname(fd)
		if err != nil {
			return err
		}
		res.clientPort = uint16(sa.(*unix.SockaddrInet4).Port)
		return nil
	})
	if err != nil {
		return res, fmt.Errorf("client socket: %w", err)
	}
	msg := []byte("ghostwire bench: UDP path check")
	buf := make([]byte, 2048)
	oob := make([]byte, unix.CmsgSpace(4))
	var last error
	for try := 0; try < 3 && ctx.Err() == nil; try++ {
		if _, err := unix.Write(cli, msg); err != nil {
			last = fmt.Errorf("sending: %w", err)
			continue
		}
		n, oobn, from, err := recvmsgRetry(srv, buf, oob)
		if err != nil {
			last = fmt.Errorf("the server received nothing: %w", err)
			continue
		}
		ttl, ok := ttlFromCmsg(oob[:oobn])
		if !ok {
			return res, errors.New("the server's datagram carries no TTL")
		}
		fa, ok := from.(*unix.SockaddrInet4)
		if !ok {
			return res, fmt.Errorf("the server's datagram came from %T", from)
		}
		res.from = netip.AddrPortFrom(netip.AddrFrom4(fa.Addr), uint16(fa.Port))
		res.ttl = ttl
		if err := unix.Sendto(srv, buf[:n], 0, from); err != nil {
			last = fmt.Errorf("echoing: %w", err)
			continue
		}
		if _, err := readRetry(cli, buf); err != nil {
			last = fmt.Errorf("the client received no echo: %w", err)
			continue
		}
		return res, nil
	}
	if last == nil {
		last = ctx.Err()
	}
	return res, last
}

// recvmsgRetry is recvmsg through EINTR (a socket timeout is not restarted
// after the runtime's preemption signal).
func recvmsgRetry(fd int, buf, oob []byte) (n, oobn int, from unix.Sockaddr, err error) {
	for {
		n, oobn, _, from, err = unix.Recvmsg(fd, buf, oob, 0)
		if err != unix.EINTR {
			return n, oobn, from, err
		}
	}
}

func readRetry(fd int, buf []byte) (int, error) {
	for {
		n, err := unix.Read(fd, buf)
		if err != unix.EINTR {
			return n, err
		}
	}
}

// ttlFromCmsg finds IP_TTL among a datagram's control messages
// (IP_RECVTTL): an int in host byte order.
func ttlFromCmsg(oob []byte) (int, bool) {
	msgs, err := unix.ParseSocketControlMessage(oob)
	if err != nil {
		return 0, false
	}
	for _, m := range msgs {
		if m.Header.Level == unix.SOL_IP && m.Header.Type == unix.IP_TTL && len(m.Data) >= 4 {
			return int(binary.NativeEndian.Uint32(m.Data)), true
		}
	}
	return 0, false
}

// measureUDPMemory is udp-rss: n client sockets each exchange one datagram
// with the bench's echo server through the proxy and then stay idle; the
// figure is the proxy's RSS growth per session. Sessions end after
// proxy.udp_idle_timeout without a datagram, so it measures well within
// that and checks they are all still there afterwards.
func (b *bench) measureUDPMemory(ctx context.Context, round int, mode string) error {
	pid := b.proxyPID()
	echo, err := b.startHelper(ctx, b.lab.Server, "-udp-echo", fmt.Sprintf(":%d", udpPort))
	if err != nil {
		return fmt.Errorf("starting the UDP echo server: %w", err)
	}
	defer stopProcess(echo, 5*time.Second)
	warm, _, err := b.udpSessions(ctx, udpWarmup)
	defer closeFDs(warm)
	if err != nil {
		return fmt.Errorf("warm-up: %w", err)
	}
	base, err := b.udpSockets(ctx, b.lab.Box, sessionUpFilter)
	if err != nil {
		return err
	}
	rss0, err := vmRSS(pid)
	if err != nil {
		return fmt.Errorf("reading the proxy's RSS: %w", err)
	}
	n := b.o.udpSessions
	t0 := time.Now()
	fds, resent, err := b.udpSessions(ctx, n)
	defer closeFDs(fds)
	if err != nil {
		return fmt.Errorf("opening %d UDP sessions: %w; the proxy's stderr ends: %s", n, err, tail(b.proxy.Stderr(), 600))
	}
	opened := time.Since(t0)
	held := 0
	err = poll(ctx, 10*time.Second, fmt.Sprintf("the box to hold %d UDP sessions", n), func() (bool, error) {
		c, err := b.udpSockets(ctx, b.lab.Box, sessionUpFilter)
		held = c - base
		return held >= n, err
	})
	if err != nil {
		return fmt.Errorf("%w: it holds %d", err, held)
	}
	rss1, err := idleRSS(ctx, pid)
	if err != nil {
		return err
	}
	age := time.Since(t0)
	c, err := b.udpSockets(ctx, b.lab.Box, sessionUpFilter)
	if err != nil {
		return err
	}
	if c-base < n || age >= udpIdleTimeout {
		return fmt.Errorf("the sessions did not all stay for the measurement: %d of %d held after %.0fs (idle timeout %v)",
			c-base, n, age.Seconds(), udpIdleTimeout)
	}
	per := float64(rss1-rss0) / float64(n)
	b.add(sample{Round: round, Mode: mode, Workload: wlUDPMemPer, Unit: "KiB", Value: per,
		Note: fmt.Sprintf("RSS %d -> %d KiB, %d sessions opened in %.1fs (%d datagrams re-sent after 500 ms without an echo), measured %.0fs after the first",
			rss0, rss1, n, opened.Seconds(), resent, age.Seconds())})
	return nil
}

func closeFDs(fds []int) {
	for _, fd := range fds {
		closeFD(fd)
	}
}

// udpSessions creates n UDP sockets in the client namespace, then from 64
// goroutines has each exchange one datagram with the echo server (up to
// five tries, 500 ms each): every socket that got its echo back is a
// session in the proxy. The sockets are returned open, idle, with how
// many datagrams had to be sent again.
func (b *bench) udpSessions(ctx context.Context, n int) (fds []int, resent int64, err error) {
	fds = make([]int, 0, n)
	err = b.lab.Client.Do(func() error {
		for range n {
			fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, unix.IPPROTO_UDP)
			if err != nil {
				return fmt.Errorf("socket: %w", err)
			}
			fds = append(fds, fd)
		}
		return nil
	})
	if err != nil {
		return fds, 0, err
	}
	dst := &unix.SockaddrInet4{Port: udpPort, Addr: netip.MustParseAddr(serverIP4).As4()}
	var again atomic.Int64
	// Sessions expire after the idle timeout: the phase must end well
	// within it.
	ctx, cancel := context.WithTimeout(ctx, udpIdleTimeout/2)
	defer cancel()
	failed, first := onEach(ctx, fds, func(fd int) error {
		tries, err := echoOnce(fd, dst, make([]byte, 64))
		again.Add(int64(tries - 1))
		return err
	})
	if ctx.Err() != nil {
		return fds, again.Load(), ctx.Err()
	}
	if failed > 0 {
		return fds, again.Load(), fmt.Errorf("%d of %d sockets got no echo (%d datagrams re-sent), first: %w", failed, n, again.Load(), first)
	}
	return fds, again.Load(), nil
}

// echoOnce connects fd to dst, sends a datagram and waits for its echo,
// up to five times; it returns how many datagrams it sent.
func echoOnce(fd int, dst unix.Sockaddr, buf []byte) (tries int, err error) {
	tv := unix.NsecToTimeval((500 * time.Millisecond).Nanoseconds())
	if err := unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv); err != nil {
		return 1, err
	}
	if err := unix.Connect(fd, dst); err != nil {
		return 1, fmt.Errorf("connect: %w", err)
	}
	msg := []byte("ghostwire bench: idle session")
	var last error
	for tries = 1; tries <= 5; tries++ {
		if _, err := unix.Write(fd, msg); err != nil {
			last = err
			continue
		}
		if _, err := readRetry(fd, buf); err != nil {
			last = err
			continue
		}
		return tries, nil
	}
	return 5, last
}
