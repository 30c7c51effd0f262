package main

import (
	"context"
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/ghostwire/ghostwire/lab"
)

// How the modes share one lab:
//
//   - The bridge is provisioned once, by `ghostwire apply` (bridge, sysctls,
//     policy routing, static nft diversion), so every mode crosses the very
//     same bridge with the same sysctls.
//   - plain: the diversion tables are deleted; frames are only bridged.
//     This is the fair physical limit: same bridge, bridge-nf-call-* = 0.
//   - ghostwire: `ghostwire run`, which replaces the diversion with tables
//     it owns; when it stops the kernel deletes them.
//   - haproxy, haproxy-splice: `ghostwire apply` again (re-installs the
//     static diversion; apply is idempotent), then HAProxy listens
//     transparently on the proxy port, so it gets exactly the flows the
//     ghostwire proxy would.
//
// Without a ghostwire binary the fallback provisions the same thing with
// ip, sysctl and the reference nft ruleset of docs/kernel.md#reference-ruleset.

const (
	gwTables       = "ghostwire" // appliance's nft table name in both families
	fallbackTables = "gwbench"
)

// bridgeName is the box bridge, named after the lab like its ports.
func (b *bench) bridgeName() string { return b.prefix + "br" }

func (b *bench) provision(ctx context.Context) error {
	if b.o.ghostwire == "" {
		return b.provisionFallback(ctx)
	}
	cfg := fmt.Sprintf(`# written by ghostwire's bench
bridge:
  name: %s
  client_nic: %s
  server_nic: %s
  addresses: [192.0.2.254/24, "2001:db8:1::fe/64"]
intercept:
  tcp_ports: [%d, %d]
proxy:
  tcp_port: %d
  idle_timeout: 30m
  shutdown_grace: 2s
log:
  level: warn
state_file: %s/state.json
`, b.bridgeName(), b.lab.ClientNIC, b.lab.ServerNIC, httpPort, iperfPort, proxyPort, b.dir)
	var err error
	if b.gwConfig, err = writeFile(b.dir, "ghostwire.yaml", cfg); err != nil {
		return err
	}
	b.applied = true // teardown is safe even if apply failed half way
	if err := b.nsRun(ctx, b.lab.Box, b.o.ghostwire, "apply", "-c", b.gwConfig); err != nil {
		return err
	}
	return nil
}

// provisionFallback builds what `ghostwire apply` would, by hand.
func (b *bench) provisionFallback(ctx context.Context) error {
	br := b.bridgeName()
	script := fmt.Sprintf(`set -e
ip link add %[1]s type bridge
ip link set %[2]s master %[1]s
ip link set %[3]s master %[1]s
ip link set %[1]s up
sysctl -q -w net.bridge.bridge-nf-call-iptables=0 net.bridge.bridge-nf-call-ip6tables=0 net.bridge.bridge-nf-call-arptables=0 || true
sysctl -q -w net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1 net.ipv4.conf.all.send_redirects=0
ip addr replace 192.0.2.254/24 dev %[1]s
ip -6 addr replace 2001:db8:1::fe/64 dev %[1]s nodad
ip rule add fwmark 1 lookup 100 pref 1000
ip -6 rule add fwmark 1 lookup 100 pref 1000
ip route replace local 0.0.0.0/0 dev lo table 100
ip -6 route replace local ::/0 dev lo table 100
`, br, b.lab.ClientNIC, b.lab.ServerNIC)
	if err := b.nsRun(ctx, b.lab.Box, "sh", "-c", script); err != nil {
		return err
	}
	b.applied = true
	return b.installDiversion(ctx)
}

func (b *bench) fallbackRuleset(ctx context.Context) (string, error) {
	br := b.bridgeName()
	out, err := b.nsOutput(ctx, b.lab.Box, "cat", "/sys/class/net/"+br+"/address")
	if err != nil {
		return "", fmt.Errorf("reading %s's MAC: %w: %s", br, err, out)
	}
	mac := strings.TrimSpace(string(out))
	ports := fmt.Sprintf("{ %d, %d }", httpPort, iperfPort)
	return fmt.Sprintf(`table bridge %[1]s {
	chain prerouting {
		type filter hook prerouting priority -300; policy accept;
		iifname "%[2]s" meta l4proto tcp th dport %[5]s ether daddr set %[4]s meta pkttype set host
		iifname "%[3]s" meta l4proto tcp th sport %[5]s ether daddr set %[4]s meta pkttype set host
	}
}
table inet %[1]s {
	chain prerouting {
		type filter hook prerouting priority mangle; policy accept;
		fib daddr type local accept
		tcp dport %[5]s tcp flags & (fin|syn|rst|ack) == syn meta mark set 1 tproxy to :%[6]d accept
		socket transparent 1 meta mark set 1 accept
	}
}
`, fallbackTables, b.lab.ClientNIC, b.lab.ServerNIC, mac, ports, proxyPort), nil
}

