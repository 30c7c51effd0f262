package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/ghostwire/ghostwire/lab"
)

// Fixed lab addresses (lab package) and the ports the bench uses.
const (
	serverIP4  = "192.0.2.2"
	httpPort   = 80
	iperfPort  = 5201
	proxyPort  = lab.ProxyPort // the TPROXY port lab.Appliance configures
	wrkConns   = 64
	wrkThreads = 2
)

// bench is one run: one lab, the long-lived servers in the server
// namespace, and the samples taken so far.
type bench struct {
	o       options
	lab     *lab.Lab
	prefix  string         // the lab's name prefix
	dir     string         // scratch: configs, state file, logs
	gw      *lab.Appliance // the ghostwire binary, its config and `ghostwire run`
	self    string         // this binary, re-executed as the HTTP server
	started time.Time

	httpd, iperfd *lab.Process
	proxy         *lab.Process // the proxy of the current mode, if any
	proxyMode     string
	applied       bool // `ghostwire apply` ran since the last teardown
	// appliedInvisible: the config applied is the invisible one.
	appliedInvisible bool
	// plainBridge: the plain mode's bridge (lab.PlainBridge) may still be
	// there, adopted by a visible apply or not.
	plainBridge bool
	// visibleCfg and invisibleCfg are the two ghostwire configs; gw.Config
	// is the one last applied.
	visibleCfg, invisibleCfg string

	// heldFDs are sockets kept open until the mode ends (the UDP path
	// check's client socket: see udpExchange).
	heldFDs []int

	samples  []sample
	failures []string
	versions map[string]string
}

func newBench(ctx context.Context, o options) (b *bench, err error) {
	b = &bench{o: o, started: time.Now(), versions: toolVersions()}
	if b.self, err = os.Executable(); err != nil {
		return nil, fmt.Errorf("finding the bench binary: %w", err)
	}
	if b.dir, err = os.MkdirTemp("", "ghostwire-bench-"); err != nil {
		return nil, err
	}
	ok := false
	defer func() {
		if !ok {
			err = errors.Join(err, b.close())
		}
	}()
	b.prefix = lab.UniquePrefix()
	// Silent ports: the box's ports come up with IPv6 off, as the
	// ghostwire-invisible mode needs them (lab.WithSilentPorts); the other
	// modes do not use the ports' own IPv6.
	if b.lab, err = lab.New(b.prefix, lab.WithSilentPorts()); err != nil {
		return nil, fmt.Errorf("building the lab: %w", err)
	}
	fmt.Fprintf(os.Stderr, "bench: lab up (box ports %s, %s); scratch %s\n", b.lab.ClientNIC, b.lab.ServerNIC, b.dir)

	// wrk opens and closes tens of thousands of connections per second from
	// one namespace: without these it measures its own port exhaustion.
	if err := b.nsRun(ctx, b.lab.Client, "sysctl", "-q", "-w",
		"net.ipv4.tcp_tw_reuse=1", "net.ipv4.ip_local_port_range=1024 65535"); err != nil {
		return nil, err
	}

	if err := b.provision(ctx); err != nil {
		return nil, err
	}
	if b.httpd, err = b.lab.Start(b.lab.Server, b.self, "-serve-http", fmt.Sprintf(":%d", httpPort)); err != nil {
		return nil, fmt.Errorf("starting the HTTP server: %w", err)
	}
	if b.iperfd, err = b.lab.Start(b.lab.Server, "iperf3", "-s", "-p", strconv.Itoa(iperfPort)); err != nil {
		return nil, fmt.Errorf("starting the iperf3 server: %w", err)
	}
	for _, p := range []int{httpPort, iperfPort} {
		if err := b.waitListen(ctx, b.lab.Server, p, 10*time.Second); err != nil {
			return nil, err
		}
	}
	ok = true
	return b, nil
}

// close stops every process the bench started (proxy first, so that
// teardown is allowed), undoes the provisioning and deletes the lab.
func (b *bench) close() error {
	var errs []error
	if err := b.stopProxy(); err != nil {
		errs = append(errs, err)
	}
	if b.lab != nil && b.gw != nil {
		if err := b.teardown(); err != nil {
			errs = append(errs, err)
		}
		b.applied = false
	}
	for _, p := range []**lab.Process{&b.httpd, &b.iperfd} {
		if *p != nil {
			if err := stopProcess(*p, 5*time.Second); err != nil {
				errs = append(errs, err)
			}
			*p = nil
		}
	}
	if b.lab != nil {
		if err := b.lab.Close(); err != nil {
			errs = append(errs, fmt.Errorf("deleting the lab: %w", err))
		}
		b.lab = nil
	}
	if b.dir != "" {
		os.RemoveAll(b.dir)
		b.dir = ""
	}
	return errors.Join(errs...)
}

