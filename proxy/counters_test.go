package proxy

import (
	"testing"
	"time"
)

// End reasons fall into a bounded set of classes for the metrics.
func TestCloseClass(t *testing.T) {
	for reason, want := range map[string]string{
		"eof": "eof", "client reset": "client reset", "dial: refused": "dial failed",
		"dial: timeout": "dial failed", "policy: sni deny x": "policy denied",
		"server error: EPIPE": "other", "shutdown": "shutdown",
	} {
		if got := closeClasses[closeClass(reason)]; got != want {
			t.Errorf("closeClass(%q) = %q, want %q", reason, got, want)
		}
	}
}

// The histogram's buckets are cumulative and its sum is in seconds.
func TestHistogram(t *testing.T) {
	var h histogram
	for _, d := range []time.Duration{300 * time.Microsecond, 3 * time.Millisecond, 10 * time.Second} {
		h.observe(d)
	}
	s := h.snapshot()
	if s.Count != 3 || s.Cumulative[0] != 1 || s.Cumulative[3] != 2 || s.Cumulative[len(s.Cumulative)-1] != 2 {
		t.Errorf("snapshot = %+v", s)
	}
	if s.Sum < 10.003 || s.Sum > 10.0034 {
		t.Errorf("sum = %v s, want 10.0033", s.Sum)
	}
}
