// Command bench measures ghostwire against plain bridging and HAProxy in
// one lab, modes interleaved round by round, and prints a table plus a JSON
// file with every figure, ghostwire's ratios and issues 11's and 12's
// targets, and what ghostwire's invisible mode costs against the visible
// one (issue 15).
//
//	go run ./cmd/bench -ghostwire bin/ghostwire [-quick] [-rounds N] [-json FILE]
//
// It needs root (it builds network namespaces) and installs iperf3, wrk and
// haproxy from the distribution's packages when they are missing. All
// traffic stays inside the lab's namespaces, and every namespace and
// process it made is gone when it exits, on error or Ctrl-C too.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"
	"time"
)

type options struct {
	ghostwire string
	quick     bool
	rounds    int
	jsonOut   string
	modes     []string
	conns     int
	iperfDur  time.Duration
	wrkDur    time.Duration
	keep      bool     // keep going after a failed measurement
	only      []string // workload keys to run; empty: all

	udpDur      time.Duration // udp-1400 and udp-64 run length
	udpFlows    int           // udp-64's flows
	udpSessions int           // udp-rss's idle sessions (0 skips it)
}

func (o options) runs(key string) bool { return len(o.only) == 0 || contains(o.only, key) }

func main() {
	var (
		o         options
		modes     string
		only      string
		serveAddr string
		floodAddr string
		sinkAddr  string
		echoAddr  string
		udpSize   int
	)
	flag.StringVar(&o.ghostwire, "ghostwire", "bin/ghostwire", "ghostwire binary: it provisions the box for every mode and is the ghostwire mode's proxy")
	flag.BoolVar(&o.quick, "quick", false, "one round with short runs (~1 minute), for development")
	flag.IntVar(&o.rounds, "rounds", 0, "rounds of all modes (default 3, or 1 with -quick)")
	flag.StringVar(&o.jsonOut, "json", "bin/bench-results.json", "write every sample, the summary and the targets here as JSON")
	flag.StringVar(&modes, "modes", strings.Join(allModes, ","), "modes to run, in round order")
	flag.StringVar(&only, "workloads", "", "comma-separated workloads to run ("+strings.Join(workloadKeys, ", ")+"; default all)")
	flag.IntVar(&o.conns, "conns", 10000, "idle proxied connections for the memory workload (0 skips it)")
	flag.DurationVar(&o.iperfDur, "iperf-time", 0, "iperf3 run length (default 10s, or 2s with -quick)")
	flag.DurationVar(&o.wrkDur, "wrk-time", 0, "wrk run length (default 10s, or 2s with -quick)")
	flag.BoolVar(&o.keep, "keep-going", true, "record a failed measurement and carry on instead of stopping")
	flag.DurationVar(&o.udpDur, "udp-time", 0, "udp-1400 and udp-64 run length (default 10s, or 2s with -quick)")
	flag.IntVar(&o.udpFlows, "udp-flows", 8, "udp-64's flows (client sockets, one session each)")
	flag.IntVar(&o.udpSessions, "udp-sessions", 10000, "idle UDP sessions for udp-rss (0 skips it)")
	flag.StringVar(&serveAddr, "serve-http", "", "internal: run the bench's HTTP server on ADDR (the bench starts it in the server namespace)")
	flag.StringVar(&floodAddr, "udp-flood", "", "internal: send -udp-size datagrams to ADDR from -udp-flows sockets for -udp-time (client namespace)")
	flag.StringVar(&sinkAddr, "udp-sink", "", "internal: count the datagrams arriving on ADDR until SIGTERM (server namespace)")
	flag.StringVar(&echoAddr, "udp-echo", "", "internal: echo every datagram arriving on ADDR (server namespace)")
	flag.IntVar(&udpSize, "udp-size", udpSmallSize, "internal: -udp-flood's datagram size")
	flag.Parse()

	helper := func(err error) {
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	switch {
	case serveAddr != "":
		helper(serveHTTP(serveAddr))
	case floodAddr != "":
		helper(runUDPFlood(floodAddr, o.udpFlows, udpSize, o.udpDur))
	case sinkAddr != "":
		helper(runUDPSink(sinkAddr))
	case echoAddr != "":
		helper(runUDPEcho(echoAddr))
	}

	o.modes = strings.Split(modes, ",")
	if only != "" {
		o.only = strings.Split(only, ",")
		for _, w := range o.only {
			if !contains(workloadKeys, w) {
				fatalf("unknown workload %q (workloads: %s)", w, strings.Join(workloadKeys, ", "))
			}
		}
	}
	for _, m := range o.modes {
		if !isMode(m) {
			fatalf("unknown mode %q (modes: %s)", m, strings.Join(allModes, ", "))
		}
	}
	if o.rounds == 0 {
		o.rounds = 3
		if o.quick {
			o.rounds = 1
		}
	}
	def := 10 * time.Second
	if o.quick {
		def = 2 * time.Second
	}
	if o.iperfDur == 0 {
		o.iperfDur = def
	}
	if o.wrkDur == 0 {
		o.wrkDur = def
	}
	if o.udpDur == 0 {
		o.udpDur = def
	}
	if o.udpFlows < 1 {
		fatalf("-udp-flows must be at least 1")
	}
	if err := run(o); err != nil {
		fatalf("%v", err)
	}
}

func isMode(m string) bool {
	for _, a := range allModes {
		if a == m {
			return true
		}
	}
	return false
}

func fatalf(format string, a ...any) {
	fmt.Fprintf(os.Stderr, "bench: "+format+"\n", a...)
	os.Exit(1)
}

func run(o options) error {
	if runtime.GOOS != "linux" {
		return fmt.Errorf("needs Linux (network namespaces, nftables), not %s", runtime.GOOS)
	}
	if o.ghostwire == "" {
		return errors.New("-ghostwire is required: the ghostwire binary provisions the box for every mode (build it first: make build)")
	}
	abs, err := filepath.Abs(o.ghostwire)
	if err != nil {
		return err
	}
	if fi, err := os.Stat(abs); err != nil || fi.IsDir() || fi.Mode()&0o111 == 0 {
		return fmt.Errorf("ghostwire binary %s is missing or not executable: build it first: make build", abs)
	}
	o.ghostwire = abs
	if os.Geteuid() != 0 {
		return errors.New("needs root: it builds network namespaces and provisions a bridge in them (try: sudo make bench)")
	}
	if err := ensureTools(); err != nil {
		return err
	}
	// 10,000 proxied connections are 20,000 descriptors in the proxy and
	// 10,000 in this process; children (proxies, servers) inherit this.
	// Raising the hard limit takes CAP_SYS_RESOURCE: without it, measure
	// as many connections as fit and say so.
	limit, err := raiseNoFile(uint64(max(2*o.conns+4000, 2*o.udpSessions+udpFDHeadroom)))
	if err != nil {
		return err
	}
	if fit := fitConns(limit); o.conns > fit {
		fmt.Fprintf(os.Stderr, "bench: the open-files hard limit is %d and cannot be raised here (no CAP_SYS_RESOURCE):"+
			" measuring memory with %d idle connections instead of %d (a proxy needs 2 descriptors per connection)\n",
			limit, fit, o.conns)
		o.conns = fit
	}
	if fit := fitUDPSessions(limit); o.udpSessions > fit {
		fmt.Fprintf(os.Stderr, "bench: the open-files hard limit is %d and cannot be raised here (no CAP_SYS_RESOURCE):"+
			" measuring UDP memory with %d idle sessions instead of %d (a session is 2 descriptors in the proxy)\n",
			limit, fit, o.udpSessions)
		o.udpSessions = fit
	}

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM, syscall.SIGHUP)
	defer stop()

	b, err := newBench(ctx, o)
	if err != nil {
		return err
	}
	runErr := b.run(ctx)
	closeErr := b.close()
	if runErr == nil && ctx.Err() != nil {
		runErr = errors.New("interrupted")
	}

	if len(b.samples) > 0 {
		fmt.Println()
		fmt.Printf("ghostwire bench: %d round(s), iperf3 %v, wrk %v, UDP %v, %d idle conns, %d idle UDP sessions, kernel %s, %d CPUs\n",
			o.rounds, o.iperfDur, o.wrkDur, o.udpDur, o.conns, o.udpSessions, kernelRelease(), runtime.NumCPU())
		writeReport(os.Stdout, b.samples, o.modes)
		if err := writeJSON(o, b); err != nil {
			runErr = errors.Join(runErr, err)
		} else {
			fmt.Printf("\nJSON: %s\n", o.jsonOut)
		}
	}
	return errors.Join(runErr, closeErr)
}

