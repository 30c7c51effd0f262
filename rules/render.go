package rules

import (
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/google/nftables"
)

// String renders both tables exactly as nft 1.0.6 lists them after Apply:
// the output of `nft list table bridge NAME` followed by that of `nft list
// table inet NAME` (each ends in "}\n"), which is also `nft list ruleset`
// when no other table exists. It doubles as ghostwire's dry-run output and
// parses back with `nft -f`. Owned tables (ApplyOwned) list with an extra
// "# progname" comment and a "flags owner" line that String does not print,
// and once traffic has put flows into the bridge table's bypass sets, nft
// lists them as an "elements = { ... }" line that String does not print
// either.
func (p *Plan) String() string {
	var b strings.Builder
	p.renderBridge(&b)
	p.renderInet(&b)
	return b.String()
}

func (p *Plan) renderBridge(b *strings.Builder) {
	c := &p.cfg
	fmt.Fprintf(b, "table bridge %s {\n", c.Name)
	renderSets(b, p.sets(nftables.TableFamilyBridge))
	fmt.Fprintf(b, "\tchain %s {\n", chainPrerouting)
	b.WriteString("\t\ttype filter hook prerouting priority dstnat; policy accept;\n")
	// Bypass first (see tableDefs). nft hides the `meta protocol ip` (ip6)
	// that guards the address loads, and shows `meta l4proto tcp` plus a
	// transport-header load as `tcp dport`.
	if p.overload == OverloadBypass {
		for _, f := range ipFamilies {
			fmt.Fprintf(b, "\t\tiifname %q tcp dport @%s %s add @%s { %s } accept\n",
				c.ClientPort, setName, pureSYN, f.set, f.flowKey(false))
		}
	}
	for _, f := range ipFamilies {
		fmt.Fprintf(b, "\t\tiifname %q %s @%s update @%s { %s } accept\n", c.ClientPort, f.flowKey(false), f.set, f.set, f.flowKey(false))
		fmt.Fprintf(b, "\t\tiifname %q %s @%s accept\n", c.ServerPort, f.flowKey(true), f.set)
	}
	for _, r := range []struct{ port, dir string }{{c.ClientPort, "dport"}, {c.ServerPort, "sport"}} {
		fmt.Fprintf(b, "\t\tiifname %q tcp %s @%s ether daddr set %s meta pkttype set host\n",
			r.port, r.dir, setName, c.BridgeMAC)
	}
	b.WriteString("\t}\n}\n")
}

// pureSYN is a SYN without ACK, FIN or RST: a new connection.
const pureSYN = "tcp flags syn / fin,syn,rst,ack"

// flowKey is the bypass sets' key as nft prints it: the flow as the client
// sends it, read from a client frame, or (reverse) from a server frame.
func (f ipFamily) flowKey(reverse bool) string {
	if reverse {
		return fmt.Sprintf("%[1]s daddr . %[1]s saddr . tcp dport . tcp sport", f.nft)
	}
	return fmt.Sprintf("%[1]s saddr . %[1]s daddr . tcp sport . tcp dport", f.nft)
}

func (p *Plan) renderInet(b *strings.Builder) {
	c := &p.cfg
	mark := fmt.Sprintf("0x%08x", c.Mark)
	fmt.Fprintf(b, "table inet %s {\n", c.Name)
	renderSets(b, p.sets(nftables.TableFamilyINet))
	fmt.Fprintf(b, "\tchain %s {\n", chainPrerouting)
	b.WriteString("\t\ttype filter hook prerouting priority mangle; policy accept;\n")
	b.WriteString("\t\tfib daddr type local accept\n")
	syn := fmt.Sprintf("iifname %q tcp dport @%s %s", c.Bridge, setName, pureSYN)
	switch {
	case p.draining:
		fmt.Fprintf(b, "\t\t%s accept\n", syn)
	case p.overload == OverloadRefuse:
		fmt.Fprintf(b, "\t\t%s reject with tcp reset\n", syn)
	default:
		// OverloadBypass too: SYNs it lets through never reach this table.
		fmt.Fprintf(b, "\t\t%s tproxy to :%d meta mark set %s accept\n", syn, c.ProxyTCPPort, mark)
	}
	fmt.Fprintf(b, "\t\tmeta l4proto tcp socket transparent 1 meta mark set %s accept\n", mark)
	b.WriteString("\t}\n\n")
	fmt.Fprintf(b, "\tchain %s {\n", chainInput)
	b.WriteString("\t\ttype filter hook input priority filter; policy accept;\n")
	fmt.Fprintf(b, "\t\ttcp dport %d fib daddr type local reject with tcp reset\n", c.ProxyTCPPort)
	b.WriteString("\t}\n}\n")
}

// renderSets prints a table's sets the way nft does, each followed by a
// blank line. A dynamic set is printed empty: once traffic has filled it, nft
// also lists its elements, which String never shows.
func renderSets(b *strings.Builder, sets []setSpec) {
	for _, s := range sets {
		fmt.Fprintf(b, "\tset %s {\n\t\ttype %s\n", s.name, s.keyType.Name)
		if s.dynamic {
			fmt.Fprintf(b, "\t\tsize %d\n\t\tflags dynamic,timeout\n\t\ttimeout %s\n", bypassSetSize, nftDuration(s.timeout))
		}
		renderPorts(b, s.ports)
		b.WriteString("\t}\n\n")
	}
}

// renderPorts prints a ports set's elements the way nft does: numerically
// sorted, five elements to a line, continuation lines indented by three tabs
// and five spaces (nft's calculate_delim for inet_service).
func renderPorts(b *strings.Builder, ports []uint16) {
	if len(ports) == 0 {
		return
	}
	b.WriteString("\t\telements = { ")
	for i, port := range ports {
		if i > 0 {
			if i%5 == 0 {
				b.WriteString(",\n\t\t\t     ")
			} else {
				b.WriteString(", ")
			}
		}
		b.WriteString(strconv.Itoa(int(port)))
	}
	b.WriteString(" }\n")
}

// nftDuration prints d as nft's time_print does: days, hours, minutes,
// seconds and milliseconds, each only if non-zero ("5m", "1h30m45s", "2d1s").
func nftDuration(d time.Duration) string {
	ms := d.Milliseconds()
	var b strings.Builder
	for _, u := range []struct {
		ms   int64
		unit string
	}{{86400000, "d"}, {3600000, "h"}, {60000, "m"}, {1000, "s"}, {1, "ms"}} {
		if n := ms / u.ms; n > 0 {
			fmt.Fprintf(&b, "%d%s", n, u.unit)
		}
		ms %= u.ms
	}
	if b.Len() == 0 {
		return "0ms"
	}
	return b.String()
}