// run measures every mode, round after round: first the traffic
// workloads (TCP, then UDP), then the memory workloads (TCP, then UDP). Memory runs last, in rounds of its
// own, because closing thousands of proxied connections leaves as many
// TIME_WAIT sockets in the box for a minute, which would tax whichever
// traffic workload came next (HAProxy's new-connection rate fell from
// ~15k to ~1k req/s after it).
func (b *bench) run(ctx context.Context) error {
	var proxied, udpProxied []string
	for _, m := range b.o.modes {
		if hasProxy(m) {
			proxied = append(proxied, m)
			if carriesUDP(m) {
				udpProxied = append(udpProxied, m)
			}
		}
	}
	tcpTraffic := b.o.runs(wlIperf1) || b.o.runs(wlIperf4) || b.o.runs(wlHTTPClose) || b.o.runs(wlKeepAlive)
	udpTraffic := b.o.runs(wlUDP1400) || b.o.runs(wlUDP64)
	// The UDP workloads run in the traffic rounds, after the TCP ones, in
	// the modes that carry UDP (not HAProxy's).
	var trafficModes []string
	for _, m := range b.o.modes {
		if tcpTraffic || udpTraffic && carriesUDP(m) {
			trafficModes = append(trafficModes, m)
		}
	}
	type phase struct {
		name  string
		modes []string
		udp   func(mode string) bool // check the UDP path too
		fn    func(context.Context, int, string) error
	}
	never := func(string) bool { return false }
	var phases []phase
	if len(trafficModes) > 0 {
		phases = append(phases, phase{"traffic", trafficModes, func(m string) bool { return udpTraffic && carriesUDP(m) }, b.trafficRound})
	}
	if b.o.conns > 0 && len(proxied) > 0 && b.o.runs(wlMemPer) {
		phases = append(phases, phase{fmt.Sprintf("memory, %d idle connections", b.o.conns), proxied, never, b.memoryRound})
	}
	// UDP sessions leave nothing behind in the box (no TIME_WAIT): their
	// rounds could go anywhere; they go last, with a fresh proxy each.
	if b.o.udpSessions > 0 && len(udpProxied) > 0 && b.o.runs(wlUDPMemPer) {
		phases = append(phases, phase{fmt.Sprintf("UDP memory, %d idle sessions", b.o.udpSessions), udpProxied,
			func(string) bool { return true }, b.measureUDPMemory})
	}
	for _, ph := range phases {
		for round := 1; round <= b.o.rounds; round++ {
			for _, mode := range ph.modes {
				if err := ctx.Err(); err != nil {
					return err
				}
				fmt.Fprintf(os.Stderr, "\n== %s: round %d/%d: %s (load %s)\n", ph.name, round, b.o.rounds, mode, loadAvg())
				if err := b.inMode(ctx, mode, ph.udp(mode), func() error { return ph.fn(ctx, round, mode) }); err != nil {
					if ctx.Err() != nil {
						return ctx.Err()
					}
					err = fmt.Errorf("%s round %d, %s: %w", ph.name, round, mode, err)
					if !b.o.keep {
						return err
					}
					b.failures = append(b.failures, err.Error())
					fmt.Fprintf(os.Stderr, "bench: %v (carrying on)\n", err)
				}
			}
		}
	}
	if len(b.failures) > 0 {
		return fmt.Errorf("%d mode run(s) failed:\n  %s", len(b.failures), strings.Join(b.failures, "\n  "))
	}
	return nil
}

// inMode sets mode up, checks the path really is what mode claims (for
// UDP too if udp), runs fn and stops the mode's proxy.
func (b *bench) inMode(ctx context.Context, mode string, udp bool, fn func() error) (err error) {
	defer func() {
		closeFDs(b.heldFDs)
		b.heldFDs = nil
		if serr := b.stopProxy(); serr != nil {
			err = errors.Join(err, serr)
		}
	}()
	if err := b.enterMode(ctx, mode); err != nil {
		return fmt.Errorf("setting up: %w", err)
	}
	if err := b.checkPath(ctx, mode); err != nil {
		return err
	}
	if udp {
		if err := b.checkUDPPath(ctx, mode); err != nil {
			return err
		}
	}
	return fn()
}

