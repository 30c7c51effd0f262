package proxy

import (
	"net"
	"net/netip"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Control messages are found by level and type among several, as the
// kernel lays them out (IP_ORIGDSTADDR then SO_RXQ_OVFL), and a truncated
// or absent one is not made up.
func TestBatchControlMessages(t *testing.T) {
	b := newBatch()
	b.prepare(true)
	put := func(oob []byte, level, typ int32, data []byte) int {
		h := (*unix.Cmsghdr)(unsafe.Pointer(&oob[0]))
		h.Level, h.Type = level, typ
		h.SetLen(unix.CmsgLen(len(data)))
		copy(oob[unix.CmsgLen(0):], data)
		return unix.CmsgSpace(len(data))
	}
	var sa unix.RawSockaddrInet4
	sa.Family = unix.AF_INET
	*(*[2]byte)(unsafe.Pointer(&sa.Port)) = [2]byte{0, 53}
	sa.Addr = [4]byte{192, 0, 2, 2}
	oob := b.oob[0:cmsgSpace]
	n := put(oob, unix.SOL_IP, unix.IP_ORIGDSTADDR, (*[unix.SizeofSockaddrInet4]byte)(unsafe.Pointer(&sa))[:])
	drops := uint32(7)
	n += put(oob[n:], unix.SOL_SOCKET, unix.SO_RXQ_OVFL, (*[4]byte)(unsafe.Pointer(&drops))[:])
	b.msgs[0].hdr.SetControllen(n)

	if got, ok := b.origDst(0); !ok || got != netip.MustParseAddrPort("192.0.2.2:53") {
		t.Errorf("origDst = %v, %v; want 192.0.2.2:53", got, ok)
	}
	if got, ok := b.overflows(0); !ok || got != 7 {
		t.Errorf("overflows = %d, %v; want 7", got, ok)
	}
	b.msgs[0].hdr.SetControllen(n - 6) // the second message cut inside its data
	if _, ok := b.overflows(0); ok {
		t.Error("a truncated SO_RXQ_OVFL message was read")
	}
	b.msgs[1].hdr.SetControllen(0)
	if _, ok := b.origDst(1); ok {
		t.Error("an original destination was found where there is none")
	}
}

// A run of equal datagrams (the last shorter) leaves as one GSO send and
// arrives as the same datagrams; a run that does not qualify goes by
// sendmmsg. Either way every datagram arrives whole and in order.
func TestBatchSendGSO(t *testing.T) {
	rx, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer rx.Close()
	rx.SetDeadline(time.Now().Add(5 * time.Second))
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	if err := unix.Connect(fd, &unix.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}, Port: rx.LocalAddr().(*net.UDPAddr).Port}); err != nil {
		t.Fatal(err)
	}
	for _, sizes := range [][]int{{1000, 1000, 1000, 500}, {300, 900, 300}} {
		b := newBatch()
		b.prepare(false)
		for i, n := range sizes {
			for j := range n {
				b.bufs[i][j] = byte(i + j)
			}
			b.msgs[i].n = uint32(n)
		}
		if sent, err := b.send(fd, 0, len(sizes)); sent != len(sizes) || err != nil {
			t.Fatalf("send %v: %d sent, %v", sizes, sent, err)
		}
		if b.noGSO {
			t.Errorf("send %v: the kernel refused GSO on loopback", sizes)
		}
		buf := make([]byte, 1<<16)
		for i, n := range sizes {
			got, err := rx.Read(buf)
			if err != nil {
				t.Fatalf("datagram %d of %v: %v", i, sizes, err)
			}
			if got != n || buf[0] != byte(i) || buf[n-1] != byte(i+n-1) {
				t.Fatalf("datagram %d of %v arrived as %d bytes [%d ... %d]", i, sizes, got, buf[0], buf[got-1])
			}
		}
	}
}
