package main

import (
	"encoding/json"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/signal"
	"runtime"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// The bench's UDP helpers: the bench binary re-executes itself in a lab
// namespace with one of these flags, like -serve-http.
//
//   - -udp-flood ADDR (client namespace): sends -udp-size datagrams to ADDR
//     from -udp-flows connected sockets for -udp-time, then prints a
//     floodResult as JSON. One thread sends, round robin over the flows, a
//     sendmmsg batch of udpFloodBatch datagrams at a time, as fast as the
//     kernel takes them (blocking sockets: no sleeping, no rate). One
//     thread, like iperf3 -u: every mode gets the same single sender, and
//     with 2 CPUs the rest of the path has the other. Several flows, so
//     that the proxy's per-CPU loops and the sink's sockets all get some.
//   - -udp-sink ADDR (server namespace): one SO_REUSEPORT socket per CPU,
//     each read by recvmmsg batches; counts datagrams and bytes and prints
//     a sinkResult as JSON when stopped (SIGTERM).
//   - -udp-echo ADDR (server namespace): sends every datagram back to
//     where it came from.
//
// Each prints "listening" on stdout once bound, so the bench knows when
// to start sending.

const (
	udpFloodBatch = 64
	udpSinkBatch  = 64
	udpSinkBuf    = 2048    // per datagram: the flood's are 64 bytes
	udpSinkRcvBuf = 4 << 20 // SO_RCVBUFFORCE: the same in every mode
)

// mmsghdr is the kernel's struct mmsghdr.
type mmsghdr struct {
	hdr unix.Msghdr
	n   uint32
	_   [4]byte
}

func sendmmsg(fd int, msgs []mmsghdr) (int, syscall.Errno) {
	n, _, errno := unix.Syscall6(unix.SYS_SENDMMSG, uintptr(fd), uintptr(unsafe.Pointer(&msgs[0])), uintptr(len(msgs)), 0, 0, 0)
	return int(n), errno
}

func recvmmsg(fd int, msgs []mmsghdr, flags int) (int, syscall.Errno) {
	n, _, errno := unix.Syscall6(unix.SYS_RECVMMSG, uintptr(fd), uintptr(unsafe.Pointer(&msgs[0])), uintptr(len(msgs)), uintptr(flags), 0, 0)
	return int(n), errno
}

func udpSockaddr(addr string) (unix.Sockaddr, error) {
	ua, err := net.ResolveUDPAddr("udp4", addr)
	if err != nil {
		return nil, err
	}
	sa := &unix.SockaddrInet4{Port: ua.Port}
	if ip4 := ua.IP.To4(); ip4 != nil {
		copy(sa.Addr[:], ip4)
	}
	return sa, nil
}

// runUDPFlood is -udp-flood.
func runUDPFlood(addr string, flows, size int, d time.Duration) error {
	if flows < 1 || size < 1 || size > 65507 || d <= 0 {
		return fmt.Errorf("udp flood: bad flows %d, size %d or time %v", flows, size, d)
	}
	dst, err := udpSockaddr(addr)
	if err != nil {
		return fmt.Errorf("udp flood: %w", err)
	}
	fds := make([]int, flows)
	for i := range fds {
		fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, unix.IPPROTO_UDP)
		if err != nil {
			return fmt.Errorf("udp flood: socket: %w", err)
		}
		if err := unix.Connect(fd, dst); err != nil {
			return fmt.Errorf("udp flood: connect %s: %w", addr, err)
		}
		fds[i] = fd
	}
	payload := make([]byte, size)
	for i := range payload {
		payload[i] = byte(i)
	}
	var (
		iov  = unix.Iovec{Base: &payload[0]}
		msgs = make([]mmsghdr, udpFloodBatch)
	)
	iov.SetLen(size)
	for i := range msgs {
		msgs[i].hdr = unix.Msghdr{Iov: &iov, Iovlen: 1}
	}
	runtime.LockOSThread()
	r := floodResult{Flows: flows, Size: size}
	start := time.Now()
	deadline := start.Add(d)
	for i := 0; ; i++ {
		if i%flows == 0 && time.Now().After(deadline) {
			break
		}
		n, errno := sendmmsg(fds[i%flows], msgs)
		switch errno {
		case 0:
			r.Sent += int64(n)
		case unix.EINTR:
		default:
			// A connected socket reports an ICMP error from its peer on
			// the next send (ECONNREFUSED); ENOBUFS when a queue is full.
			r.Errors++
			if r.FirstError == "" {
				r.FirstError = errno.Error()
			}
		}
	}
	r.Seconds = time.Since(start).Seconds()
	for _, fd := range fds {
		unix.Close(fd)
	}
	return json.NewEncoder(os.Stdout).Encode(r)
}

