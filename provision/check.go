package provision

import (
	"bufio"
	"encoding/json"
	"fmt"
	"maps"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/ghostwire/ghostwire/bridge"
	"github.com/ghostwire/ghostwire/rules"
)

// Level is how bad a check's finding is.
type Level int

const (
	OK Level = iota
	Warn
	Fail
)

func (l Level) String() string {
	switch l {
	case OK:
		return "OK"
	case Warn:
		return "WARN"
	}
	return "FAIL"
}

// MarshalText makes a Level "OK", "WARN" or "FAIL" in JSON.
func (l Level) MarshalText() ([]byte, error) { return []byte(l.String()), nil }

// Result is one finding of `ghostwire check`: what was found and the exact
// command or config key that fixes it (empty when OK).
type Result struct {
	Level Level  `json:"status"`
	Check string `json:"check"`
	Found string `json:"found"`
	Fix   string `json:"fix,omitempty"`
}

func (r Result) String() string {
	s := fmt.Sprintf("%-4s %s: %s", r.Level, r.Check, r.Found)
	if r.Fix != "" {
		s += "; fix: " + r.Fix
	}
	return s
}

// Check is one independent check: a pure function of what CheckFacts read.
type Check struct {
	Name string
	Run  func(CheckFacts) []Result
}

// Checks are the checks `ghostwire check` runs, in order. Add new ones here.
var Checks = []Check{
	{"provisioning", checkProvisioned},
	{"bridge-nf", checkBridgeNF},
	{"links", checkLinks},
	{"routing", checkRouting},
	{"proxy", checkProxy},
	{"proxy-port", checkProxyPort},
	{"rp-filter", checkRPFilter},
	{"ipv6", checkIPv6},
	{"foreign-tables", checkForeignTables},
	{"routes", checkRoutes},
	{"router-adverts", checkRouterAdverts},
	{"invisible", checkInvisible},
}

// RunChecks runs every check on f; a check that finds nothing wrong says OK.
func RunChecks(f CheckFacts) []Result {
	var out []Result
	for _, c := range Checks {
		rs := c.Run(f)
		for i := range rs {
			rs[i].Check = c.Name
		}
		out = append(out, rs...)
	}
	return out
}

// ExitStatus is check's exit status: 0 all OK, 1 warnings, 2 failures.
func ExitStatus(rs []Result) int {
	worst := OK
	for _, r := range rs {
		worst = max(worst, r.Level)
	}
	return int(worst)
}

// FormatResults is the text output, one line per result.
func FormatResults(rs []Result) string {
	var b strings.Builder
	for _, r := range rs {
		b.WriteString(r.String())
		b.WriteString("\n")
	}
	return b.String()
}

// ResultsJSON is the JSON output: an array of results.
func ResultsJSON(rs []Result) ([]byte, error) {
	if rs == nil {
		rs = []Result{}
	}
	return json.MarshalIndent(rs, "", "  ")
}

// LinkHealth is what the link checks need of one interface.
type LinkHealth struct {
	Kind    string
	Up      bool
	Carrier bool
	MTU     int
	Master  string
}

// Listener is a TCP socket listening on the proxy's port.
type Listener struct {
	Addr    string // local address:port
	PID     int    // 0 if no process was found holding it
	Process string // its comm
}

func (l Listener) String() string {
	if l.PID == 0 {
		return l.Addr
	}
	return fmt.Sprintf("%s (pid %d, %s)", l.Addr, l.PID, l.Process)
}

