package proxy

import (
	"net/netip"
	"unsafe"

	"golang.org/x/sys/unix"
)

// udpBatch is how many datagrams one recvmmsg or sendmmsg moves: small
// datagrams cost a system call per batch, not per datagram.
const udpBatch = 16

// udpMaxDatagram is the largest UDP payload (65,535 − 8 header bytes; IPv4
// leaves 65,507 after its own header). Every buffer holds one whole, so
// nothing is ever truncated.
const udpMaxDatagram = 65535

// cmsgSpace fits an IP_ORIGDSTADDR or IPV6_ORIGDSTADDR control message and
// an SO_RXQ_OVFL one.
var cmsgSpace = unix.CmsgSpace(unix.SizeofSockaddrInet6) + unix.CmsgSpace(4)

// mmsghdr is the kernel's struct mmsghdr.
type mmsghdr struct {
	hdr unix.Msghdr
	n   uint32
	_   [4]byte
}

// batch is a loop's datagram buffers, allocated when it first sees UDP:
// udpBatch whole-datagram buffers with their headers, source addresses and
// control buffers.
type batch struct {
	msgs  [udpBatch]mmsghdr
	iovs  [udpBatch]unix.Iovec
	names [udpBatch]unix.RawSockaddrAny
	bufs  [udpBatch][]byte
	oob   []byte
	gso   []byte // a UDP_SEGMENT control message
	noGSO bool   // the kernel refused a GSO send once: use sendmmsg only
}

func newBatch() *batch {
	b := &batch{oob: make([]byte, udpBatch*cmsgSpace), gso: make([]byte, unix.CmsgSpace(2))}
	h := (*unix.Cmsghdr)(unsafe.Pointer(&b.gso[0]))
	h.Level, h.Type = unix.SOL_UDP, unix.UDP_SEGMENT
	h.SetLen(unix.CmsgLen(2))
	for i := range b.bufs {
		b.bufs[i] = make([]byte, udpMaxDatagram)
	}
	return b
}

// prepare resets the headers for a receive into every buffer; withAddrs
// also asks for each datagram's source and control messages (the
// listener's, which need the original destination).
func (b *batch) prepare(withAddrs bool) {
	for i := range b.msgs {
		b.iovs[i] = unix.Iovec{Base: &b.bufs[i][0]}
		b.iovs[i].SetLen(len(b.bufs[i]))
		h := &b.msgs[i].hdr
		*h = unix.Msghdr{Iov: &b.iovs[i], Iovlen: 1}
		if withAddrs {
			h.Name = (*byte)(unsafe.Pointer(&b.names[i]))
			h.Namelen = unix.SizeofSockaddrAny
			h.Control = &b.oob[i*cmsgSpace]
			h.SetControllen(cmsgSpace)
		}
		b.msgs[i].n = 0
	}
}

// recv reads up to udpBatch datagrams from fd (non-blocking).
func (b *batch) recv(fd int, withAddrs bool) (int, error) {
	b.prepare(withAddrs)
	for {
		n, _, errno := unix.Syscall6(unix.SYS_RECVMMSG, uintptr(fd), uintptr(unsafe.Pointer(&b.msgs[0])), udpBatch, unix.MSG_DONTWAIT, 0, 0)
		switch errno {
		case 0:
			return int(n), nil
		case unix.EINTR:
			continue
		}
		return 0, errno
	}
}

// datagram is the i-th datagram received.
func (b *batch) datagram(i int) []byte { return b.bufs[i][:b.msgs[i].n] }

// truncated reports whether the kernel cut the i-th datagram (never, with
// whole-datagram buffers; counted if it does).
func (b *batch) truncated(i int) bool { return b.msgs[i].hdr.Flags&unix.MSG_TRUNC != 0 }

// send sends msgs[from:to] on the connected socket fd and returns how
// many went; EAGAIN means its send buffer is full. Datagrams of one size
// (the last may be shorter) go as one UDP GSO send: one trip through the
// box's UDP and IP layers for the lot, the kernel cuts them up on the way
// out. Otherwise, or if the kernel refuses GSO, one sendmmsg.
func (b *batch) send(fd int, from, to int) (int, error) {
	for i := from; i < to; i++ {
		b.iovs[i].SetLen(int(b.msgs[i].n))
		h := &b.msgs[i].hdr
		h.Name, h.Namelen, h.Control = nil, 0, nil
		h.SetControllen(0)
	}
	if sent, err, ok := b.sendGSO(fd, from, to); ok {
		return sent, err
	}
	sent := 0
	for from+sent < to {
		n, _, errno := unix.Syscall6(unix.SYS_SENDMMSG, uintptr(fd), uintptr(unsafe.Pointer(&b.msgs[from+sent])), uintptr(to-from-sent), unix.MSG_DONTWAIT, 0, 0)
		switch errno {
		case 0:
			sent += int(n)
			continue
		case unix.EINTR:
			continue
		}
		return sent, errno
	}
	return sent, nil
}

