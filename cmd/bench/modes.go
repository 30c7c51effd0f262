package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"time"

	"github.com/ghostwire/ghostwire/lab"
)

// How the modes share one lab. The box is provisioned only by the ghostwire
// binary, driven through lab.Appliance (the harness of the end-to-end tests
// and the demo), with one config for the whole run:
//
//   - plain: `ghostwire teardown`, then lab.PlainBridge: the same two ports
//     bridged under the same name with bridge-nf-call-* = 0 and nothing
//     else. Frames are only bridged: the physical limit of this machine.
//   - divert: `ghostwire apply` and nothing listening on the proxy port.
//     The static diversion still lifts intercepted frames to the box's IP
//     stack, where `tproxy to :PORT` finds no socket: nft_tproxy then ends
//     the rule without its verdict (NFT_BREAK), so no mark is set, the
//     socket rule finds no transparent socket either, and the packet is
//     routed by the main table (apply turns ip_forward on) out of the
//     bridge towards its destination, TTL-1, the box's MAC as source:
//     `ghostwire status` calls this "diverting without ghostwire proxy".
//     It is what fail-open costs, and the ceiling of any proxy on this
//     path. checkPath proves it: a connection works, the box holds no
//     socket of it, and the box's IP forwarding counter moved.
//   - ghostwire: `ghostwire apply` (bridge, sysctls, policy routing, static
//     diversion; idempotent), then `ghostwire run`, which replaces the
//     diversion with tables it owns; when it stops the kernel deletes them.
//   - ghostwire-invisible (issue 15): the same with a second config: the
//     first one with bridge.invisible: true and, as an invisible box
//     should have, no address on br0, only routes to the lab's subnets. apply
//     refuses to switch bridge.invisible on a provisioned box, so entering
//     this mode tears down first, and so does leaving it for any mode that
//     applies the visible config. The lab's box ports come up with IPv6
//     off (lab.WithSilentPorts), as an invisible box's OS must have them;
//     the other modes bridge or divert the same either way (only br0's
//     IPv6 carries diverted flows). checkPath proves the mode by the
//     owned netdev table's rewrite counters.
//   - haproxy, haproxy-splice: `ghostwire apply` (the static diversion),
//     then HAProxy listens transparently on the proxy port, so it gets
//     exactly the flows the ghostwire proxy would.
//
// UDP (5201/udp intercepted) runs in plain, divert and ghostwire only:
// HAProxy has no transparent UDP proxy. checkUDPPath proves those modes
// for UDP as checkPath does for TCP.

// gwExtraYAML is appended to lab.Appliance's config: the proxy logs only
// warnings, so that per-connection log lines do not cost it CPU.
const gwExtraYAML = "log:\n  level: warn\n"

// provision writes the ghostwire config and applies it once, proving the
// binary can provision this box before anything is measured.
//
// Both proxies get the same connection limit, room for the memory
// workload's connections: ghostwire's default (a third of the fd limit)
// is below them. lab.Appliance writes the proxy section itself, so the
// limit goes in by ghostwire's environment override of the config key,
// which every ghostwire command the bench runs inherits.
//
// The UDP session limit goes in the same way (udp-rss's sessions and a
// few hundred), and the UDP keys into lab.Appliance's config file: it
// intercepts 5201/udp (intercept.udp_ports) on proxy.udp_port 9877.
func (b *bench) provision(ctx context.Context) error {
	if err := os.Setenv("GHOSTWIRE_PROXY_MAX_CONNECTIONS", fmt.Sprint(b.maxConns())); err != nil {
		return err
	}
	if err := os.Setenv("GHOSTWIRE_PROXY_MAX_UDP_SESSIONS", fmt.Sprint(b.maxUDPSessions())); err != nil {
		return err
	}
	gw, err := lab.NewAppliance(b.lab, b.o.ghostwire, b.dir, []int{httpPort, iperfPort}, gwExtraYAML)
	if err != nil {
		return fmt.Errorf("writing the ghostwire config: %w", err)
	}
	b.gw = gw
	cfg, err := os.ReadFile(gw.Config)
	if err != nil {
		return err
	}
	withUDP, err := setYAMLKeys(string(cfg), []yamlKey{
		{"intercept", "udp_ports", fmt.Sprintf("[%d]", udpPort), "tcp_ports"},
		{"proxy", "udp_port", fmt.Sprint(udpProxyPort), "tcp_port"},
	})
	if err != nil {
		return fmt.Errorf("adding the UDP keys to %s: %w", gw.Config, err)
	}
	if err := os.WriteFile(gw.Config, []byte(withUDP), 0o644); err != nil {
		return err
	}
	b.visibleCfg = gw.Config
	invisible, err := setYAMLKeys(withUDP, invisibleKeys(b.lab.Subnet4.String(), b.lab.Subnet6.String()))
	if err != nil {
		return fmt.Errorf("writing the invisible config from %s: %w", gw.Config, err)
	}
	if b.invisibleCfg, err = writeFile(b.dir, "ghostwire-invisible.yaml", invisible); err != nil {
		return fmt.Errorf("writing the invisible config: %w", err)
	}
	return b.apply(ctx, false)
}