// CheckFacts are what the checks decide from, read once (CheckFacts) or
// given as fixtures.
type CheckFacts struct {
	Bridge      string
	Ports       []string // client NIC, server NIC
	Routing     rules.Routing
	ProxyPort   int
	Provisioned bool
	StateFile   string
	Sysctls     map[string]string // absent keys left out
	Links       map[string]LinkHealth
	// PolicyRules are the policy rules by family (unix.AF_INET, AF_INET6);
	// LocalRoute says whether the routing's table has its local default
	// route in that family.
	PolicyRules map[int][]netlink.Rule
	LocalRoute  map[int]bool
	Tables      rules.TablesState
	// ControlSocket and DaemonAnswers: whether `ghostwire run` answered
	// on it (filled in by the caller, which knows the control protocol).
	ControlSocket string
	DaemonAnswers bool
	// Restored is what the running daemon's self-healing put back since
	// it started, by item (from the control socket).
	Restored  map[string]int
	Listeners []Listener
	// RPFilter is the effective IPv4 reverse-path filter on the bridge
	// (the higher of all's and the bridge's: 0 off, 1 strict, 2 loose);
	// BridgeRoutes whether any IPv4 route goes out the bridge;
	// IPv6Disabled whether the bridge has IPv6 turned off.
	RPFilter     int
	BridgeRoutes bool
	IPv6Disabled bool
	// Foreign are other tables' chains that run before ghostwire's hooks
	// and can drop.
	Foreign []ForeignChain
	// Reach is the routing towards each side; RouterAdverts how many
	// router advertisements the bridge has sent (-1: unknown).
	Reach         []Reach
	RouterAdverts int
	// Invisible: bridge.invisible is on; Speaking is what would make the
	// box send frames of its own (the bridge's settings, the ports' IPv6,
	// the quiet table's drift); Silenced how many frames the quiet table
	// dropped since it was installed.
	Invisible bool
	Speaking  []string
	Silenced  uint64
}

// CheckFacts reads what the checks need; it changes nothing.
func (b *Box) CheckFacts(d *Desired, stateFile string, proxyPort int) (CheckFacts, error) {
	cf := CheckFacts{
		Bridge:      d.Bridge.Name,
		Ports:       d.Bridge.Ports,
		Routing:     d.Routing,
		ProxyPort:   proxyPort,
		StateFile:   stateFile,
		Sysctls:     map[string]string{},
		Links:       map[string]LinkHealth{},
		PolicyRules: map[int][]netlink.Rule{},
		LocalRoute:  map[int]bool{},
	}
	st, err := loadState(stateFile)
	if err != nil {
		return cf, err
	}
	cf.Provisioned = st != nil
	for _, sc := range bridge.Sysctls(d.Bridge) {
		v, err := b.Sysctl.Get(sc.Key)
		if bridge.IsNotExist(err) {
			continue
		} else if err != nil {
			return cf, err
		}
		cf.Sysctls[sc.Key] = v
	}
	for _, name := range append([]string{d.Bridge.Name}, d.Bridge.Ports...) {
		l, err := b.Netlink.LinkByName(name)
		if err != nil {
			var nf netlink.LinkNotFoundError
			if ok := asLinkNotFound(err, &nf); ok {
				continue
			}
			return cf, fmt.Errorf("looking up link %s: %w", name, err)
		}
		a := l.Attrs()
		h := LinkHealth{Kind: l.Type(), Up: a.Flags&net.FlagUp != 0, Carrier: a.RawFlags&unix.IFF_LOWER_UP != 0, MTU: a.MTU}
		if a.MasterIndex != 0 {
			if m, err := b.Netlink.LinkByIndex(a.MasterIndex); err == nil {
				h.Master = m.Attrs().Name
			}
		}
		cf.Links[name] = h
	}
	lo, err := b.Netlink.LinkByName("lo")
	if err != nil {
		return cf, fmt.Errorf("looking up lo: %w", err)
	}
	for _, fam := range []int{unix.AF_INET, unix.AF_INET6} {
		rs, err := bridge.RetryDump(func() ([]netlink.Rule, error) { return b.Netlink.RuleList(fam) })
		if err != nil {
			return cf, fmt.Errorf("listing policy rules: %w", err)
		}
		cf.PolicyRules[fam] = rs
		routes, err := bridge.RetryDump(func() ([]netlink.Route, error) {
			return b.Netlink.RouteListFiltered(fam, &netlink.Route{Table: d.Routing.Table}, netlink.RT_FILTER_TABLE)
		})
		if err != nil {
			return cf, fmt.Errorf("listing routes of table %d: %w", d.Routing.Table, err)
		}
		cf.LocalRoute[fam] = slices.ContainsFunc(routes, func(x netlink.Route) bool {
			isDefault := x.Dst == nil
			if x.Dst != nil {
				ones, _ := x.Dst.Mask.Size()
				isDefault = ones == 0 && x.Dst.IP.IsUnspecified()
			}
			return x.Type == unix.RTN_LOCAL && x.LinkIndex == lo.Attrs().Index && isDefault
		})
	}
	cf.RPFilter, cf.BridgeRoutes, cf.IPv6Disabled = b.rpAndIPv6(d.Bridge.Name)
	if cf.Reach, err = b.readReach(d); err != nil {
		return cf, err
	}
	cf.RouterAdverts = readRouterAdverts(d.Bridge.Name)
	if err := b.readSilence(d, &cf); err != nil {
		return cf, err
	}
	if cf.Foreign, err = foreignChains(b.NFT, d.Tables); err != nil {
		return cf, err
	}
	if cf.Tables, err = rules.Tables(b.NFT, d.Tables); err != nil {
		return cf, fmt.Errorf("reading nftables state: %w", err)
	}
	if cf.Listeners, err = tcpListeners(proxyPort); err != nil {
		return cf, err
	}
	return cf, nil
}

