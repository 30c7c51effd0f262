package provision

import (
	"slices"
	"strings"
	"testing"

	"github.com/ghostwire/ghostwire/rules"
)

// The UDP lines appear only when the config intercepts UDP, and the bypass
// line only while the tables are in the UDP bypass variant.
func TestStatusStringUDP(t *testing.T) {
	tables := rules.TablesState{Bridge: true, Inet: true, Owned: true, OwnerPortID: 7}
	for _, tt := range []struct {
		name  string
		s     Status
		lines []string
		not   []string
	}{
		{"no UDP", Status{Mode: Intercepting, Tables: tables},
			nil, []string{"udp"}},
		{"UDP", Status{Mode: Intercepting, Tables: tables, UDP: true, UDPFlows: 12},
			[]string{"udp sessions (seen within udp_idle_timeout): 12"}, []string{"udp: at proxy.max_udp_sessions"}},
		{"UDP, none yet", Status{Mode: Intercepting, Tables: tables, UDP: true},
			[]string{"udp sessions (seen within udp_idle_timeout): 0"}, nil},
		{"UDP bypass", Status{Mode: Intercepting, Tables: rules.TablesState{Bridge: true, Inet: true, Owned: true, UDPBypass: true}, UDP: true, UDPFlows: 65536},
			[]string{"ghostwire: intercepting", "udp sessions (seen within udp_idle_timeout): 65536",
				"udp: at proxy.max_udp_sessions: new UDP flows cross the bridge untouched"}, nil},
	} {
		t.Run(tt.name, func(t *testing.T) {
			out := tt.s.String()
			got := strings.Split(out, "\n")
			for _, l := range tt.lines {
				if !slices.Contains(got, l) {
					t.Errorf("no line %q in\n%s", l, out)
				}
			}
			for _, s := range tt.not {
				if strings.Contains(out, s) {
					t.Errorf("%q in\n%s", s, out)
				}
			}
		})
	}
}