// runUDPSink is -udp-sink.
func runUDPSink(addr string) error {
	sa, err := udpSockaddr(addr)
	if err != nil {
		return fmt.Errorf("udp sink: %w", err)
	}
	var dgrams, bytes atomic.Int64
	n := max(runtime.NumCPU(), 1)
	fds := make([]int, n)
	for i := range fds {
		fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, unix.IPPROTO_UDP)
		if err != nil {
			return fmt.Errorf("udp sink: socket: %w", err)
		}
		if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_REUSEPORT, 1); err != nil {
			return fmt.Errorf("udp sink: SO_REUSEPORT: %w", err)
		}
		if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, udpSinkRcvBuf); err != nil {
			unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVBUF, udpSinkRcvBuf)
		}
		if err := unix.Bind(fd, sa); err != nil {
			return fmt.Errorf("udp sink: binding %s: %w", addr, err)
		}
		fds[i] = fd
	}
	for _, fd := range fds {
		go func() {
			bufs := make([]byte, udpSinkBatch*udpSinkBuf)
			iovs := make([]unix.Iovec, udpSinkBatch)
			msgs := make([]mmsghdr, udpSinkBatch)
			for i := range msgs {
				iovs[i] = unix.Iovec{Base: &bufs[i*udpSinkBuf]}
				iovs[i].SetLen(udpSinkBuf)
				msgs[i].hdr = unix.Msghdr{Iov: &iovs[i], Iovlen: 1}
			}
			for {
				n, errno := recvmmsg(fd, msgs, unix.MSG_WAITFORONE)
				if errno != 0 {
					if errno == unix.EINTR {
						continue
					}
					fmt.Fprintln(os.Stderr, "udp sink: recvmmsg:", errno)
					time.Sleep(time.Millisecond)
					continue
				}
				var b int64
				for i := range n {
					b += int64(msgs[i].n)
				}
				dgrams.Add(int64(n))
				bytes.Add(b)
			}
		}()
	}
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	fmt.Println("listening")
	<-sig
	return json.NewEncoder(os.Stdout).Encode(sinkResult{Datagrams: dgrams.Load(), Bytes: bytes.Load()})
}

// runUDPEcho is -udp-echo.
func runUDPEcho(addr string) error {
	ua, err := net.ResolveUDPAddr("udp4", addr)
	if err != nil {
		return fmt.Errorf("udp echo: %w", err)
	}
	c, err := net.ListenUDP("udp4", ua)
	if err != nil {
		return fmt.Errorf("udp echo: %w", err)
	}
	c.SetReadBuffer(udpSinkRcvBuf)
	fmt.Println("listening")
	buf := make([]byte, 65536)
	for {
		n, from, err := c.ReadFromUDPAddrPort(buf)
		if err != nil {
			return fmt.Errorf("udp echo: %w", err)
		}
		if _, err := c.WriteToUDPAddrPort(buf[:n], from); err != nil {
			fmt.Fprintln(os.Stderr, "udp echo:", err)
		}
	}
}

// floodAddr is where the flood and the other UDP clients send: the server,
// on the intercepted UDP port.
func floodAddr() string { return netip.AddrPortFrom(netip.MustParseAddr(serverIP4), udpPort).String() }
