package appliance

import (
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net"
	"os"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/ghostwire/ghostwire/bridge"
	"github.com/ghostwire/ghostwire/rules"
)

// Self-healing: `run` keeps the kernel objects the diversion relies on in
// place while it serves. A network manager may delete them (systemd-networkd
// removes foreign policy rules by default); nothing else tells the proxy.
//
// The watcher listens to rtnetlink notifications (rules of both families,
// routes of ghostwire's table, links of the bridge and its ports). A burst
// of events is debounced (healQuiet after the last one, healMaxDelay after
// the first at most) into one kick of the session loop, which compares the
// kernel with what it wants (healWant.repairs) and restores what differs.

const (
	healQuiet    = 50 * time.Millisecond
	healMaxDelay = 250 * time.Millisecond
)

// healWant is what the watcher keeps in place: ghostwire's own objects only.
type healWant struct {
	routing rules.Routing
	bridge  string
	ports   []string
}

func healWantFor(cfg *Config) (healWant, error) {
	spec, err := cfg.BridgeSpec()
	if err != nil {
		return healWant{}, err
	}
	rc := cfg.Routing
	return healWant{
		routing: rules.Routing{Mark: rc.Mark, Table: rc.Table, Priority: rc.Priority},
		bridge:  spec.Name,
		ports:   slices.Clone(spec.Ports),
	}, nil
}

// healRule is a policy rule at ghostwire's priority.
type healRule struct {
	mark  uint32
	table int
}

// healRoute is a default route in ghostwire's table.
type healRoute struct {
	local bool // type local
	lo    bool // via lo
}

// healLink is a link as the watcher sees it.
type healLink struct {
	exists bool
	index  int
	master int // ifindex of its master, 0 if none
	up     bool
}

// healState is the part of the kernel the watcher compares, read by
// observe (in tests: made up).
type healState struct {
	rules  map[int][]healRule  // by family: the rules at the priority
	routes map[int][]healRoute // by family: the default routes in the table
	links  map[string]healLink
}

type repairKind int

const (
	repairRouting repairKind = iota // a rule or route: Routing.Apply adds it
	repairPort                      // enslave and bring up a port
	repairBridgeUp
)

// repair is one difference between the kernel and healWant: what (as the
// iproute2 command that shows it), why it differs, and how to restore it.
type repair struct {
	kind       repairKind
	family     int
	route      bool // a route (else a rule), for repairRouting
	badRoutes  bool // a non-local default route sits in the table: replace it
	link       string
	enslave    bool
	up         bool
	what, why  string
	restorable bool
}

func familyIP(family int) string {
	if family == unix.AF_INET6 {
		return "ip -6"
	}
	return "ip"
}

// repairs lists what differs, routes before the rules that use them, then
// the links.
func (w healWant) repairs(st healState) []repair {
	var out []repair
	fams := []int{unix.AF_INET, unix.AF_INET6}
	r := w.routing
	for _, f := range fams {
		dst := "0.0.0.0/0"
		if f == unix.AF_INET6 {
			dst = "::/0"
		}
		routes := st.routes[f]
		if slices.Contains(routes, healRoute{local: true, lo: true}) {
			continue
		}
		why := "deleted"
		if len(routes) > 0 {
			why = "changed"
		}
		out = append(out, repair{kind: repairRouting, family: f, route: true, badRoutes: len(routes) > 0, restorable: true,
			what: fmt.Sprintf("%s route local %s dev lo table %d", familyIP(f), dst, r.Table), why: why})
	}
	for _, f := range fams {
		rs := st.rules[f]
		if slices.Contains(rs, healRule{mark: r.Mark, table: r.Table}) {
			continue
		}
		why := "deleted"
		if len(rs) > 0 {
			why = "changed"
		}
		out = append(out, repair{kind: repairRouting, family: f, restorable: true,
			what: fmt.Sprintf("%s rule fwmark %#x lookup %d pref %d", familyIP(f), r.Mark, r.Table, r.Priority), why: why})
	}
	br := st.links[w.bridge]
	if !br.exists {
		return append(out, repair{kind: repairBridgeUp, link: w.bridge, what: "link " + w.bridge, why: "deleted"})
	}
	for _, p := range w.ports {
		l := st.links[p]
		switch {
		case !l.exists:
			out = append(out, repair{kind: repairPort, link: p, what: fmt.Sprintf("link %s master %s", p, w.bridge), why: "deleted"})
		case l.master != br.index:
			why := "released from the bridge"
			if l.master != 0 {
				why = "moved to another master"
			}
			out = append(out, repair{kind: repairPort, link: p, enslave: true, up: !l.up, restorable: true,
				what: fmt.Sprintf("link %s master %s", p, w.bridge), why: why})
		case !l.up:
			out = append(out, repair{kind: repairPort, link: p, up: true, restorable: true,
				what: fmt.Sprintf("link %s up", p), why: "set down"})
		}
	}
	if !br.up {
		out = append(out, repair{kind: repairBridgeUp, link: w.bridge, up: true, restorable: true,
			what: fmt.Sprintf("link %s up", w.bridge), why: "set down"})
	}
	return out
}

