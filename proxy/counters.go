package proxy

import (
	"math"
	"strings"
	"sync/atomic"
	"time"
)

// End reasons are free text ("dial: refused", "server error: ..."); a
// metric needs a bounded set. closeClass maps a reason to its class.
var closeClasses = [...]string{"eof", "client reset", "server reset", "idle timeout", "close not acknowledged", "dial failed", "policy denied", "shutdown", "other"}

func closeClass(reason string) int {
	switch {
	case strings.HasPrefix(reason, "dial: "):
		return 5
	case strings.HasPrefix(reason, "policy: "):
		return 6
	}
	for i, c := range closeClasses {
		if c == reason {
			return i
		}
	}
	return len(closeClasses) - 1
}

// dialBuckets are the upper bounds, in seconds, of the dial-duration
// histogram: from a LAN's sub-millisecond to the connect timeout's range.
var dialBuckets = [...]float64{0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5}

// histogram counts observations per bucket, lock-free (the loops observe,
// Stats reads).
type histogram struct {
	counts [len(dialBuckets) + 1]atomic.Uint64 // the last is +Inf
	sumNS  atomic.Uint64
}

func (h *histogram) observe(d time.Duration) {
	s := d.Seconds()
	i := 0
	for i < len(dialBuckets) && s > dialBuckets[i] {
		i++
	}
	h.counts[i].Add(1)
	h.sumNS.Add(uint64(max(d, 0)))
}

// Histogram is a snapshot of a histogram: Cumulative[i] observations were
// at most Bounds[i] seconds; Count in all; Sum their total in seconds.
type Histogram struct {
	Bounds     []float64
	Cumulative []uint64
	Count      uint64
	Sum        float64
}

func (h *histogram) snapshot() Histogram {
	s := Histogram{Bounds: dialBuckets[:], Cumulative: make([]uint64, len(dialBuckets))}
	var n uint64
	for i := range h.counts {
		n += h.counts[i].Load()
		if i < len(dialBuckets) {
			s.Cumulative[i] = n
		}
	}
	s.Count = n
	s.Sum = float64(h.sumNS.Load()) / float64(time.Second)
	if math.IsNaN(s.Sum) {
		s.Sum = 0
	}
	return s
}
