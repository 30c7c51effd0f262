package proxy

import (
	"net/netip"
	"testing"
	"unsafe"

	"golang.org/x/sys/unix"
)

// The kernel's socket addresses decode as x/sys/unix would, ports in
// network byte order included.
func TestRawAddrPort(t *testing.T) {
	var any4 unix.RawSockaddrAny
	a4 := (*unix.RawSockaddrInet4)(unsafe.Pointer(&any4))
	a4.Family = unix.AF_INET
	*(*[2]byte)(unsafe.Pointer(&a4.Port)) = [2]byte{0x1f, 0x90} // 8080
	a4.Addr = [4]byte{192, 0, 2, 1}
	if got, want := rawAddrPort(&any4), netip.MustParseAddrPort("192.0.2.1:8080"); got != want {
		t.Errorf("IPv4: %v, want %v", got, want)
	}

	var any6 unix.RawSockaddrAny
	a6 := (*unix.RawSockaddrInet6)(unsafe.Pointer(&any6))
	a6.Family = unix.AF_INET6
	*(*[2]byte)(unsafe.Pointer(&a6.Port)) = [2]byte{0x00, 0x50} // 80
	a6.Addr = netip.MustParseAddr("2001:db8::2").As16()
	if got, want := rawAddrPort(&any6), netip.MustParseAddrPort("[2001:db8::2]:80"); got != want {
		t.Errorf("IPv6: %v, want %v", got, want)
	}

	a6.Addr = netip.MustParseAddr("::ffff:192.0.2.9").As16()
	if got, want := rawAddrPort(&any6), netip.MustParseAddrPort("192.0.2.9:80"); got != want {
		t.Errorf("IPv4-mapped: %v, want %v (unmapped)", got, want)
	}

	var unknown unix.RawSockaddrAny
	unknown.Addr.Family = unix.AF_UNIX
	if got := rawAddrPort(&unknown); got.IsValid() {
		t.Errorf("AF_UNIX decoded as %v", got)
	}
}

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
