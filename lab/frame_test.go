package lab

import (
	"encoding/binary"
	"net"
	"net/netip"
	"testing"

	"github.com/mdlayher/ethernet"
)

var (
	testSrcMAC = net.HardwareAddr{0x02, 0, 0, 0, 0, 1}
	testDstMAC = net.HardwareAddr{0x02, 0, 0, 0, 0, 2}
)

func ethFrame(t testing.TB, et ethernet.EtherType, payload []byte) []byte {
	t.Helper()
	b, err := (&ethernet.Frame{Destination: testDstMAC, Source: testSrcMAC, EtherType: et, Payload: payload}).MarshalBinary()
	if err != nil {
		t.Fatalf("marshalling ethernet frame: %v", err)
	}
	return b
}

// ipv4 builds an IPv4 header (no options, checksum left zero: the parser
// does not check it) followed by l4.
func ipv4(src, dst netip.Addr, proto uint8, l4 []byte) []byte {
	p := make([]byte, 20, 20+len(l4))
	p[0] = 0x45
	binary.BigEndian.PutUint16(p[2:4], uint16(20+len(l4)))
	p[8] = 64
	p[9] = proto
	s, d := src.As4(), dst.As4()
	copy(p[12:16], s[:])
	copy(p[16:20], d[:])
	return append(p, l4...)
}

// ipv6 builds an IPv6 header followed by ext (extension headers, already
// chained) and l4; next is the first next-header value.
func ipv6(src, dst netip.Addr, next uint8, ext, l4 []byte) []byte {
	p := make([]byte, 40, 40+len(ext)+len(l4))
	p[0] = 0x60
	binary.BigEndian.PutUint16(p[4:6], uint16(len(ext)+len(l4)))
	p[6] = next
	p[7] = 64
	s, d := src.As16(), dst.As16()
	copy(p[8:24], s[:])
	copy(p[24:40], d[:])
	return append(append(p, ext...), l4...)
}

func tcpHeader(sport, dport uint16, flags uint8) []byte {
	h := make([]byte, 20)
	binary.BigEndian.PutUint16(h[0:2], sport)
	binary.BigEndian.PutUint16(h[2:4], dport)
	h[12] = 5 << 4
	h[13] = flags
	return h
}

func udpHeader(sport, dport uint16, payload []byte) []byte {
	h := make([]byte, 8, 8+len(payload))
	binary.BigEndian.PutUint16(h[0:2], sport)
	binary.BigEndian.PutUint16(h[2:4], dport)
	binary.BigEndian.PutUint16(h[4:6], uint16(8+len(payload)))
	return append(h, payload...)
}

var (
	c4, s4 = netip.MustParseAddr("192.0.2.1"), netip.MustParseAddr("192.0.2.2")
	c6, s6 = netip.MustParseAddr("2001:db8:1::1"), netip.MustParseAddr("2001:db8:1::2")
)