// invisibleKeys turn the visible config into the invisible mode's (issue
// 15): no address on br0, which would have the box answer for it on the
// wire, but routes to the lab's subnets so the proxy can reach both sides;
// bridge.invisible on. The state file, control socket and everything else
// stay the same, so teardown with either config undoes what the other
// applied.
func invisibleKeys(subnet4, subnet6 string) []yamlKey {
	return []yamlKey{
		{"bridge", "addresses", "[]", "server_nic"},
		{"bridge", "routes", fmt.Sprintf("[%q, %q]", subnet4, subnet6), "addresses"},
		{"bridge", "invisible", "true", "routes"},
	}
}

// yamlKey is one key to set in a two-level YAML config: section.key =
// value, on a line of its own after the line of section.after if absent.
type yamlKey struct{ section, key, value, after string }

// setYAMLKeys sets keys in a config written like lab.Appliance's (top-level
// sections, two-space indented keys, one per line): it replaces a key's
// line or inserts one after its section's `after` key.
func setYAMLKeys(cfg string, keys []yamlKey) (string, error) {
	lines := strings.Split(cfg, "\n")
	for _, k := range keys {
		section, at, anchor := "", -1, -1
		for i, l := range lines {
			if l != "" && !strings.HasPrefix(l, " ") && !strings.HasPrefix(l, "#") {
				section, _, _ = strings.Cut(l, ":")
				continue
			}
			if section != k.section {
				continue
			}
			switch {
			case strings.HasPrefix(l, "  "+k.key+":"):
				at = i
			case strings.HasPrefix(l, "  "+k.after+":"):
				anchor = i
			}
		}
		line := fmt.Sprintf("  %s: %s", k.key, k.value)
		switch {
		case at >= 0:
			lines[at] = line
		case anchor >= 0:
			lines = append(lines[:anchor+1], append([]string{line}, lines[anchor+1:]...)...)
		default:
			return "", fmt.Errorf("no %s.%s line to put %s.%s after", k.section, k.after, k.section, k.key)
		}
	}
	return strings.Join(lines, "\n"), nil
}

// apply is `ghostwire apply`: the bridge, sysctls, policy routing and the
// static diversion, with the invisible config or the visible one. apply
// refuses to switch bridge.invisible on a provisioned box, so a box
// applied the other way is torn down first.
func (b *bench) apply(ctx context.Context, invisible bool) error {
	if b.applied && b.appliedInvisible != invisible {
		if err := b.teardown(); err != nil {
			return fmt.Errorf("tearing down to switch bridge.invisible to %v: %w", invisible, err)
		}
	}
	// An invisible apply refuses a bridge ghostwire did not make (teardown
	// could not give back what it changes): the plain mode's, which a
	// visible apply adopts and its teardown leaves, goes first.
	if invisible && b.plainBridge && !b.applied {
		if err := b.lab.DeleteBridge(b.gw.Bridge); err != nil {
			return fmt.Errorf("deleting the plain mode's bridge before the invisible apply: %w", err)
		}
		b.plainBridge = false
	}
	// teardown runs with the config last applied: it stays until here.
	b.gw.Config = b.visibleCfg
	if invisible {
		b.gw.Config = b.invisibleCfg
	}
	// teardown is safe even if apply failed half way
	b.applied, b.appliedInvisible = true, invisible
	if _, err := b.gw.Ghostwire("apply"); err != nil {
		return err
	}
	return b.expectStatus(ctx, "ghostwire: diverting", 5*time.Second)
}