// observe reads the state repairs compares.
func (w healWant) observe(h *netlink.Handle) (healState, error) {
	st := healState{rules: map[int][]healRule{}, routes: map[int][]healRoute{}, links: map[string]healLink{}}
	lo, err := h.LinkByName("lo")
	if err != nil {
		return st, fmt.Errorf("looking up lo: %w", err)
	}
	for _, f := range []int{unix.AF_INET, unix.AF_INET6} {
		all, err := bridge.RetryDump(func() ([]netlink.Rule, error) { return h.RuleList(f) })
		if err != nil {
			return st, fmt.Errorf("listing policy rules: %w", err)
		}
		for _, x := range all {
			if x.Priority == w.routing.Priority {
				st.rules[f] = append(st.rules[f], healRule{mark: x.Mark, table: x.Table})
			}
		}
		routes, err := bridge.RetryDump(func() ([]netlink.Route, error) {
			return h.RouteListFiltered(f, &netlink.Route{Table: w.routing.Table}, netlink.RT_FILTER_TABLE)
		})
		if err != nil {
			return st, fmt.Errorf("listing routes of table %d: %w", w.routing.Table, err)
		}
		for _, x := range routes {
			if x.Table == w.routing.Table && isDefault(x.Dst) {
				st.routes[f] = append(st.routes[f], healRoute{local: x.Type == unix.RTN_LOCAL, lo: x.LinkIndex == lo.Attrs().Index})
			}
		}
	}
	for _, name := range append([]string{w.bridge}, w.ports...) {
		l, err := h.LinkByName(name)
		var nf netlink.LinkNotFoundError
		if errors.As(err, &nf) {
			st.links[name] = healLink{}
			continue
		} else if err != nil {
			return st, fmt.Errorf("looking up %s: %w", name, err)
		}
		a := l.Attrs()
		st.links[name] = healLink{exists: true, index: a.Index, master: a.MasterIndex, up: a.Flags&net.FlagUp != 0}
	}
	return st, nil
}

func isDefault(dst *net.IPNet) bool {
	if dst == nil {
		return true
	}
	ones, _ := dst.Mask.Size()
	return ones == 0 && dst.IP.IsUnspecified()
}

// healer restores and counts; it runs on the session loop (restored is
// read from the control socket's goroutine, hence mu).
type healer struct {
	h      *netlink.Handle
	log    *slog.Logger
	mu     sync.Mutex
	counts map[string]int // restorations since start, by what; guarded by mu
	order  []string
	failed map[string]string // what → the last error logged, so a lasting failure is logged once
}

func newHealer(h *netlink.Handle, log *slog.Logger) *healer {
	return &healer{h: h, log: log, counts: map[string]int{}, failed: map[string]string{}}
}

