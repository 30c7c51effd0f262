package rules

import (
	"fmt"
	"strconv"
	"strings"
	"time"
)

// String renders the plan's tables exactly as nft 1.0.6 lists them after
// Apply: the output of `nft list table bridge NAME` followed by that of
// `nft list table inet NAME` and, invisible, `nft list table netdev NAME`
// (each ends in "}\n"), which is also `nft list ruleset` when no other
// table exists. It doubles as ghostwire's dry-run output and
// parses back with `nft -f`. Owned tables (ApplyOwned) list with an extra
// "# progname" comment and a "flags owner" line that String does not print,
// and once traffic has put flows into the bridge table's flow sets (bypass,
// udpflows) and hosts into the netdev table's neighbour maps, nft lists
// them as an "elements = { ... }" line that String does not print either.
func (p *Plan) String() string {
	var b strings.Builder
	for _, t := range p.tables {
		t.render(&b, p.cfg.Name)
	}
	return b.String()
}

// render prints the table, called name, as nft lists it: sets first, each
// followed by a blank line, then the chains, separated by blank lines.
func (t table) render(b *strings.Builder, name string) {
	fmt.Fprintf(b, "table %s %s {\n", familyName(t.family), name)
	renderSets(b, t.sets)
	for i, ch := range t.chains {
		if i > 0 {
			b.WriteString("\n")
		}
		fmt.Fprintf(b, "\tchain %s {\n", ch.name)
		device := ""
		if ch.device != "" {
			device = fmt.Sprintf(" device %q", ch.device)
		}
		fmt.Fprintf(b, "\t\ttype filter hook %s%s priority %s; policy accept;\n", ch.hook.name, device, ch.prio.name)
		for _, r := range ch.rules {
			fmt.Fprintf(b, "\t\t%s\n", r)
		}
		b.WriteString("\t}\n")
	}
	b.WriteString("}\n")
}

// renderSets prints a table's sets (and maps) the way nft does, each
// followed by a blank line. A dynamic set or map is printed empty: once
// traffic has filled it, nft also lists its elements, which String never
// shows.
func renderSets(b *strings.Builder, sets []setSpec) {
	for _, s := range sets {
		fmt.Fprintf(b, "\t%s %s {\n\t\ttype %s\n", s.kind(), s.name, s.typeName())
		if s.dynamic {
			fmt.Fprintf(b, "\t\tsize %d\n\t\tflags dynamic,timeout\n\t\ttimeout %s\n", s.size(), nftDuration(s.timeout))
		}
		if s.live {
			b.WriteString("\t\tflags interval,timeout\n")
		} else if s.interval {
			b.WriteString("\t\tflags interval\n")
			renderPrefixes(b, s.prefixes)
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
