package main

import (
	"fmt"
	"io"
	"strings"

	"github.com/google/nftables"

	"github.com/ghostwire/ghostwire/appliance"
	"github.com/ghostwire/ghostwire/provision"
	"github.com/ghostwire/ghostwire/proxy"
	"github.com/ghostwire/ghostwire/rules"
)

// statusExit is the exit status for mode (see the status command's
// description): nil while intercepting.
func statusExit(mode provision.Mode) error {
	switch mode {
	case provision.Intercepting:
		return nil
	case provision.NotProvisioned:
		return exitCode(4)
	}
	return exitCode(3)
}

// printProxyStatus adds what the running proxy says of itself to the
// text status; nothing when no `ghostwire run` answers (the status above
// already says whether the diversion is owned).
func printProxyStatus(w io.Writer, cfg *appliance.Config) {
	r, err := appliance.Control(cfg.ControlSocket, appliance.ControlRequest{Cmd: "stats"})
	if err != nil || !r.OK || r.Stats == nil {
		return
	}
	fmt.Fprint(w, proxyStatus(*r.Stats))
	fmt.Fprint(w, ruleStatus(ruleCounters()))
}

// ruleCounters reads the diversion rules' own counters (nil if there are
// no tables or they cannot be read: status says so above). A netlink
// socket of its own: reading the proxy's owned tables is allowed.
func ruleCounters() []rules.RuleCounter {
	c, err := nftables.New()
	if err != nil {
		return nil
	}
	rc, err := appliance.RuleCounters(c)
	if err != nil {
		return nil
	}
	return rc
}

// ruleStatus lists the rules that matched anything since they were
// installed: what the diversion is doing, by rule.
func ruleStatus(rc []rules.RuleCounter) string {
	var b strings.Builder
	for _, r := range rc {
		if r.Packets == 0 {
			continue
		}
		if b.Len() == 0 {
			b.WriteString("rules that matched (packets, bytes):\n")
		}
		fmt.Fprintf(&b, "  %-6s %-28s %10d %10s\n", r.Table, r.Rule, r.Packets, size(r.Bytes))
	}
	return b.String()
}

// proxyStatus is the running proxy's counters as status lines.
func proxyStatus(st proxy.Stats) string {
	var b strings.Builder
	fmt.Fprintf(&b, "proxy: %d connections open, %d udp sessions\n", st.Active, st.UDPSessions)
	fmt.Fprintf(&b, "since start: %d connections accepted, %d udp sessions, %s up, %s down", st.Accepted, st.UDPSessionsTotal, size(st.BytesUp), size(st.BytesDown))
	if st.DialFailed > 0 {
		fmt.Fprintf(&b, ", %d dials failed", st.DialFailed)
	}
	if st.PortFallbacks > 0 {
		fmt.Fprintf(&b, ", %d client ports not kept", st.PortFallbacks)
	}
	if st.PolicyDenied > 0 {
		fmt.Fprintf(&b, ", %d denied by name", st.PolicyDenied)
	}
	if st.OverloadRefused > 0 {
		fmt.Fprintf(&b, ", %d refused in overload", st.OverloadRefused)
	}
	b.WriteString("\n")
	for _, side := range []struct {
		name string
		top  []proxy.Talker
	}{{"clients", st.TopClients}, {"servers", st.TopServers}} {
		if len(side.top) == 0 {
			continue
		}
		parts := make([]string, len(side.top))
		for i, t := range side.top {
			parts[i] = fmt.Sprintf("%s (%s)", t.Addr, size(t.Bytes))
		}
		fmt.Fprintf(&b, "busiest %s: %s\n", side.name, strings.Join(parts, ", "))
	}
	return b.String()
}

// size is n bytes for a person: 1.5 MiB.
func size(n uint64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	div, exp := uint64(unit), 0
	for m := n / unit; m >= unit; m /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f %ciB", float64(n)/float64(div), "KMGTPE"[exp])
}