// heal compares the kernel with w and restores what differs, logging one
// line per restoration. Safe to repeat: with nothing missing it changes
// nothing.
func (hl *healer) heal(w healWant) {
	st, err := w.observe(hl.h)
	if err != nil {
		hl.fail("reading the kernel", err)
		return
	}
	fixes := w.repairs(st)
	routing := false
	for _, r := range fixes {
		if !r.restorable {
			hl.fail(r.what, fmt.Errorf("%s: cannot restore it (re-run ghostwire apply)", r.why))
			continue
		}
		var err error
		switch r.kind {
		case repairRouting:
			if r.badRoutes {
				err = hl.dropDefaultRoutes(w, r.family)
			}
			if err == nil && !routing {
				err = w.routing.Apply(hl.h) // adds all that is missing, routes first
				routing = err == nil
			}
		case repairPort:
			err = hl.fixPort(w, r, st)
		case repairBridgeUp:
			err = hl.linkUp(w.bridge)
		}
		if err != nil {
			hl.fail(r.what, err)
			continue
		}
		delete(hl.failed, r.what)
		hl.mu.Lock()
		if hl.counts[r.what] == 0 {
			hl.order = append(hl.order, r.what)
		}
		hl.counts[r.what]++
		n := hl.counts[r.what]
		hl.mu.Unlock()
		hl.log.Warn("restored", "what", r.what, "why", r.why, "count", n)
	}
}

func (hl *healer) fail(what string, err error) {
	if hl.failed[what] == err.Error() {
		return
	}
	hl.failed[what] = err.Error()
	hl.log.Error("could not restore", "what", what, "err", err)
}

// dropDefaultRoutes deletes the default routes of ghostwire's table that
// are not its local one, so that its own can be added.
func (hl *healer) dropDefaultRoutes(w healWant, family int) error {
	lo, err := hl.h.LinkByName("lo")
	if err != nil {
		return err
	}
	routes, err := bridge.RetryDump(func() ([]netlink.Route, error) {
		return hl.h.RouteListFiltered(family, &netlink.Route{Table: w.routing.Table}, netlink.RT_FILTER_TABLE)
	})
	if err != nil {
		return err
	}
	for _, x := range routes {
		if x.Table != w.routing.Table || !isDefault(x.Dst) || (x.Type == unix.RTN_LOCAL && x.LinkIndex == lo.Attrs().Index) {
			continue
		}
		if err := hl.h.RouteDel(&x); err != nil && !errors.Is(err, unix.ESRCH) && !errors.Is(err, unix.ENOENT) {
			return err
		}
	}
	return nil
}

func (hl *healer) fixPort(w healWant, r repair, st healState) error {
	l, err := hl.h.LinkByName(r.link)
	if err != nil {
		return err
	}
	if r.enslave {
		if err := hl.h.LinkSetMasterByIndex(l, st.links[w.bridge].index); err != nil {
			return fmt.Errorf("enslaving %s to %s: %w", r.link, w.bridge, err)
		}
	}
	if r.up {
		if err := hl.h.LinkSetUp(l); err != nil {
			return fmt.Errorf("bringing %s up: %w", r.link, err)
		}
	}
	return nil
}

func (hl *healer) linkUp(name string) error {
	l, err := hl.h.LinkByName(name)
	if err != nil {
		return err
	}
	return hl.h.LinkSetUp(l)
}

// logCounts logs the restorations since start, by item, on one line.
// restored is how many times each item was restored since start.
func (hl *healer) restored() map[string]int {
	hl.mu.Lock()
	defer hl.mu.Unlock()
	return maps.Clone(hl.counts)
}

func (hl *healer) logCounts(log *slog.Logger) {
	total := 0
	var items []string
	for _, what := range hl.order {
		total += hl.counts[what]
		items = append(items, fmt.Sprintf("%s=%d", what, hl.counts[what]))
	}
	log.Info("restorations", "total", total, "items", strings.Join(items, "; "))
}

// healWatch listens to the rtnetlink notifications about w's objects and
// kicks out (buffered, one kick pending at most) once per debounced burst.
// It kicks once at the start, too. stop ends it and waits for it.
type healWatch struct {
	f    *os.File
	done chan struct{}
	wg   sync.WaitGroup
}

