package proxy

import (
	"net/netip"
	"testing"
)

// The busiest come first, and a full table makes room by dropping its
// smaller half, so its size stays bounded whatever the traffic.
func TestTalkers(t *testing.T) {
	var tk talkers
	a := func(s string) netip.Addr { return netip.MustParseAddr(s) }
	tk.add(a("192.0.2.1"), a("198.51.100.1"), 100)
	tk.add(a("192.0.2.2"), a("198.51.100.1"), 300)
	tk.add(a("192.0.2.1"), a("198.51.100.2"), 50)
	c, s := tk.top(5)
	if len(c) != 2 || c[0] != (Talker{a("192.0.2.2"), 300}) || c[1] != (Talker{a("192.0.2.1"), 150}) {
		t.Errorf("clients = %v", c)
	}
	if len(s) != 2 || s[0] != (Talker{a("198.51.100.1"), 400}) {
		t.Errorf("servers = %v", s)
	}
	for i := range maxTalkers + 10 {
		tk.add(netip.AddrFrom4([4]byte{10, 0, byte(i >> 8), byte(i)}), a("198.51.100.9"), 1000+uint64(i))
	}
	if n := len(tk.clients); n > maxTalkers || n < maxTalkers/2 {
		t.Errorf("%d clients kept, want between %d and the bound %d", n, maxTalkers/2, maxTalkers)
	}
	if c, _ := tk.top(1); c[0].Bytes != 1000+maxTalkers+9 {
		t.Errorf("busiest after eviction = %v", c)
	}
}
