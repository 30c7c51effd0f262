package appliance

import (
	"encoding/binary"
	"slices"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ghostwire/ghostwire/rules"
)

var testWant = healWant{routing: rules.Routing{Mark: 1, Table: 100, Priority: 1000}, bridge: "br0", ports: []string{"eth0", "eth1"}}

// whole is the kernel as ghostwire wants it.
func whole() healState {
	ok := []healRoute{{local: true, lo: true}}
	own := []healRule{{mark: 1, table: 100}}
	return healState{
		rules:  map[int][]healRule{unix.AF_INET: own, unix.AF_INET6: slices.Clone(own)},
		routes: map[int][]healRoute{unix.AF_INET: ok, unix.AF_INET6: slices.Clone(ok)},
		links: map[string]healLink{
			"br0":  {exists: true, index: 5, up: true},
			"eth0": {exists: true, index: 2, master: 5, up: true},
			"eth1": {exists: true, index: 3, master: 5, up: true},
		},
	}
}

func TestHealRepairs(t *testing.T) {
	type want struct{ what, why string }
	for _, tc := range []struct {
		name   string
		break_ func(*healState)
		want   []want
	}{
		{"nothing missing", func(*healState) {}, nil},
		{"v4 rule deleted", func(s *healState) { s.rules[unix.AF_INET] = nil },
			[]want{{"ip rule fwmark 0x1 lookup 100 pref 1000", "deleted"}}},
		{"v6 rule changed", func(s *healState) { s.rules[unix.AF_INET6] = []healRule{{mark: 2, table: 100}} },
			[]want{{"ip -6 rule fwmark 0x1 lookup 100 pref 1000", "changed"}}},
		{"a foreign rule beside ours is fine", func(s *healState) {
			s.rules[unix.AF_INET] = append(s.rules[unix.AF_INET], healRule{mark: 9, table: 7})
		}, nil},
		{"routes deleted and changed, before the rules", func(s *healState) {
			s.rules[unix.AF_INET] = nil
			s.routes[unix.AF_INET] = nil
			s.routes[unix.AF_INET6] = []healRoute{{local: false, lo: true}}
		}, []want{
			{"ip route local 0.0.0.0/0 dev lo table 100", "deleted"},
			{"ip -6 route local ::/0 dev lo table 100", "changed"},
			{"ip rule fwmark 0x1 lookup 100 pref 1000", "deleted"},
		}},
		{"port released and port down", func(s *healState) {
			s.links["eth0"] = healLink{exists: true, index: 2}
			s.links["eth1"] = healLink{exists: true, index: 3, master: 5}
		}, []want{{"link eth0 master br0", "released from the bridge"}, {"link eth1 up", "set down"}}},
		{"bridge down", func(s *healState) { s.links["br0"] = healLink{exists: true, index: 5} },
			[]want{{"link br0 up", "set down"}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			st := whole()
			tc.break_(&st)
			var got []want
			for _, r := range testWant.repairs(st) {
				if !r.restorable {
					t.Errorf("%s: not restorable", r.what)
				}
				got = append(got, want{r.what, r.why})
			}
			if !slices.Equal(got, tc.want) {
				t.Errorf("repairs = %v, want %v", got, tc.want)
			}
		})
	}
}

func TestHealRepairsUnrestorable(t *testing.T) {
	st := whole()
	delete(st.links, "eth1")
	rs := testWant.repairs(st)
	if len(rs) != 1 || rs[0].restorable || rs[0].what != "link eth1 master br0" {
		t.Errorf("a vanished port: %+v, want one unrestorable repair", rs)
	}
}

func nlmsg(typ uint16, data []byte, attrs ...[]byte) syscall.NetlinkMessage {
	for _, a := range attrs {
		data = append(data, a...)
	}
	return syscall.NetlinkMessage{Header: syscall.NlMsghdr{Type: typ, Len: uint32(syscall.NLMSG_HDRLEN + len(data))}, Data: data}
}

func rta(typ uint16, v []byte) []byte {
	n := syscall.SizeofRtAttr + len(v)
	b := make([]byte, (n+3)&^3)
	binary.NativeEndian.PutUint16(b, uint16(n))
	binary.NativeEndian.PutUint16(b[2:], typ)
	copy(b[4:], v)
	return b
}

func TestHealRelevant(t *testing.T) {
	rt := func(table byte) []byte {
		b := make([]byte, unix.SizeofRtMsg)
		b[4] = table
		return b
	}
	u32 := func(v uint32) []byte { return binary.NativeEndian.AppendUint32(nil, v) }
	ifi := func() []byte { return make([]byte, unix.SizeofIfInfomsg) }
	for _, tc := range []struct {
		name string
		m    syscall.NetlinkMessage
		want bool
	}{
		{"any rule", nlmsg(unix.RTM_DELRULE, make([]byte, 12)), true},
		{"route of the table", nlmsg(unix.RTM_DELROUTE, rt(100)), true},
		{"route of the table by attribute", nlmsg(unix.RTM_NEWROUTE, rt(unix.RT_TABLE_COMPAT), rta(unix.RTA_TABLE, u32(100))), true},
		{"route of main", nlmsg(unix.RTM_NEWROUTE, rt(unix.RT_TABLE_MAIN), rta(unix.RTA_TABLE, u32(unix.RT_TABLE_MAIN))), false},
		{"a port", nlmsg(unix.RTM_NEWLINK, ifi(), rta(unix.IFLA_IFNAME, []byte("eth1\x00"))), true},
		{"another link", nlmsg(unix.RTM_NEWLINK, ifi(), rta(unix.IFLA_IFNAME, []byte("wlan0\x00"))), false},
		{"an address", nlmsg(unix.RTM_NEWADDR, make([]byte, 8)), false},
	} {
		if got := testWant.relevant(tc.m); got != tc.want {
			t.Errorf("%s: relevant = %v, want %v", tc.name, got, tc.want)
		}
	}
}

// A burst of kicks is passed on within healMaxDelay of its first kick even
// if the kicks never pause.
func TestHealDebounce(t *testing.T) {
	hw := &healWatch{done: make(chan struct{})}
	kick, out := make(chan struct{}, 1), make(chan struct{}, 1)
	hw.wg.Add(1)
	go func() { defer hw.wg.Done(); hw.debounce(kick, out) }()
	defer func() { close(hw.done); hw.wg.Wait() }()
	start := time.Now()
	stopKicking := make(chan struct{})
	go func() {
		for {
			select {
			case <-stopKicking:
				return
			case kick <- struct{}{}:
			}
			time.Sleep(5 * time.Millisecond)
		}
	}()
	<-out
	close(stopKicking)
	if d := time.Since(start); d > healMaxDelay+200*time.Millisecond {
		t.Errorf("a never-pausing burst was passed on after %s, want about %s", d, healMaxDelay)
	}
}