func asLinkNotFound(err error, nf *netlink.LinkNotFoundError) bool {
	if e, ok := err.(netlink.LinkNotFoundError); ok {
		*nf = e
		return true
	}
	return false
}

// tcpListeners lists the TCP sockets listening on port in this network
// namespace (/proc/net/tcp and tcp6), with the process holding each.
func tcpListeners(port int) ([]Listener, error) {
	inodes := map[string]*Listener{}
	var out []*Listener
	for _, f := range []string{"/proc/net/tcp", "/proc/net/tcp6"} {
		fh, err := os.Open(f)
		if os.IsNotExist(err) {
			continue
		} else if err != nil {
			return nil, err
		}
		sc := bufio.NewScanner(fh)
		sc.Scan() // header
		for sc.Scan() {
			fs := strings.Fields(sc.Text())
			if len(fs) < 10 || fs[3] != "0A" { // TCP_LISTEN
				continue
			}
			hexAddr, hexPort, ok := strings.Cut(fs[1], ":")
			p, err := strconv.ParseUint(hexPort, 16, 16)
			if !ok || err != nil || int(p) != port {
				continue
			}
			l := &Listener{Addr: net.JoinHostPort(procAddr(hexAddr), strconv.Itoa(port))}
			inodes[fs[9]] = l
			out = append(out, l)
		}
		fh.Close()
	}
	if len(out) > 0 {
		findHolders(inodes)
	}
	res := make([]Listener, len(out))
	for i, l := range out {
		res[i] = *l
	}
	return res, nil
}

// procAddr decodes /proc/net/tcp's hex address (host byte order words).
func procAddr(h string) string {
	b := make([]byte, len(h)/2)
	for i := range b {
		v, _ := strconv.ParseUint(h[2*i:2*i+2], 16, 8)
		b[i] = byte(v)
	}
	for i := 0; i+4 <= len(b); i += 4 { // each 32-bit word is little-endian
		b[i], b[i+1], b[i+2], b[i+3] = b[i+3], b[i+2], b[i+1], b[i]
	}
	return net.IP(b).String()
}

// findHolders fills in the process holding each socket inode.
func findHolders(inodes map[string]*Listener) {
	fds, _ := filepath.Glob("/proc/[0-9]*/fd/*")
	for _, fd := range fds {
		target, err := os.Readlink(fd)
		if err != nil || !strings.HasPrefix(target, "socket:[") {
			continue
		}
		l, ok := inodes[strings.TrimSuffix(strings.TrimPrefix(target, "socket:["), "]")]
		if !ok || l.PID != 0 {
			continue
		}
		pidDir := filepath.Dir(filepath.Dir(fd))
		l.PID, _ = strconv.Atoi(filepath.Base(pidDir))
		comm, _ := os.ReadFile(filepath.Join(pidDir, "comm"))
		l.Process = strings.TrimSpace(string(comm))
	}
}

func checkProvisioned(f CheckFacts) []Result {
	if !f.Provisioned {
		return []Result{{Level: Fail, Found: fmt.Sprintf("not provisioned (no state file %s)", f.StateFile), Fix: "ghostwire apply"}}
	}
	return []Result{{Found: "provisioned (state file " + f.StateFile + ")"}}
}

