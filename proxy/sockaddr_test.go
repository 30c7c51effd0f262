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
