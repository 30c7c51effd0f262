package proxy

import (
	"net/netip"
	"slices"
	"sync"
)

// maxTalkers bounds each side's table: a scan of a whole address space
// must not grow the proxy. When full, the smallest entry makes room.
const maxTalkers = 4096

// talkers sums the bytes relayed per client and per server address, as
// connections and UDP sessions end, for `ghostwire status`'s busiest.
type talkers struct {
	mu               sync.Mutex
	clients, servers map[netip.Addr]uint64
}

func (t *talkers) add(client, server netip.Addr, bytes uint64) {
	if bytes == 0 {
		return
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.clients == nil {
		t.clients, t.servers = map[netip.Addr]uint64{}, map[netip.Addr]uint64{}
	}
	addTalker(t.clients, client, bytes)
	addTalker(t.servers, server, bytes)
}

func addTalker(m map[netip.Addr]uint64, a netip.Addr, bytes uint64) {
	if _, ok := m[a]; !ok && len(m) >= maxTalkers {
		var least netip.Addr
		first := true
		for k, v := range m {
			if first || v < m[least] {
				least, first = k, false
			}
		}
		delete(m, least)
	}
	m[a] += bytes
}

// Talker is an address and the bytes relayed to and from it by finished
// connections and sessions.
type Talker struct {
	Addr  netip.Addr
	Bytes uint64
}

// top returns each side's n busiest, most bytes first.
func (t *talkers) top(n int) (clients, servers []Talker) {
	t.mu.Lock()
	defer t.mu.Unlock()
	return topOf(t.clients, n), topOf(t.servers, n)
}

func topOf(m map[netip.Addr]uint64, n int) []Talker {
	all := make([]Talker, 0, len(m))
	for a, b := range m {
		all = append(all, Talker{a, b})
	}
	slices.SortFunc(all, func(x, y Talker) int {
		if x.Bytes != y.Bytes {
			if x.Bytes > y.Bytes {
				return -1
			}
			return 1
		}
		return x.Addr.Compare(y.Addr)
	})
	return all[:min(n, len(all))]
}