// teardown is `ghostwire teardown`: everything apply did is undone.
func (b *bench) teardown() error {
	if !b.applied {
		return nil
	}
	if _, err := b.gw.Ghostwire("teardown"); err != nil {
		return err
	}
	b.applied = false
	return nil
}

func (b *bench) expectStatus(ctx context.Context, prefix string, timeout time.Duration) error {
	var last string
	err := poll(ctx, timeout, fmt.Sprintf("ghostwire status %q", prefix), func() (bool, error) {
		s, err := b.gw.Status()
		last = strings.TrimSpace(s)
		return strings.HasPrefix(last, prefix), err
	})
	if err != nil && last != "" {
		return fmt.Errorf("%w (last: %q)", err, last)
	}
	return err
}

func (b *bench) enterMode(ctx context.Context, mode string) error {
	switch mode {
	case modePlain:
		if err := b.teardown(); err != nil {
			return err
		}
		if err := b.lab.PlainBridge(b.gw.Bridge); err != nil {
			return err
		}
		b.plainBridge = true
		return b.expectStatus(ctx, "ghostwire: not provisioned", 5*time.Second)
	case modeDivert:
		if err := b.apply(ctx, false); err != nil {
			return err
		}
		n, err := b.listening(ctx, b.lab.Box, proxyPort)
		if err != nil {
			return err
		}
		if n != 0 {
			return fmt.Errorf("divert: %d listener(s) on the proxy port %d: the diverted packets would be proxied, not routed", n, proxyPort)
		}
		return nil
	case modeGhostwire, modeInvisible:
		if err := b.apply(ctx, mode == modeInvisible); err != nil {
			return err
		}
		err := b.gw.StartProxy()
		if b.gw.Proxy != nil {
			b.proxy, b.proxyMode = b.gw.Proxy, mode // stopProxy stops it, even half started
		}
		if err != nil {
			return fmt.Errorf("starting ghostwire run: %w", err)
		}
		return nil
	case modeHAProxy, modeHAProxySplice:
		if err := b.apply(ctx, false); err != nil {
			return err
		}
		cfg, err := writeFile(b.dir, mode+".cfg", haproxyConfig(mode == modeHAProxySplice, b.maxConns()))
		if err != nil {
			return err
		}
		if err := b.nsRun(ctx, b.lab.Box, "haproxy", "-c", "-f", cfg); err != nil {
			return fmt.Errorf("haproxy config check: %w", err)
		}
		p, err := b.lab.Start(b.lab.Box, "haproxy", "-db", "-f", cfg)
		if err != nil {
			return fmt.Errorf("starting haproxy: %w", err)
		}
		b.proxy, b.proxyMode = p, mode
		return withExit(p, b.waitListen(ctx, b.lab.Box, proxyPort, 10*time.Second))
	}
	return fmt.Errorf("unknown mode %q", mode)
}