func checkBridgeNF(f CheckFacts) []Result {
	var out []Result
	present := false
	for _, key := range []string{"net.bridge.bridge-nf-call-iptables", "net.bridge.bridge-nf-call-ip6tables"} {
		v, ok := f.Sysctls[key]
		if !ok {
			continue
		}
		present = true
		if v != "0" {
			out = append(out, Result{Level: Fail,
				Found: fmt.Sprintf("%s = %s: bridged frames go through iptables, the diversion does not work", key, v),
				Fix:   fmt.Sprintf("sysctl -w %s=0 (and persist via ghostwire apply)", key)})
		}
	}
	if len(out) > 0 {
		return out
	}
	if !present {
		return []Result{{Found: "br_netfilter not loaded: bridged frames skip the IP hooks"}}
	}
	return []Result{{Found: "bridge-nf-call-iptables and -ip6tables are 0"}}
}

func checkLinks(f CheckFacts) []Result {
	var out []Result
	br, ok := f.Links[f.Bridge]
	switch {
	case !ok:
		out = append(out, Result{Level: Fail, Found: fmt.Sprintf("bridge %s is missing", f.Bridge), Fix: "ghostwire apply"})
	case br.Kind != "bridge":
		out = append(out, Result{Level: Fail, Found: fmt.Sprintf("%s is a %s, not a bridge", f.Bridge, br.Kind), Fix: "ghostwire apply"})
	case !br.Up:
		out = append(out, Result{Level: Fail, Found: fmt.Sprintf("bridge %s is down", f.Bridge), Fix: "ip link set dev " + f.Bridge + " up"})
	}
	var present []string
	for _, p := range f.Ports {
		l, ok := f.Links[p]
		if !ok {
			out = append(out, Result{Level: Fail, Found: fmt.Sprintf("port %s does not exist", p), Fix: "bridge.client_nic / bridge.server_nic"})
			continue
		}
		present = append(present, p)
		if l.Master != f.Bridge {
			out = append(out, Result{Level: Fail, Found: fmt.Sprintf("port %s is not enslaved to %s", p, f.Bridge), Fix: "ghostwire apply"})
		}
		if !l.Up {
			out = append(out, Result{Level: Fail, Found: fmt.Sprintf("port %s is down", p), Fix: "ip link set dev " + p + " up"})
		} else if !l.Carrier {
			out = append(out, Result{Level: Fail, Found: fmt.Sprintf("port %s has no carrier (cable or peer down)", p), Fix: "connect " + p + " and bring its peer up"})
		}
	}
	if len(present) == 2 {
		a, b := f.Links[present[0]], f.Links[present[1]]
		if a.MTU != b.MTU {
			hi, lo := present[0], b.MTU
			if b.MTU > a.MTU {
				hi, lo = present[1], a.MTU
			}
			out = append(out, Result{Level: Fail,
				Found: fmt.Sprintf("MTU differs between ports: %s %d, %s %d", present[0], a.MTU, present[1], b.MTU),
				Fix:   fmt.Sprintf("ip link set dev %s mtu %d", hi, lo)})
		}
	}
	if len(out) == 0 {
		out = append(out, Result{Found: fmt.Sprintf("bridge %s up; ports %s up, enslaved, carrier, same MTU", f.Bridge, strings.Join(f.Ports, ", "))})
	}
	return out
}

func famName(fam int) string {
	if fam == unix.AF_INET6 {
		return "IPv6"
	}
	return "IPv4"
}