func startHealWatch(w healWant, out chan<- struct{}, log *slog.Logger) (*healWatch, error) {
	fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_RAW|unix.SOCK_CLOEXEC|unix.SOCK_NONBLOCK, unix.NETLINK_ROUTE)
	if err != nil {
		return nil, fmt.Errorf("opening rtnetlink for self-healing: %w", err)
	}
	var groups uint32
	for _, g := range []uint{unix.RTNLGRP_LINK, unix.RTNLGRP_IPV4_ROUTE, unix.RTNLGRP_IPV6_ROUTE, unix.RTNLGRP_IPV4_RULE, unix.RTNLGRP_IPV6_RULE} {
		groups |= 1 << (g - 1)
	}
	// A big buffer makes overruns (ENOBUFS) rare; one only costs a check.
	unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVBUF, 1<<20)
	if err := unix.Bind(fd, &unix.SockaddrNetlink{Family: unix.AF_NETLINK, Groups: groups}); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("subscribing to rtnetlink for self-healing: %w", err)
	}
	hw := &healWatch{f: os.NewFile(uintptr(fd), "rtnetlink"), done: make(chan struct{})}
	kick := make(chan struct{}, 1)
	kick <- struct{}{}
	hw.wg.Add(2)
	go func() { defer hw.wg.Done(); hw.read(w, kick, log) }()
	go func() { defer hw.wg.Done(); hw.debounce(kick, out) }()
	return hw, nil
}

func (hw *healWatch) stop() {
	close(hw.done)
	hw.f.Close() // wakes the blocked read
	hw.wg.Wait()
}

func (hw *healWatch) read(w healWant, kick chan<- struct{}, log *slog.Logger) {
	buf := make([]byte, 1<<16)
	poke := func() {
		select {
		case kick <- struct{}{}:
		default:
		}
	}
	for {
		n, err := hw.f.Read(buf)
		if errors.Is(err, syscall.ENOBUFS) { // missed some: look at everything
			poke()
			continue
		}
		if err != nil {
			select {
			case <-hw.done:
			default:
				log.Error("self-healing stopped: reading rtnetlink", "err", err)
			}
			return
		}
		msgs, err := syscall.ParseNetlinkMessage(buf[:n])
		if err != nil {
			poke()
			continue
		}
		for _, m := range msgs {
			if w.relevant(m) {
				poke()
				break
			}
		}
	}
}

// relevant reports whether a notification may concern w's objects: any
// policy rule, a route of its table, a link of its bridge.
func (w healWant) relevant(m syscall.NetlinkMessage) bool {
	switch m.Header.Type {
	case unix.RTM_NEWRULE, unix.RTM_DELRULE:
		return true
	case unix.RTM_NEWROUTE, unix.RTM_DELROUTE:
		if len(m.Data) < unix.SizeofRtMsg {
			return true
		}
		table := int(m.Data[4]) // rtmsg.rtm_table
		attrs, err := syscall.ParseNetlinkRouteAttr(&m)
		if err != nil {
			return true
		}
		for _, a := range attrs {
			if a.Attr.Type == unix.RTA_TABLE && len(a.Value) >= 4 {
				table = int(binary.NativeEndian.Uint32(a.Value))
			}
		}
		return table == w.routing.Table
	case unix.RTM_NEWLINK, unix.RTM_DELLINK:
		attrs, err := syscall.ParseNetlinkRouteAttr(&m)
		if err != nil {
			return true
		}
		for _, a := range attrs {
			if a.Attr.Type == unix.IFLA_IFNAME {
				name := strings.TrimRight(string(a.Value), "\x00")
				return name == w.bridge || slices.Contains(w.ports, name)
			}
		}
		return true
	}
	return false
}

// debounce turns kicks into one send on out healQuiet after the last kick
// of a burst, and no later than healMaxDelay after its first.
func (hw *healWatch) debounce(kick <-chan struct{}, out chan<- struct{}) {
	for {
		select {
		case <-hw.done:
			return
		case <-kick:
		}
		deadline := time.Now().Add(healMaxDelay)
		t := time.NewTimer(healQuiet)
	burst:
		for {
			select {
			case <-hw.done:
				t.Stop()
				return
			case <-kick:
				t.Reset(min(healQuiet, time.Until(deadline)))
			case <-t.C:
				break burst
			}
		}
		select {
		case out <- struct{}{}:
		default:
		}
	}
}
