package lab

import (
	"encoding/binary"
	"fmt"
	"net/netip"

	"github.com/mdlayher/ethernet"
)

// IP protocol numbers found in Frame.Proto.
const (
	ProtoICMP   = 1
	ProtoTCP    = 6
	ProtoUDP    = 17
	ProtoICMPv6 = 58
)

// TCP flag bits found in Frame.TCPFlags.
const (
	TCPFlagFIN = 0x01
	TCPFlagSYN = 0x02
	TCPFlagRST = 0x04
	TCPFlagPSH = 0x08
	TCPFlagACK = 0x10
)

// Frame is one captured Ethernet frame with its IP header summarised. For a
// non-IP frame, or an IP packet too short for its header, the IP fields are
// zero; ports are set only for TCP and UDP, and for a non-first fragment not
// at all.
type Frame struct {
	Ethernet *ethernet.Frame
	Src, Dst netip.Addr
	// Proto is the IP protocol (ProtoTCP, ProtoUDP, ...) after any IPv6
	// extension headers.
	Proto            uint8
	TTL              uint8 // IPv4 TTL or IPv6 hop limit: 1 less per router
	SrcPort, DstPort uint16
	TCPFlags         uint8
}

// String renders the frame like a one-line tcpdump summary, for test logs.
func (f Frame) String() string {
	if !f.Src.IsValid() {
		if f.Ethernet == nil {
			return "<empty frame>"
		}
		return fmt.Sprintf("%s > %s ethertype %v", f.Ethernet.Source, f.Ethernet.Destination, f.Ethernet.EtherType)
	}
	switch f.Proto {
	case ProtoTCP, ProtoUDP:
		return fmt.Sprintf("%s > %s proto %d flags %#02x",
			netip.AddrPortFrom(f.Src, f.SrcPort), netip.AddrPortFrom(f.Dst, f.DstPort), f.Proto, f.TCPFlags)
	}
	return fmt.Sprintf("%s > %s proto %d", f.Src, f.Dst, f.Proto)
}

// ParseFrame parses an Ethernet frame and the IPv4/IPv6 and TCP/UDP headers
// it carries. It fails only if b is too short for an Ethernet header; any
// shorter layer beyond that is left zero. The frame's bytes are copied.
func ParseFrame(b []byte) (Frame, error) {
	eth := new(ethernet.Frame)
	if err := eth.UnmarshalBinary(b); err != nil {
		return Frame{}, fmt.Errorf("parsing ethernet header: %w", err)
	}
	f := Frame{Ethernet: eth}
	switch eth.EtherType {
	case ethernet.EtherTypeIPv4:
		f.parseIPv4(eth.Payload)
	case ethernet.EtherTypeIPv6:
		f.parseIPv6(eth.Payload)
	}
	return f, nil
}

func (f *Frame) parseIPv4(p []byte) {
	if len(p) < 20 || p[0]>>4 != 4 {
		return
	}
	ihl := int(p[0]&0x0f) * 4
	if ihl < 20 || len(p) < ihl {
		return
	}
	// Ethernet pads short frames: trust the IP total length when it fits.
	if total := int(binary.BigEndian.Uint16(p[2:4])); total >= ihl && total <= len(p) {
		p = p[:total]
	}
	f.Src = netip.AddrFrom4([4]byte(p[12:16]))
	f.Dst = netip.AddrFrom4([4]byte(p[16:20]))
	f.Proto = p[9]
	f.TTL = p[8]
	if fragOffset := binary.BigEndian.Uint16(p[6:8]) & 0x1fff; fragOffset != 0 {
		return // no transport header in this fragment
	}
	f.parseTransport(p[ihl:])
}

func (f *Frame) parseIPv6(p []byte) {
	if len(p) < 40 || p[0]>>4 != 6 {
		return
	}
	if plen := int(binary.BigEndian.Uint16(p[4:6])); 40+plen <= len(p) {
		p = p[:40+plen]
	}
	f.Src = netip.AddrFrom16([16]byte(p[8:24]))
	f.Dst = netip.AddrFrom16([16]byte(p[24:40]))
	f.TTL = p[7]
	next, rest := p[6], p[40:]
	// Walk extension headers (MLD reports carry hop-by-hop options, for
	// one). The bound stops crafted chains from looping long.
	for range 8 {
		var hdrLen int
		switch next {
		case 0, 43, 60: // hop-by-hop, routing, destination options
			if len(rest) < 2 {
				f.Proto = next
				return
			}
			hdrLen = (int(rest[1]) + 1) * 8
		case 44: // fragment
			if len(rest) < 8 {
				f.Proto = next
				return
			}
			if binary.BigEndian.Uint16(rest[2:4])>>3 != 0 {
				f.Proto = rest[0]
				return // no transport header in this fragment
			}
			hdrLen = 8
		case 51: // authentication header
			if len(rest) < 2 {
				f.Proto = next
				return
			}
			hdrLen = (int(rest[1]) + 2) * 4
		default:
			f.Proto = next
			f.parseTransport(rest)
			return
		}
		if len(rest) < hdrLen {
			f.Proto = next
			return
		}
		next, rest = rest[0], rest[hdrLen:]
	}
	f.Proto = next
}

func (f *Frame) parseTransport(p []byte) {
	switch f.Proto {
	case ProtoTCP, ProtoUDP:
	default:
		return
	}
	if len(p) < 4 {
		return
	}
	f.SrcPort = binary.BigEndian.Uint16(p[0:2])
	f.DstPort = binary.BigEndian.Uint16(p[2:4])
	if f.Proto == ProtoTCP && len(p) >= 14 {
		f.TCPFlags = p[13]
	}
}