func (b *bench) trafficRound(ctx context.Context, round int, mode string) error {
	var errs []error
	record := func(e error) {
		if e != nil {
			errs = append(errs, e)
			fmt.Fprintf(os.Stderr, "  FAILED: %v\n", e)
		}
	}
	for _, w := range []struct {
		key     string
		measure func() error
	}{
		{wlIperf1, func() error { return b.measureIperf(ctx, round, mode, 1, wlIperf1, wlIperf1CPU) }},
		{wlIperf4, func() error { return b.measureIperf(ctx, round, mode, 4, wlIperf4, wlIperf4CPU) }},
		{wlHTTPClose, func() error { return b.measureWrk(ctx, round, mode, true) }},
		{wlKeepAlive, func() error { return b.measureWrk(ctx, round, mode, false) }},
		{wlUDP1400, func() error { return b.measureIperfUDP(ctx, round, mode) }},
		{wlUDP64, func() error { return b.measureUDPFlood(ctx, round, mode) }},
	} {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		if !b.o.runs(w.key) || isUDPWorkload(w.key) && !carriesUDP(mode) {
			continue
		}
		measure := w.measure
		if err := measure(); ctx.Err() == nil {
			record(err)
		}
	}
	return errors.Join(errs...)
}

func (b *bench) memoryRound(ctx context.Context, round int, mode string) error {
	return b.measureMemory(ctx, round, mode)
}

func loadAvg() string {
	s, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return "?"
	}
	f := strings.Fields(string(s))
	if len(f) < 3 {
		return "?"
	}
	return strings.Join(f[:3], " ")
}

// nsRun runs a command in ns and returns its combined output in the error.
func (b *bench) nsRun(ctx context.Context, ns *lab.NS, name string, args ...string) error {
	if out, err := b.nsOutput(ctx, ns, name, args...); err != nil {
		return fmt.Errorf("%s %s: %w: %s", name, strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return nil
}

func (b *bench) nsOutput(ctx context.Context, ns *lab.NS, name string, args ...string) ([]byte, error) {
	cmd := ns.Command(ctx, name, args...)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	err := cmd.Run()
	return out.Bytes(), err
}

// listening counts TCP listeners on port in ns.
func (b *bench) listening(ctx context.Context, ns *lab.NS, port int) (int, error) {
	out, err := b.nsOutput(ctx, ns, "ss", "-Hltn", fmt.Sprintf("sport = :%d", port))
	if err != nil {
		return 0, fmt.Errorf("ss: %w: %s", err, out)
	}
	return countLines(out), nil
}

func (b *bench) waitListen(ctx context.Context, ns *lab.NS, port int, timeout time.Duration) error {
	return poll(ctx, timeout, fmt.Sprintf("a listener on port %d", port), func() (bool, error) {
		n, err := b.listening(ctx, ns, port)
		return n > 0, err
	})
}

// established counts established TCP sockets in ns matching an ss filter.
func (b *bench) established(ctx context.Context, ns *lab.NS, filter string) (int, error) {
	out, err := b.nsOutput(ctx, ns, "ss", "-Htn", "state", "established", filter)
	if err != nil {
		return 0, fmt.Errorf("ss: %w: %s", err, out)
	}
	return countLines(out), nil
}

func countLines(b []byte) int {
	n := 0
	for _, l := range bytes.Split(b, []byte("\n")) {
		if len(bytes.TrimSpace(l)) > 0 {
			n++
		}
	}
	return n
}

// poll calls cond every 50-250 ms until it is true, fails, or timeout.
func poll(ctx context.Context, timeout time.Duration, what string, cond func() (bool, error)) error {
	deadline := time.Now().Add(timeout)
	wait := 50 * time.Millisecond
	var last error
	for {
		ok, err := cond()
		if ok {
			return nil
		}
		last = err
		if time.Now().After(deadline) {
			if last != nil {
				return fmt.Errorf("waiting %v for %s: %w", timeout, what, last)
			}
			return fmt.Errorf("waiting %v for %s: timed out", timeout, what)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(wait):
		}
		wait = min(wait*2, 250*time.Millisecond)
	}
}

func toolVersions() map[string]string {
	v := map[string]string{}
	for name, args := range map[string][]string{
		"iperf3":  {"--version"},
		"wrk":     {"--version"},
		"haproxy": {"-v"},
	} {
		out, _ := exec.Command(name, args...).CombinedOutput()
		line, _, _ := strings.Cut(string(out), "\n")
		v[name] = strings.TrimSpace(line)
	}
	return v
}

func writeFile(dir, name, text string) (string, error) {
	p := filepath.Join(dir, name)
	return p, os.WriteFile(p, []byte(text), 0o644)
}