// stopProxy stops the current mode's proxy by its PID and waits for it:
// `ghostwire run` through the Appliance, HAProxy directly.
func (b *bench) stopProxy() error {
	if b.proxy == nil {
		return nil
	}
	p, mode := b.proxy, b.proxyMode
	b.proxy, b.proxyMode = nil, ""
	if !isGhostwire(mode) {
		if err := stopProcess(p, 15*time.Second); err != nil {
			return fmt.Errorf("stopping %s: %w", mode, err)
		}
		return nil
	}
	defer func() { b.gw.Proxy = nil }()
	if err := exitedEarly(p); err != nil {
		return fmt.Errorf("ghostwire run had exited before the bench stopped it: %w", err)
	}
	var exit *exec.ExitError
	if err := b.gw.StopProxy(syscall.SIGTERM); err != nil && !errors.As(err, &exit) {
		return fmt.Errorf("stopping ghostwire run: %w", err)
	}
	if b.lab == nil {
		return nil
	}
	// Its owned tables go with it; make sure before the next mode.
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := b.expectStatus(ctx, "ghostwire: bypassing", 5*time.Second); err != nil {
		return fmt.Errorf("after stopping ghostwire: %w", err)
	}
	return nil
}

// maxConns is both proxies' connection limit: the memory workload's
// connections plus a few.
func (b *bench) maxConns() int { return max(b.o.conns+200, 2000) }

// maxUDPSessions is ghostwire's UDP session limit: udp-rss's sessions, its
// warm-up and a few more (the path checks' and traffic workloads').
func (b *bench) maxUDPSessions() int { return max(b.o.udpSessions+udpWarmup+200, 2000) }

// haproxyConfig is HAProxy forwarding every diverted connection to its
// original destination from the client's address (docs/kernel.md#reference-numbers).
// maxconn leaves room for the memory workload's connections plus a few
// (the fd limit here may be tight: HAProxy needs 2 per connection).
func haproxyConfig(splice bool, maxconn int) string {
	spl, pipes := "", ""
	if splice {
		spl = "\n    option splice-auto"
		// The default (maxconn/4 pipes, 2 fds each) does not fit a 20000
		// fd limit next to maxconn; a thousand pipes is ample for the
		// traffic workloads' 64 concurrent connections.
		pipes = "\n    maxpipes 1024"
	}
	return fmt.Sprintf(`# written by ghostwire's bench
global
    maxconn %[3]d%[4]s

defaults
    mode tcp
    maxconn %[3]d
    timeout connect 5s
    timeout client 30m
    timeout server 30m%[1]s

frontend intercepted
    bind 0.0.0.0:%[2]d transparent
    bind [::]:%[2]d transparent v6only
    default_backend original_destination

backend original_destination
    source 0.0.0.0 usesrc clientip
    server orig 0.0.0.0
`, spl, proxyPort, maxconn, pipes)
}

