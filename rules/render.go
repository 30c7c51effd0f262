package rules

import (
	"fmt"
	"strconv"
	"strings"
)

// String renders both tables exactly as nft 1.0.6 lists them after Apply:
// the output of `nft list table bridge NAME` followed by that of `nft list
// table inet NAME` (each ends in "}\n"), which is also `nft list ruleset`
// when no other table exists. It doubles as ghostwire's dry-run output and
// parses back with `nft -f`. Owned tables (ApplyOwned) list with an extra
// "# progname" comment and a "flags owner" line that String does not print.
func (p *Plan) String() string {
	var b strings.Builder
	p.renderBridge(&b)
	p.renderInet(&b)
	return b.String()
}

func (p *Plan) renderBridge(b *strings.Builder) {
	c := &p.cfg
	fmt.Fprintf(b, "table bridge %s {\n", c.Name)
	renderSet(b, p.redirectPorts())
	b.WriteString("\n")
	fmt.Fprintf(b, "\tchain %s {\n", chainPrerouting)
	b.WriteString("\t\ttype filter hook prerouting priority dstnat; policy accept;\n")
	// nft shows our `meta l4proto tcp` + transport-header load as `tcp dport`.
	for _, r := range []struct{ port, dir string }{{c.ClientPort, "dport"}, {c.ServerPort, "sport"}} {
		fmt.Fprintf(b, "\t\tiifname %q tcp %s @%s ether daddr set %s meta pkttype set host\n",
			r.port, r.dir, setName, c.BridgeMAC)
	}
	b.WriteString("\t}\n}\n")
}

func (p *Plan) renderInet(b *strings.Builder) {
	c := &p.cfg
	mark := fmt.Sprintf("0x%08x", c.Mark)
	fmt.Fprintf(b, "table inet %s {\n", c.Name)
	renderSet(b, c.TCPPorts)
	b.WriteString("\n")
	fmt.Fprintf(b, "\tchain %s {\n", chainPrerouting)
	b.WriteString("\t\ttype filter hook prerouting priority mangle; policy accept;\n")
	b.WriteString("\t\tfib daddr type local accept\n")
	syn := fmt.Sprintf("iifname %q tcp dport @%s tcp flags syn / fin,syn,rst,ack", c.Bridge, setName)
	if p.draining {
		fmt.Fprintf(b, "\t\t%s accept\n", syn)
	} else {
		fmt.Fprintf(b, "\t\t%s tproxy to :%d meta mark set %s accept\n", syn, c.ProxyTCPPort, mark)
	}
	fmt.Fprintf(b, "\t\tmeta l4proto tcp socket transparent 1 meta mark set %s accept\n", mark)
	b.WriteString("\t}\n\n")
	fmt.Fprintf(b, "\tchain %s {\n", chainInput)
	b.WriteString("\t\ttype filter hook input priority filter; policy accept;\n")
	fmt.Fprintf(b, "\t\ttcp dport %d fib daddr type local reject with tcp reset\n", c.ProxyTCPPort)
	b.WriteString("\t}\n}\n")
}

// renderSet prints the ports set the way nft does: numerically sorted, five
// elements to a line, continuation lines indented by three tabs and five
// spaces (nft's calculate_delim for inet_service).
func renderSet(b *strings.Builder, ports []uint16) {
	fmt.Fprintf(b, "\tset %s {\n\t\ttype inet_service\n", setName)
	if len(ports) > 0 {
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
	b.WriteString("\t}\n")
}