// gsoMax is the most bytes one GSO send carries (one IP packet's worth).
const gsoMax = 65000

// sendGSO sends msgs[from:to] as one GSO datagram if they qualify (ok);
// all of them go or none (EAGAIN: the send buffer is full).
func (b *batch) sendGSO(fd int, from, to int) (sent int, err error, ok bool) {
	if b.noGSO || to-from < 2 {
		return 0, nil, false
	}
	size := b.msgs[from].n
	total := 0
	for i := from; i < to; i++ {
		n := b.msgs[i].n
		if n == 0 || n > size || n < size && i != to-1 {
			return 0, nil, false
		}
		total += int(n)
	}
	if total > gsoMax {
		return 0, nil, false
	}
	*(*uint16)(unsafe.Pointer(&b.gso[unix.CmsgLen(0)])) = uint16(size)
	msg := unix.Msghdr{Iov: &b.iovs[from], Control: &b.gso[0]}
	msg.SetIovlen(to - from)
	msg.SetControllen(len(b.gso))
	for {
		_, _, errno := unix.Syscall(unix.SYS_SENDMSG, uintptr(fd), uintptr(unsafe.Pointer(&msg)), unix.MSG_DONTWAIT)
		switch errno {
		case 0:
			return to - from, nil, true
		case unix.EINTR:
			continue
		case unix.EAGAIN, unix.ENOBUFS, unix.ECONNREFUSED, unix.EHOSTUNREACH, unix.ENETUNREACH:
			return 0, errno, true
		}
		// EIO, EINVAL, ENOPROTOOPT...: no UDP GSO on this path.
		b.noGSO = true
		return 0, nil, false
	}
}

// source is the i-th datagram's sender.
func (b *batch) source(i int) netip.AddrPort { return rawAddrPort(&b.names[i]) }

// cmsg returns the data of the i-th datagram's control message of level
// and typ, if it has one (no allocation: this runs per datagram).
func (b *batch) cmsg(i int, level, typ int32) ([]byte, bool) {
	oob := b.oob[i*cmsgSpace : i*cmsgSpace+int(b.msgs[i].hdr.Controllen)]
	for len(oob) >= unix.SizeofCmsghdr {
		h := (*unix.Cmsghdr)(unsafe.Pointer(&oob[0]))
		if h.Len < unix.SizeofCmsghdr || int(h.Len) > len(oob) {
			return nil, false
		}
		if h.Level == level && h.Type == typ {
			return oob[unix.CmsgLen(0):h.Len], true
		}
		next := unix.CmsgSpace(int(h.Len) - unix.CmsgLen(0))
		if next > len(oob) {
			return nil, false
		}
		oob = oob[next:]
	}
	return nil, false
}

// origDst is where the i-th datagram was going (IP_ORIGDSTADDR or
// IPV6_ORIGDSTADDR).
func (b *batch) origDst(i int) (netip.AddrPort, bool) {
	for _, c := range []struct {
		level, typ int32
		size       int
	}{{unix.SOL_IP, unix.IP_ORIGDSTADDR, unix.SizeofSockaddrInet4}, {unix.SOL_IPV6, unix.IPV6_ORIGDSTADDR, unix.SizeofSockaddrInet6}} {
		if d, ok := b.cmsg(i, c.level, c.typ); ok && len(d) >= c.size {
			var rsa unix.RawSockaddrAny
			copy((*[unix.SizeofSockaddrAny]byte)(unsafe.Pointer(&rsa))[:], d)
			if ap := rawAddrPort(&rsa); ap.IsValid() {
				return ap, true
			}
		}
	}
	return netip.AddrPort{}, false
}

// overflows is the i-th datagram's SO_RXQ_OVFL count, if it carries one.
func (b *batch) overflows(i int) (uint32, bool) {
	d, ok := b.cmsg(i, unix.SOL_SOCKET, unix.SO_RXQ_OVFL)
	if !ok || len(d) < 4 {
		return 0, false
	}
	return *(*uint32)(unsafe.Pointer(&d[0])), true
}