func checkRouting(f CheckFacts) []Result {
	var out []Result
	r := f.Routing
	fix := fmt.Sprintf("ghostwire apply (or another routing.priority than %d)", r.Priority)
	for _, fam := range []int{unix.AF_INET, unix.AF_INET6} {
		own := false
		for _, x := range f.PolicyRules[fam] {
			if x.Priority == r.Priority && x.Mark == r.Mark && x.Table == r.Table {
				own = true
			}
		}
		if !own {
			out = append(out, Result{Level: Fail, Found: fmt.Sprintf("%s policy rule fwmark %#x lookup %d pref %d missing", famName(fam), r.Mark, r.Table, r.Priority), Fix: "ghostwire apply"})
		} else if sh, ok := shadowing(f.PolicyRules[fam], r, f.Bridge); ok {
			out = append(out, Result{Level: Fail, Found: fmt.Sprintf("%s policy rule %q at pref %d shadows ghostwire's fwmark rule at pref %d", famName(fam), describeRule(sh), sh.Priority, r.Priority), Fix: fix})
		}
		if !f.LocalRoute[fam] {
			out = append(out, Result{Level: Fail, Found: fmt.Sprintf("%s local default route in table %d missing", famName(fam), r.Table), Fix: "ghostwire apply"})
		}
	}
	if len(out) == 0 {
		out = append(out, Result{Found: fmt.Sprintf("fwmark %#x lookup %d pref %d and local routes in place (IPv4, IPv6), not shadowed", r.Mark, r.Table, r.Priority)})
	}
	return out
}

// shadowing finds a rule before ghostwire's (lower priority number) that
// matches every marked packet the bridge diverts and ends the lookup
// elsewhere. The kernel's local rule (table 255: only local addresses) and
// rules with a selector that marked packets may miss are not counted.
func shadowing(rs []netlink.Rule, r rules.Routing, bridgeName string) (netlink.Rule, bool) {
	for _, x := range rs {
		if x.Priority >= r.Priority || x.Table == unix.RT_TABLE_LOCAL || x.Table == r.Table {
			continue
		}
		if x.Goto > 0 || x.Invert || x.Tos != 0 || x.TunID != 0 || x.Flow > 0 || x.OifName != "" ||
			x.Dport != nil || x.Sport != nil || x.IPProto != 0 || x.UIDRange != nil ||
			x.SuppressPrefixlen >= 0 || x.SuppressIfgroup >= 0 || !anyNet(x.Src) || !anyNet(x.Dst) ||
			(x.IifName != "" && x.IifName != bridgeName) {
			continue
		}
		mask := uint32(0xffffffff)
		if x.Mask != nil {
			mask = *x.Mask
		}
		if (x.Mark != 0 || x.Mask != nil) && r.Mark&mask != x.Mark {
			continue
		}
		return x, true
	}
	return netlink.Rule{}, false
}

func anyNet(n *net.IPNet) bool {
	if n == nil {
		return true
	}
	ones, _ := n.Mask.Size()
	return ones == 0
}

func describeRule(x netlink.Rule) string {
	s := "from all"
	if x.IifName != "" {
		s += " iif " + x.IifName
	}
	if x.Mark != 0 {
		s += fmt.Sprintf(" fwmark %#x", x.Mark)
	}
	switch x.Type {
	case unix.RTN_BLACKHOLE:
		return s + " blackhole"
	case unix.RTN_UNREACHABLE:
		return s + " unreachable"
	case unix.RTN_PROHIBIT:
		return s + " prohibit"
	}
	switch x.Table {
	case unix.RT_TABLE_MAIN:
		return s + " lookup main"
	case unix.RT_TABLE_DEFAULT:
		return s + " lookup default"
	}
	return fmt.Sprintf("%s lookup %d", s, x.Table)
}

func checkProxy(f CheckFacts) []Result {
	ts := f.Tables
	switch {
	case ts.Owned && f.DaemonAnswers:
		found := fmt.Sprintf("proxy running: owns the diversion (netlink port %d), answers on %s", ts.OwnerPortID, f.ControlSocket)
		if len(f.Restored) == 0 {
			return []Result{{Found: found}}
		}
		// Something keeps removing what the box relies on: the daemon
		// heals it, but the operator should find out what.
		var items []string
		for _, what := range slices.Sorted(maps.Keys(f.Restored)) {
			items = append(items, fmt.Sprintf("%s (%d×)", what, f.Restored[what]))
		}
		return []Result{{Level: Warn, Found: found + "; restored since it started: " + strings.Join(items, ", "),
			Fix: "find what removes them (a network manager: e.g. systemd-networkd's ManageForeignRoutingPolicyRules=no)"}}
	case ts.Owned:
		return []Result{{Level: Warn, Found: fmt.Sprintf("the diversion is owned (netlink port %d) but nothing answers on control socket %s", ts.OwnerPortID, f.ControlSocket), Fix: "control_socket"}}
	case f.DaemonAnswers:
		return []Result{{Level: Fail, Found: fmt.Sprintf("ghostwire run answers on %s but owns no diversion tables: it is not intercepting", f.ControlSocket), Fix: "systemctl restart ghostwire"}}
	case ts.Bridge || ts.Inet:
		return []Result{{Level: Warn, Found: "proxy not running: apply's static diversion routes diverted traffic through the box", Fix: "systemctl start ghostwire"}}
	}
	return []Result{{Level: Warn, Found: "proxy not running: traffic is bridged untouched", Fix: "systemctl start ghostwire"}}
}