// checkPath proves the mode is what it claims: with a proxy, a connection
// from the client to the server:80 shows up as an established socket in
// the box; in plain and divert mode it must not, and in divert mode the
// box must have routed its packets (IP forwarding on, and the forwarded
// datagrams counter moved by at least the SYN and the SYN-ACK).
//
// The two ghostwire modes are told apart by the invisible mode's owned
// netdev table (issue 15): visible ghostwire must have none; invisible
// must have it and the quiet table, and the connection must move its
// rewrite counters both ways (the box's SYN-ACK to the client, its SYN to
// the server: frames the box sent under the hosts' MACs).
func (b *bench) checkPath(ctx context.Context, mode string) error {
	var fwd0 int64
	var rw0 gwRewrites
	switch mode {
	case modeDivert:
		on, n, err := b.boxForwarding(ctx)
		if err != nil {
			return err
		}
		if !on {
			return errors.New("path check: divert, yet IP forwarding is off in the box")
		}
		fwd0 = n
	case modeGhostwire, modeInvisible:
		rw, err := b.rewrites()
		if err != nil {
			return fmt.Errorf("path check: %s: %w", mode, err)
		}
		if invisible := mode == modeInvisible; rw.Netdev != invisible {
			return fmt.Errorf("path check: %s, yet the owned netdev table (the invisible mode's rewrite) is there: %v, want %v",
				mode, rw.Netdev, invisible)
		}
		if mode == modeInvisible {
			if err := b.nsRun(ctx, b.lab.Box, "nft", "list", "table", "netdev", quietTable); err != nil {
				return fmt.Errorf("path check: %s, yet no quiet table: %w", mode, err)
			}
		}
		rw0 = rw
	}
	var fd int
	err := b.lab.Client.Do(func() error {
		var err error
		fd, err = dialBlocking(serverIP4, httpPort, 5*time.Second)
		return err
	})
	if err != nil {
		return fmt.Errorf("path check: connecting to %s:%d: %w", serverIP4, httpPort, err)
	}
	defer closeFD(fd)
	filter := fmt.Sprintf("( src %s and sport = :%d )", serverIP4, httpPort)
	if !hasProxy(mode) {
		n, err := b.established(ctx, b.lab.Box, filter)
		if err != nil {
			return err
		}
		if n != 0 {
			return fmt.Errorf("path check: %s, yet the box holds %d proxied socket(s)", mode, n)
		}
		if mode != modeDivert {
			return nil
		}
		var fwd int64
		err = poll(ctx, 5*time.Second, "the box to route the connection's packets", func() (bool, error) {
			_, n, err := b.boxForwarding(ctx)
			fwd = n - fwd0
			return fwd >= 2, err
		})
		if err != nil {
			return fmt.Errorf("path check: divert: %w (forwarded %d datagrams)", err, fwd)
		}
		return nil
	}
	err = poll(ctx, 5*time.Second, "the proxy to accept a diverted connection", func() (bool, error) {
		n, err := b.established(ctx, b.lab.Box, filter)
		return n > 0, err
	})
	if err != nil || mode != modeInvisible {
		return err
	}
	var rw gwRewrites
	err = poll(ctx, 5*time.Second, "the invisible rewrite to carry the box's frames both ways", func() (bool, error) {
		var err error
		rw, err = b.rewrites()
		return rw.ToClient > rw0.ToClient && rw.ToServer > rw0.ToServer, err
	})
	if err != nil {
		return fmt.Errorf("path check: %s: %w (frames rewritten to the client %d -> %d, to the server %d -> %d)",
			mode, err, rw0.ToClient, rw.ToClient, rw0.ToServer, rw.ToServer)
	}
	fmt.Fprintf(os.Stderr, "  path: proxied invisibly: the box's frames went out under the hosts' MACs (rewritten: %d to the client, %d to the server)\n",
		rw.ToClient-rw0.ToClient, rw.ToServer-rw0.ToServer)
	return nil
}

// quietTable is the invisible box's quiet table: `table netdev NAME_quiet`
// for ghostwire's default table name (lab.Appliance's config sets none).
const quietTable = "ghostwire_quiet"

// rewrites reads the invisible mode's rewrite counters from `ghostwire
// status --json`.
func (b *bench) rewrites() (gwRewrites, error) {
	out, _, err := b.gw.StatusOutput("--json")
	if err != nil {
		return gwRewrites{}, fmt.Errorf("reading the rule counters: %w", err)
	}
	return parseStatusRewrites([]byte(out))
}

// boxForwarding reads the box's /proc/net/snmp: whether IP forwarding is
// on and how many datagrams it has forwarded.
func (b *bench) boxForwarding(ctx context.Context) (on bool, forwarded int64, err error) {
	out, err := b.nsOutput(ctx, b.lab.Box, "cat", "/proc/net/snmp")
	if err != nil {
		return false, 0, fmt.Errorf("reading the box's /proc/net/snmp: %w: %s", err, out)
	}
	return parseSnmpForwarding(out)
}

// withExit adds why p died to err, if it did.
func withExit(p *lab.Process, err error) error {
	if err == nil {
		return nil
	}
	if e := exitedEarly(p); e != nil {
		return fmt.Errorf("%w; the proxy %v", err, e)
	}
	return err
}

// stopProcess sends SIGTERM to p's PID, waits up to timeout, then SIGKILL.
func stopProcess(p *lab.Process, timeout time.Duration) error {
	if err := labStop(p, timeout); err != nil {
		fmt.Fprintf(os.Stderr, "bench: %v\n", err)
		return err
	}
	return nil
}