// ensureTools installs the packages that provide missing tools.
func ensureTools() error {
	need := []struct{ bin, pkg string }{
		{"iperf3", "iperf3"}, {"wrk", "wrk"}, {"haproxy", "haproxy"},
		{"nft", "nftables"}, {"ip", "iproute2"}, {"ss", "iproute2"},
	}
	var pkgs []string
	for _, n := range need {
		if _, err := exec.LookPath(n.bin); err != nil && !contains(pkgs, n.pkg) {
			pkgs = append(pkgs, n.pkg)
		}
	}
	if len(pkgs) == 0 {
		return nil
	}
	if _, err := exec.LookPath("apt-get"); err != nil {
		return fmt.Errorf("missing %s and no apt-get to install them", strings.Join(pkgs, ", "))
	}
	fmt.Fprintf(os.Stderr, "bench: installing %s\n", strings.Join(pkgs, " "))
	env := append(os.Environ(), "DEBIAN_FRONTEND=noninteractive")
	install := func() error {
		cmd := exec.Command("apt-get", append([]string{"install", "-y", "-qq", "--no-install-recommends"}, pkgs...)...)
		cmd.Env, cmd.Stdout, cmd.Stderr = env, os.Stderr, os.Stderr
		return cmd.Run()
	}
	if err := install(); err != nil {
		upd := exec.Command("apt-get", "update", "-qq")
		upd.Env, upd.Stdout, upd.Stderr = env, os.Stderr, os.Stderr
		if err := upd.Run(); err != nil {
			return fmt.Errorf("apt-get update: %w", err)
		}
		if err := install(); err != nil {
			return fmt.Errorf("apt-get install %s: %w", strings.Join(pkgs, " "), err)
		}
	}
	return nil
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}

