package proxy

import (
	"net/netip"
	"slices"
	"sync"
)

// maxTalkers bounds each side's table: a scan of a whole address space
// must not grow the proxy. When full, the smaller half makes room.
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
		shrink(m)
	}
	m[a] += bytes
}

// shrink drops the smaller half of a full table at once, so that a flood
// of new addresses costs a sort per maxTalkers/2 of them, not a scan of
// the table per connection.
func shrink(m map[netip.Addr]uint64) {
	sizes := make([]uint64, 0, len(m))
	for _, v := range m {
		sizes = append(sizes, v)
	}
	slices.Sort(sizes)
	median := sizes[len(sizes)/2]
	for k, v := range m {
		if v < median || v == median && len(m) > maxTalkers/2 {
			delete(m, k)
		}
	}
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