func TestParseFrame(t *testing.T) {
	hopByHop := []byte{ProtoUDP, 0, 5, 2, 0, 0, 1, 0} // next UDP, 8 bytes, router alert + PadN
	fragFirst := []byte{ProtoUDP, 0, 0x00, 0x01, 0, 0, 0, 1}
	fragLater := []byte{ProtoUDP, 0, 0x05, 0x01, 0, 0, 0, 1}
	v4frag := ipv4(c4, s4, ProtoUDP, udpHeader(1, 2, nil))
	binary.BigEndian.PutUint16(v4frag[6:8], 185) // fragment offset 185*8
	tests := []struct {
		name string
		b    []byte
		want Frame
	}{
		{
			name: "ipv4 tcp syn",
			b:    ethFrame(t, ethernet.EtherTypeIPv4, ipv4(c4, s4, ProtoTCP, tcpHeader(40000, 80, TCPFlagSYN))),
			want: Frame{Src: c4, Dst: s4, TTL: 64, Proto: ProtoTCP, SrcPort: 40000, DstPort: 80, TCPFlags: TCPFlagSYN},
		},
		{
			name: "ipv4 tcp with options and payload",
			b: func() []byte {
				l4 := append(tcpHeader(80, 40000, TCPFlagACK|TCPFlagPSH), "hello"...)
				p := ipv4(s4, c4, ProtoTCP, nil)
				p[0] = 0x46 // 4 bytes of options
				binary.BigEndian.PutUint16(p[2:4], uint16(24+len(l4)))
				p = append(append(p, 1, 1, 1, 0), l4...)
				return ethFrame(t, ethernet.EtherTypeIPv4, p)
			}(),
			want: Frame{Src: s4, Dst: c4, TTL: 64, Proto: ProtoTCP, SrcPort: 80, DstPort: 40000, TCPFlags: TCPFlagACK | TCPFlagPSH},
		},
		{
			name: "ipv6 udp",
			b:    ethFrame(t, ethernet.EtherTypeIPv6, ipv6(c6, s6, ProtoUDP, nil, udpHeader(5353, 53, []byte("q")))),
			want: Frame{Src: c6, Dst: s6, TTL: 64, Proto: ProtoUDP, SrcPort: 5353, DstPort: 53},
		},
		{
			name: "ipv6 udp after hop-by-hop",
			b:    ethFrame(t, ethernet.EtherTypeIPv6, ipv6(c6, s6, 0, hopByHop, udpHeader(1000, 2000, nil))),
			want: Frame{Src: c6, Dst: s6, TTL: 64, Proto: ProtoUDP, SrcPort: 1000, DstPort: 2000},
		},
		{
			name: "ipv6 first fragment has ports",
			b:    ethFrame(t, ethernet.EtherTypeIPv6, ipv6(c6, s6, 44, fragFirst, udpHeader(1, 2, nil))),
			want: Frame{Src: c6, Dst: s6, TTL: 64, Proto: ProtoUDP, SrcPort: 1, DstPort: 2},
		},
		{
			name: "ipv6 later fragment has no ports",
			b:    ethFrame(t, ethernet.EtherTypeIPv6, ipv6(c6, s6, 44, fragLater, udpHeader(1, 2, nil))),
			want: Frame{Src: c6, Dst: s6, TTL: 64, Proto: ProtoUDP},
		},
		{
			name: "ipv4 later fragment has no ports",
			b:    ethFrame(t, ethernet.EtherTypeIPv4, v4frag),
			want: Frame{Src: c4, Dst: s4, TTL: 64, Proto: ProtoUDP},
		},
		{
			name: "ipv6 icmpv6",
			b:    ethFrame(t, ethernet.EtherTypeIPv6, ipv6(c6, s6, ProtoICMPv6, nil, []byte{135, 0, 0, 0})),
			want: Frame{Src: c6, Dst: s6, TTL: 64, Proto: ProtoICMPv6},
		},
		{
			name: "arp is not ip",
			b:    ethFrame(t, ethernet.EtherTypeARP, make([]byte, 28)),
			want: Frame{},
		},
		{
			name: "truncated ipv4 header",
			b:    ethFrame(t, ethernet.EtherTypeIPv4, ipv4(c4, s4, ProtoTCP, nil))[:14+19],
			want: Frame{},
		},
		{
			name: "truncated tcp header keeps ports",
			b:    ethFrame(t, ethernet.EtherTypeIPv4, ipv4(c4, s4, ProtoTCP, tcpHeader(1, 2, TCPFlagSYN)))[:14+20+8],
			want: Frame{Src: c4, Dst: s4, TTL: 64, Proto: ProtoTCP, SrcPort: 1, DstPort: 2},
		},
		{
			name: "truncated ipv6 header",
			b:    ethFrame(t, ethernet.EtherTypeIPv6, ipv6(c6, s6, ProtoUDP, nil, nil))[:14+39],
			want: Frame{},
		},
		{
			name: "ipv6 truncated extension header",
			b:    ethFrame(t, ethernet.EtherTypeIPv6, ipv6(c6, s6, 0, []byte{ProtoUDP, 3}, nil)),
			want: Frame{Src: c6, Dst: s6, TTL: 64, Proto: 0},
		},
		{
			name: "ipv4 header claiming ipv6 version",
			b:    ethFrame(t, ethernet.EtherTypeIPv4, ipv6(c6, s6, ProtoUDP, nil, udpHeader(1, 2, nil))),
			want: Frame{},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := ParseFrame(tt.b)
			if err != nil {
				t.Fatalf("ParseFrame: %v", err)
			}
			if got.Ethernet == nil || got.Ethernet.Source.String() != testSrcMAC.String() {
				t.Fatalf("ethernet header not parsed: %+v", got.Ethernet)
			}
			got.Ethernet = nil
			if got != tt.want {
				t.Errorf("ParseFrame = %v (%+v), want %v (%+v)", got, got, tt.want, tt.want)
			}
		})
	}
}