// raiseNoFile sets RLIMIT_NOFILE to at least n if allowed, else soft to
// hard, and returns the soft limit now in force (inherited by children:
// setting it explicitly also stops Go restoring the old soft limit in them).
func raiseNoFile(n uint64) (uint64, error) {
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		return 0, fmt.Errorf("reading RLIMIT_NOFILE: %w", err)
	}
	want := syscall.Rlimit{Cur: max(lim.Cur, n), Max: max(lim.Max, n)}
	if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &want); err == nil {
		return want.Cur, nil
	}
	want = syscall.Rlimit{Cur: lim.Max, Max: lim.Max}
	if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &want); err != nil {
		return 0, fmt.Errorf("setting RLIMIT_NOFILE to %d: %w", lim.Max, err)
	}
	return want.Cur, nil
}

// fitConns is how many idle proxied connections fit in an open-files limit:
// two descriptors each in the proxy, plus headroom for listeners, HAProxy's
// splice pipes and reserve, and the runtime, rounded down to a thousand.
func fitConns(limit uint64) int {
	if limit < 6000 {
		return 0
	}
	return int((limit-4000)/2) / 1000 * 1000
}

// udpFDHeadroom is what udp-rss leaves of the open-files limit besides two
// descriptors per session: the warm-up sessions, listeners, the runtime.
const udpFDHeadroom = 2000

// fitUDPSessions is how many idle UDP sessions fit in an open-files limit:
// two descriptors each in the proxy, udpFDHeadroom for the rest, rounded
// down to a thousand (the bench's own client sockets are one each).
func fitUDPSessions(limit uint64) int {
	if limit < 2*udpFDHeadroom {
		return 0
	}
	return int((limit-udpFDHeadroom)/2) / 1000 * 1000
}

func kernelRelease() string {
	b, err := os.ReadFile("/proc/sys/kernel/osrelease")
	if err != nil {
		return "?"
	}
	return strings.TrimSpace(string(b))
}

func writeJSON(o options, b *bench) error {
	sum := summaries(b.samples)
	cmp := compare(sum)
	inv := compareInvisible(sum)
	doc := map[string]any{
		"started":      b.started.Format(time.RFC3339),
		"quick":        o.quick,
		"rounds":       o.rounds,
		"modes":        o.modes,
		"iperf_time_s": o.iperfDur.Seconds(),
		"wrk_time_s":   o.wrkDur.Seconds(),
		"idle_conns":   o.conns,
		"udp_time_s":   o.udpDur.Seconds(),
		"udp_flows":    o.udpFlows,
		"udp_sessions": o.udpSessions,
		"kernel":       kernelRelease(),
		"cpus":         runtime.NumCPU(),
		"tools":        b.versions,
		"samples":      b.samples,
		"summary":      sum,
		"ghostwire":    cmp,
		"targets":      evaluate(issueTargets, cmp),
		// issue 15: ghostwire-invisible ÷ ghostwire, and its targets
		"invisible":         inv,
		"invisible_targets": evaluateInvisible(invisibleTargets, inv),
		"failures":          b.failures,
	}
	data, err := json.MarshalIndent(doc, "", "  ")
	if err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Dir(o.jsonOut), 0o755); err != nil {
		return err
	}
	return os.WriteFile(o.jsonOut, append(data, '\n'), 0o644)
}