// installDiversion puts apply's static diversion in place.
func (b *bench) installDiversion(ctx context.Context) error {
	if b.o.ghostwire != "" {
		return b.nsRun(ctx, b.lab.Box, b.o.ghostwire, "apply", "-c", b.gwConfig)
	}
	rs, err := b.fallbackRuleset(ctx)
	if err != nil {
		return err
	}
	p, err := writeFile(b.dir, "diversion.nft", rs)
	if err != nil {
		return err
	}
	b.removeDiversion(ctx)
	return b.nsRun(ctx, b.lab.Box, "nft", "-f", p)
}

// removeDiversion deletes the static diversion tables, if present.
func (b *bench) removeDiversion(ctx context.Context) {
	for _, name := range []string{gwTables, fallbackTables} {
		for _, fam := range []string{"bridge", "inet"} {
			b.nsOutput(ctx, b.lab.Box, "nft", "delete", "table", fam, name) // absent: fine
		}
	}
}

// gwStatus is `ghostwire status`'s first line, e.g. "ghostwire: intercepting".
func (b *bench) gwStatus(ctx context.Context) (string, error) {
	out, err := b.nsOutput(ctx, b.lab.Box, b.o.ghostwire, "status", "-c", b.gwConfig)
	line, _, _ := strings.Cut(string(out), "\n")
	if err != nil {
		return "", fmt.Errorf("ghostwire status: %w: %s", err, strings.TrimSpace(string(out)))
	}
	return strings.TrimSpace(line), nil
}

func (b *bench) expectStatus(ctx context.Context, prefix string, timeout time.Duration) error {
	if b.o.ghostwire == "" {
		return nil
	}
	var last string
	err := poll(ctx, timeout, fmt.Sprintf("ghostwire status %q", prefix), func() (bool, error) {
		s, err := b.gwStatus(ctx)
		last = s
		return strings.HasPrefix(s, prefix), err
	})
	if err != nil && last != "" {
		return fmt.Errorf("%w (last: %q)", err, last)
	}
	return err
}

func (b *bench) enterMode(ctx context.Context, mode string) error {
	switch mode {
	case modePlain:
		b.removeDiversion(ctx)
		return b.expectStatus(ctx, "ghostwire: bypassing", 5*time.Second)
	case modeGhostwire:
		p, err := b.lab.Start(b.lab.Box, b.o.ghostwire, "run", "-c", b.gwConfig)
		if err != nil {
			return fmt.Errorf("starting ghostwire run: %w", err)
		}
		b.proxy, b.proxyMode = p, mode
		return withExit(p, b.expectStatus(ctx, "ghostwire: intercepting", 15*time.Second))
	case modeHAProxy, modeHAProxySplice:
		if err := b.installDiversion(ctx); err != nil {
			return err
		}
		if err := b.expectStatus(ctx, "ghostwire: diverting", 5*time.Second); err != nil {
			return err
		}
		cfg, err := writeFile(b.dir, mode+".cfg", haproxyConfig(mode == modeHAProxySplice, max(b.o.conns+200, 2000)))
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

// stopProxy stops the current mode's proxy by its PID and waits for it.
func (b *bench) stopProxy() error {
	if b.proxy == nil {
		return nil
	}
	p, mode := b.proxy, b.proxyMode
	b.proxy, b.proxyMode = nil, ""
	if err := stopProcess(p, 15*time.Second); err != nil {
		return fmt.Errorf("stopping %s: %w", mode, err)
	}
	if mode == modeGhostwire && b.lab != nil {
		// Its owned tables go with it; make sure before the next mode.
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := b.expectStatus(ctx, "ghostwire: bypassing", 5*time.Second); err != nil {
			return fmt.Errorf("after stopping ghostwire: %w", err)
		}
	}
	return nil
}

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
// the box; in plain mode it must not.
func (b *bench) checkPath(ctx context.Context, mode string) error {
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
	if mode == modePlain {
		n, err := b.established(ctx, b.lab.Box, filter)
		if err != nil {
			return err
		}
		if n != 0 {
			return fmt.Errorf("path check: plain bridging, yet the box holds %d proxied socket(s)", n)
		}
		return nil
	}
	return poll(ctx, 5*time.Second, "the proxy to accept a diverted connection", func() (bool, error) {
		n, err := b.established(ctx, b.lab.Box, filter)
		return n > 0, err
	})
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