func TestParseFrameShort(t *testing.T) {
	for n := range 14 {
		if _, err := ParseFrame(make([]byte, n)); err == nil {
			t.Errorf("ParseFrame of %d bytes: no error", n)
		}
	}
}

// TestParseFrameCopies checks that frames survive reuse of the read buffer.
func TestParseFrameCopies(t *testing.T) {
	b := ethFrame(t, ethernet.EtherTypeIPv4, ipv4(c4, s4, ProtoUDP, udpHeader(1, 2, []byte("data"))))
	f, err := ParseFrame(b)
	if err != nil {
		t.Fatal(err)
	}
	for i := range b {
		b[i] = 0xff
	}
	if f.Ethernet.Source.String() != testSrcMAC.String() || f.Ethernet.Payload[0] != 0x45 {
		t.Errorf("parsed frame shares memory with its input")
	}
}

func FuzzParseFrame(f *testing.F) {
	f.Add(ethFrame(f, ethernet.EtherTypeIPv4, ipv4(c4, s4, ProtoTCP, tcpHeader(40000, 80, TCPFlagSYN))))
	f.Add(ethFrame(f, ethernet.EtherTypeIPv6, ipv6(c6, s6, ProtoUDP, nil, udpHeader(1, 2, nil))))
	f.Add(ethFrame(f, ethernet.EtherTypeIPv6, ipv6(c6, s6, 0, []byte{ProtoUDP, 0, 5, 2, 0, 0, 1, 0}, udpHeader(1, 2, nil))))
	f.Add(ethFrame(f, ethernet.EtherTypeIPv6, ipv6(c6, s6, 44, []byte{ProtoTCP, 0, 0, 1, 0, 0, 0, 1}, tcpHeader(1, 2, 0))))
	f.Add(ethFrame(f, ethernet.EtherTypeARP, make([]byte, 28)))
	f.Add(ethFrame(f, ethernet.EtherTypeVLAN, []byte{0, 1, 0x08, 0}))
	f.Add([]byte{})
	f.Add(make([]byte, 14))
	f.Fuzz(func(t *testing.T, b []byte) {
		fr, err := ParseFrame(b)
		if err != nil {
			if fr.Ethernet != nil || fr.Src.IsValid() {
				t.Fatalf("failed parse returned data: %+v", fr)
			}
			return
		}
		if fr.Ethernet == nil {
			t.Fatal("successful parse without ethernet header")
		}
		if fr.Src.IsValid() != fr.Dst.IsValid() {
			t.Fatalf("only one of src and dst set: %v", fr)
		}
		if fr.Src.IsValid() {
			if want := fr.Ethernet.EtherType == ethernet.EtherTypeIPv4; fr.Src.Is4() != want {
				t.Fatalf("address family does not match ethertype %v: %v", fr.Ethernet.EtherType, fr)
			}
		} else if fr.Proto != 0 || fr.SrcPort != 0 || fr.DstPort != 0 {
			t.Fatalf("transport fields without IP addresses: %+v", fr)
		}
		if fr.Proto != ProtoTCP && fr.Proto != ProtoUDP && (fr.SrcPort != 0 || fr.DstPort != 0) {
			t.Fatalf("ports on a non-TCP/UDP frame: %v", fr)
		}
		if fr.Proto != ProtoTCP && fr.TCPFlags != 0 {
			t.Fatalf("TCP flags on a non-TCP frame: %v", fr)
		}
		_ = fr.String()
	})
}