func checkProxyPort(f CheckFacts) []Result {
	if len(f.Listeners) == 0 || f.Tables.Owned {
		if f.Tables.Owned {
			return []Result{{Found: fmt.Sprintf("proxy.tcp_port %d held by the running proxy", f.ProxyPort)}}
		}
		return []Result{{Found: fmt.Sprintf("proxy.tcp_port %d free for the proxy", f.ProxyPort)}}
	}
	var who []string
	for _, l := range f.Listeners {
		who = append(who, l.String())
	}
	return []Result{{Level: Fail,
		Found: fmt.Sprintf("proxy.tcp_port %d taken by another process while the proxy is down: %s", f.ProxyPort, strings.Join(who, ", ")),
		Fix:   fmt.Sprintf("stop the process listening on %d, or set proxy.tcp_port", f.ProxyPort)}}
}

// rpAndIPv6 reads what checkRPFilter and checkIPv6 need; what cannot be
// read counts as fine (the other checks say why the bridge is missing).
func (b *Box) rpAndIPv6(br string) (rp int, routes, v6off bool) {
	for _, key := range []string{"net.ipv4.conf.all.rp_filter", "net.ipv4.conf." + br + ".rp_filter"} {
		if v, err := b.Sysctl.Get(key); err == nil {
			if n, err := strconv.Atoi(strings.TrimSpace(v)); err == nil {
				rp = max(rp, n)
			}
		}
	}
	if v, err := b.Sysctl.Get("net.ipv6.conf." + br + ".disable_ipv6"); err == nil {
		v6off = strings.TrimSpace(v) == "1"
	}
	l, err := b.Netlink.LinkByName(br)
	if err != nil {
		return rp, true, v6off
	}
	via, err := routesVia(b.Netlink, l, unix.AF_INET)
	return rp, err != nil || via, v6off
}

// checkRPFilter: strict reverse-path filtering drops a diverted packet
// whose source the box would not route back out the bridge; with no
// route via the bridge at all, that is every one.
func checkRPFilter(f CheckFacts) []Result {
	if f.RPFilter != 1 {
		return []Result{{Found: fmt.Sprintf("rp_filter on %s is %s", f.Bridge, map[int]string{0: "off", 2: "loose"}[f.RPFilter])}}
	}
	if f.BridgeRoutes {
		return []Result{{Found: fmt.Sprintf("rp_filter strict on %s, with routes via it", f.Bridge)}}
	}
	return []Result{{Level: Fail,
		Found: fmt.Sprintf("rp_filter is strict (1) on %s or all and the box has no IPv4 route via %s: reverse-path filtering drops every diverted packet", f.Bridge, f.Bridge),
		Fix:   fmt.Sprintf("bridge.routes (give the box routes to both sides), or sysctl -w net.ipv4.conf.%s.rp_filter=2 and net.ipv4.conf.all.rp_filter=2", f.Bridge)}}
}

// checkIPv6: the diversion lifts IPv6 frames of intercepted flows to the
// bridge too; with IPv6 off there, they are dropped and those clients
// hang instead of being proxied or bridged.
func checkIPv6(f CheckFacts) []Result {
	if !f.IPv6Disabled {
		return []Result{{Found: fmt.Sprintf("IPv6 is enabled on %s", f.Bridge)}}
	}
	return []Result{{Level: Fail,
		Found: fmt.Sprintf("IPv6 is disabled on %s, but IPv6 flows to intercepted ports are lifted to it: they are dropped", f.Bridge),
		Fix:   fmt.Sprintf("sysctl -w net.ipv6.conf.%s.disable_ipv6=0", f.Bridge)}}
}
