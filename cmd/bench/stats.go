package main

import (
	"fmt"
	"io"
	"math"
	"slices"
	"strings"
	"text/tabwriter"
)

// Modes, in the order they run within a round and appear in the table.
const (
	modePlain         = "plain"
	modeDivert        = "divert"
	modeGhostwire     = "ghostwire"
	modeInvisible     = "ghostwire-invisible" // ghostwire with bridge.invisible (issue 15)
	modeHAProxy       = "haproxy"
	modeHAProxySplice = "haproxy-splice"
)

var allModes = []string{modePlain, modeDivert, modeGhostwire, modeInvisible, modeHAProxy, modeHAProxySplice}

// isGhostwire says whether mode's proxy is `ghostwire run` (visible or
// invisible), which the bench starts and stops through lab.Appliance.
func isGhostwire(mode string) bool { return mode == modeGhostwire || mode == modeInvisible }

func isHAProxy(mode string) bool { return strings.HasPrefix(mode, "haproxy") }

// carriesUDP says whether mode can carry the UDP workloads: HAProxy has no
// transparent UDP proxy, so its modes are n/a for them.
func carriesUDP(mode string) bool { return !isHAProxy(mode) }

// hasProxy says whether mode runs a proxy process: plain and divert do not
// (divert is the diversion with nothing listening: the box routes).
func hasProxy(mode string) bool { return mode != modePlain && mode != modeDivert }

// workload describes one measured figure.
type workload struct {
	Key          string
	Name         string
	Unit         string
	HigherBetter bool
	Proxied      bool   // only meaningful with a proxy (memory, proxy CPU)
	Short        string // name in the ratio table
	UDP          bool   // a UDP figure: n/a for the HAProxy modes
}

const (
	wlIperf1    = "iperf3-1"
	wlIperf1CPU = "iperf3-1-cpu"
	wlIperf4    = "iperf3-4"
	wlIperf4CPU = "iperf3-4-cpu"
	wlHTTPClose = "http-close"
	wlCloseP99  = "http-close-p99"
	wlCloseCPU  = "http-close-cpu"
	wlKeepAlive = "http-keepalive"
	wlKeepP99   = "http-keepalive-p99"
	wlKeepCPU   = "http-keepalive-cpu"
	wlMemPer    = "rss-per-conn"

	wlUDP1400     = "udp-1400"
	wlUDP1400Loss = "udp-1400-loss"
	wlUDP1400CPU  = "udp-1400-cpu"
	wlUDP64       = "udp-64"
	wlUDP64Loss   = "udp-64-loss"
	wlUDP64CPU    = "udp-64-cpu"
	wlUDPMemPer   = "udp-rss"
)

// workloadKeys are the workloads -workloads can name (each brings the rows
// under it: p99, loss, proxy CPU).
var workloadKeys = []string{wlIperf1, wlIperf4, wlHTTPClose, wlKeepAlive, wlMemPer, wlUDP1400, wlUDP64, wlUDPMemPer}

// isUDPWorkload says whether key is one of the UDP workloads.
func isUDPWorkload(key string) bool { return key == wlUDP1400 || key == wlUDP64 || key == wlUDPMemPer }

// Units of the proxy-CPU figures: CPU seconds (utime+stime) of the proxy
// process(es) over the whole workload run, per GiB that iperf3 sent (UDP:
// that the iperf3 server received), per 10,000 requests wrk completed and
// per million datagrams the bench's UDP sink counted.
const (
	unitCPUPerGiB = "s/GiB"
	unitCPUPer10k = "s/10k req"
	unitCPUPerM   = "s/M dgram" // per million datagrams the UDP sink counted
)

var workloads = []workload{
	{wlIperf1, "iperf3 1 stream", "Gbit/s", true, false, "iperf3 1 stream", false},
	{wlIperf1CPU, "  proxy CPU", unitCPUPerGiB, false, true, "  its proxy CPU", false},
	{wlIperf4, "iperf3 4 streams", "Gbit/s", true, false, "iperf3 4 streams", false},
	{wlIperf4CPU, "  proxy CPU", unitCPUPerGiB, false, true, "  its proxy CPU", false},
	{wlHTTPClose, "HTTP new conn/request", "req/s", true, false, "HTTP new conn/request", false},
	{wlCloseP99, "  p99 latency", "ms", false, false, "  its p99 latency", false},
	{wlCloseCPU, "  proxy CPU", unitCPUPer10k, false, true, "  its proxy CPU", false},
	{wlKeepAlive, "HTTP keep-alive", "req/s", true, false, "HTTP keep-alive", false},
	{wlKeepP99, "  p99 latency", "ms", false, false, "  its p99 latency", false},
	{wlKeepCPU, "  proxy CPU", unitCPUPer10k, false, true, "  its proxy CPU", false},
	{wlMemPer, "RSS per idle conn", "KiB", false, true, "RSS per idle conn", false},
	{wlUDP1400, "UDP 1400 B datagrams", "Gbit/s", true, false, "UDP 1400 B datagrams", true},
	{wlUDP1400Loss, "  loss", "%", false, false, "  its loss", true},
	{wlUDP1400CPU, "  proxy CPU", unitCPUPerGiB, false, true, "  its proxy CPU", true},
	{wlUDP64, "UDP 64 B datagrams", "dgram/s", true, false, "UDP 64 B datagrams", true},
	{wlUDP64Loss, "  loss", "%", false, false, "  its loss", true},
	{wlUDP64CPU, "  proxy CPU", unitCPUPerM, false, true, "  its proxy CPU", true},
	{wlUDPMemPer, "RSS per idle UDP session", "KiB", false, true, "RSS per idle UDP session", true},
}

// cpuPerWork is proxy CPU seconds per unit of work: per GiB for bytes, per
// 10,000 for requests, per million for datagrams. ok is false without work to divide by.
func cpuPerWork(cpuSeconds, work float64, unit string) (v float64, ok bool) {
	if work <= 0 || cpuSeconds < 0 || math.IsNaN(cpuSeconds) {
		return 0, false
	}
	switch unit {
	case unitCPUPerGiB:
		return cpuSeconds / (work / (1 << 30)), true
	case unitCPUPer10k:
		return cpuSeconds / (work / 10000), true
	case unitCPUPerM:
		return cpuSeconds / (work / 1e6), true
	}
	return 0, false
}

func workloadByKey(k string) workload {
	for _, w := range workloads {
		if w.Key == k {
			return w
		}
	}
	panic("unknown workload " + k)
}

// sample is one measurement of one workload in one mode and round.
type sample struct {
	Round    int     `json:"round"`
	Mode     string  `json:"mode"`
	Workload string  `json:"workload"`
	Value    float64 `json:"value"`
	Unit     string  `json:"unit"`
	// ProxyCPU is the proxy process's CPU time over the run, in cores
	// (1.0 = one core busy the whole time); absent without a proxy.
	ProxyCPU *float64 `json:"proxy_cpu_cores,omitempty"`
	// ProxyCPUSeconds is the same as utime+stime seconds (HAProxy: summed
	// over its processes), and Work what the run did in that time (bytes
	// iperf3 sent, requests wrk completed): the "proxy CPU" rows are
	// ProxyCPUSeconds per GiB or per 10k of Work.
	ProxyCPUSeconds *float64 `json:"proxy_cpu_s,omitempty"`
	Work            float64  `json:"work,omitempty"`
	WorkUnit        string   `json:"work_unit,omitempty"`
	// BoxCPU is the whole machine's busy share, in cores.
	BusyCPU *float64 `json:"machine_busy_cores,omitempty"`
	Errors  int64    `json:"errors,omitempty"`
	Note    string   `json:"note,omitempty"`
}

// summary is median and range of one workload in one mode.
type summary struct {
	Median float64 `json:"median"`
	Min    float64 `json:"min"`
	Max    float64 `json:"max"`
	N      int     `json:"n"`
}

func summarize(v []float64) summary {
	if len(v) == 0 {
		return summary{Median: math.NaN(), Min: math.NaN(), Max: math.NaN()}
	}
	s := slices.Clone(v)
	slices.Sort(s)
	n := len(s)
	med := s[n/2]
	if n%2 == 0 {
		med = (s[n/2-1] + s[n/2]) / 2
	}
	return summary{Median: med, Min: s[0], Max: s[n-1], N: n}
}

// summaries groups samples: workload -> mode -> summary.
func summaries(samples []sample) map[string]map[string]summary {
	vals := map[string]map[string][]float64{}
	for _, s := range samples {
		if vals[s.Workload] == nil {
			vals[s.Workload] = map[string][]float64{}
		}
		vals[s.Workload][s.Mode] = append(vals[s.Workload][s.Mode], s.Value)
	}
	out := map[string]map[string]summary{}
	for w, byMode := range vals {
		out[w] = map[string]summary{}
		for m, v := range byMode {
			out[w][m] = summarize(v)
		}
	}
	return out
}

// comparison is ghostwire's median against plain, divert (the diversion
// with the box routing, no proxy), the best HAProxy mode and haproxy-splice
// (a target can name that mode rather than the best).
type comparison struct {
	Workload    string  `json:"workload"`
	Ghostwire   float64 `json:"ghostwire"`
	VsPlain     float64 `json:"vs_plain,omitempty"`     // ghostwire / plain
	VsDivert    float64 `json:"vs_divert,omitempty"`    // ghostwire / divert
	DivertVal   float64 `json:"divert_value,omitempty"` //
	VsHAProxy   float64 `json:"vs_best_haproxy"`        // ghostwire / best HAProxy
	BestHAProxy string  `json:"best_haproxy_mode"`      // which HAProxy mode was best
	HAProxyVal  float64 `json:"best_haproxy_value"`     //
	PlainVal    float64 `json:"plain_value,omitempty"`  //
	Higher      bool    `json:"higher_is_better"`       //

	// haproxy-splice itself, best or not: issue 11's iperf3 targets
	VsSplice  float64 `json:"vs_haproxy_splice,omitempty"`    // ghostwire / haproxy-splice
	SpliceVal float64 `json:"haproxy_splice_value,omitempty"` //
}

// compare computes ratios from medians. "Best" HAProxy is the highest
// median for higher-is-better figures and the lowest otherwise.
func compare(sum map[string]map[string]summary) []comparison {
	var out []comparison
	for _, w := range workloads {
		byMode := sum[w.Key]
		gw, ok := byMode[modeGhostwire]
		if !ok {
			continue
		}
		c := comparison{Workload: w.Key, Ghostwire: gw.Median, Higher: w.HigherBetter}
		if p, ok := byMode[modePlain]; ok && p.Median != 0 {
			c.PlainVal = p.Median
			c.VsPlain = gw.Median / p.Median
		}
		if d, ok := byMode[modeDivert]; ok && d.Median != 0 {
			c.DivertVal = d.Median
			c.VsDivert = gw.Median / d.Median
		}
		if h, ok := byMode[modeHAProxySplice]; ok && h.Median != 0 {
			c.SpliceVal = h.Median
			c.VsSplice = gw.Median / h.Median
		}
		for _, m := range allModes {
			h, ok := byMode[m]
			if !isHAProxy(m) || !ok {
				continue
			}
			better := c.BestHAProxy == "" ||
				(w.HigherBetter && h.Median > c.HAProxyVal) ||
				(!w.HigherBetter && h.Median < c.HAProxyVal)
			if better {
				c.BestHAProxy, c.HAProxyVal = m, h.Median
			}
		}
		if c.BestHAProxy != "" && c.HAProxyVal != 0 {
			c.VsHAProxy = gw.Median / c.HAProxyVal
		}
		out = append(out, c)
	}
	return out
}

// target is one of the issue's goals for ghostwire.
type target struct {
	Workload string  `json:"workload"`
	Against  string  `json:"against"` // "plain", "haproxy" (best mode), "haproxy-splice", "ghostwire" (invisibleTargets) or "absolute"
	Op       string  `json:"op"`      // ">=" or "<="
	Want     float64 `json:"want"`
	Got      float64 `json:"got"`
	Pass     bool    `json:"pass"`
	Measured bool    `json:"measured"`
}

func (t target) String() string {
	switch t.Against {
	case "plain":
		return fmt.Sprintf("%s %.2g× plain", t.Op, t.Want)
	case "haproxy":
		return fmt.Sprintf("%s %.2g× best HAProxy", t.Op, t.Want)
	case modeHAProxySplice, modeGhostwire:
		return fmt.Sprintf("%s %.2g× %s", t.Op, t.Want, t.Against)
	default:
		return fmt.Sprintf("%s %g %s", t.Op, t.Want, workloadByKey(t.Workload).Unit)
	}
}

// issueTargets are issue 11's targets: ratios of medians from the same run
// (HTTP against the best HAProxy mode, iperf3 against haproxy-splice
// whichever HAProxy mode is best) and an absolute bound on memory; and
// issue 12's for transparent UDP, which HAProxy cannot proxy: ratios to
// plain and an absolute bound on memory per idle session. The other plain
// ratios are information only.
var issueTargets = []target{
	{Workload: wlIperf1, Against: modeHAProxySplice, Op: ">=", Want: 1.3},
	{Workload: wlIperf4, Against: modeHAProxySplice, Op: ">=", Want: 1.1},
	{Workload: wlHTTPClose, Against: "haproxy", Op: ">=", Want: 1.0},
	{Workload: wlKeepAlive, Against: "haproxy", Op: ">=", Want: 1.0},
	{Workload: wlMemPer, Against: "absolute", Op: "<=", Want: 4.5},
	{Workload: wlUDP1400, Against: "plain", Op: ">=", Want: 0.6},
	{Workload: wlUDP64, Against: "plain", Op: ">=", Want: 0.5},
	{Workload: wlUDPMemPer, Against: "absolute", Op: "<=", Want: 2},
}

// evaluate fills Got/Pass for each target from the comparisons.
func evaluate(targets []target, cmp []comparison) []target {
	return evaluateBy(targets, func(t target) (float64, bool) {
		for _, c := range cmp {
			if c.Workload != t.Workload {
				continue
			}
			switch t.Against {
			case "plain":
				return c.VsPlain, c.PlainVal != 0
			case "haproxy":
				return c.VsHAProxy, c.BestHAProxy != ""
			case modeHAProxySplice:
				return c.VsSplice, c.SpliceVal != 0
			default:
				return c.Ghostwire, true
			}
		}
		return 0, false
	})
}

// evaluateBy fills Got/Pass for each target with what got finds for it
// (false: not measured).
func evaluateBy(targets []target, got func(target) (float64, bool)) []target {
	out := slices.Clone(targets)
	for i := range out {
		t := &out[i]
		t.Got, t.Measured = got(*t)
		if t.Measured {
			if t.Op == ">=" {
				t.Pass = t.Got >= t.Want
			} else {
				t.Pass = t.Got <= t.Want
			}
		}
	}
	return out
}

// invComparison is ghostwire-invisible's median as a fraction of
// ghostwire's (visible) from the same run: what bridge.invisible costs.
type invComparison struct {
	Workload  string  `json:"workload"`
	Invisible float64 `json:"invisible"`
	Visible   float64 `json:"visible"`
	Ratio     float64 `json:"ratio"` // invisible / visible
	Higher    bool    `json:"higher_is_better"`
}

// compareInvisible is invComparison for every workload both ghostwire
// modes measured.
func compareInvisible(sum map[string]map[string]summary) []invComparison {
	var out []invComparison
	for _, w := range workloads {
		inv, ok := sum[w.Key][modeInvisible]
		vis, ok2 := sum[w.Key][modeGhostwire]
		if !ok || !ok2 || vis.Median == 0 {
			continue
		}
		out = append(out, invComparison{Workload: w.Key, Invisible: inv.Median, Visible: vis.Median,
			Ratio: inv.Median / vis.Median, Higher: w.HigherBetter})
	}
	return out
}

// invisibleTargets are issue 15's: invisible costs at most 5% of the
// Gbit/s (every bulk figure, TCP and UDP) and of the connections per
// second (HTTP new conn/request) of visible ghostwire in the same run.
// The other ratios (keep-alive, 64 B datagrams, latency, CPU, memory) are
// information only.
var invisibleTargets = []target{
	{Workload: wlIperf1, Against: modeGhostwire, Op: ">=", Want: 0.95},
	{Workload: wlIperf4, Against: modeGhostwire, Op: ">=", Want: 0.95},
	{Workload: wlHTTPClose, Against: modeGhostwire, Op: ">=", Want: 0.95},
	{Workload: wlUDP1400, Against: modeGhostwire, Op: ">=", Want: 0.95},
}

// evaluateInvisible fills Got/Pass for invisibleTargets.
func evaluateInvisible(targets []target, inv []invComparison) []target {
	return evaluateBy(targets, func(t target) (float64, bool) {
		for _, c := range inv {
			if c.Workload == t.Workload {
				return c.Ratio, true
			}
		}
		return 0, false
	})
}

func fmtVal(v float64) string {
	switch {
	case math.IsNaN(v):
		return "-"
	case v == 0:
		return "0"
	case math.Abs(v) < 0.001:
		return "<0.001"
	case math.Abs(v) < 0.1: // proxy CPU per unit can be this small
		return fmt.Sprintf("%.3f", v)
	case math.Abs(v) >= 1e6: // datagrams per second
		return fmt.Sprintf("%.2fM", v/1e6)
	case math.Abs(v) >= 1000:
		return fmt.Sprintf("%.1fk", v/1000)
	case math.Abs(v) >= 100:
		return fmt.Sprintf("%.0f", v)
	case math.Abs(v) >= 10:
		return fmt.Sprintf("%.1f", v)
	default:
		return fmt.Sprintf("%.2f", v)
	}
}

// fmtRatio is a ratio to two decimals, or three below 0.1 (a proxy CPU
// ratio can be that small once the kernel relays a connection).
func fmtRatio(r float64) string {
	if r != 0 && math.Abs(r) < 0.1 {
		return fmt.Sprintf("%.3f", r)
	}
	return fmt.Sprintf("%.2f", r)
}

func fmtSummary(s summary) string {
	if s.N == 0 {
		return "-"
	}
	if s.N == 1 {
		return fmtVal(s.Median)
	}
	return fmt.Sprintf("%s (%s–%s)", fmtVal(s.Median), fmtVal(s.Min), fmtVal(s.Max))
}

// writeReport prints the results table, the ratios and the targets.
func writeReport(w io.Writer, samples []sample, modes []string) {
	sum := summaries(samples)
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprint(tw, "workload\tunit")
	for _, m := range modes {
		fmt.Fprintf(tw, "\t%s", m)
	}
	fmt.Fprintln(tw)
	for _, wl := range workloads {
		byMode, ok := sum[wl.Key]
		if !ok {
			continue
		}
		fmt.Fprintf(tw, "%s\t%s", wl.Name, wl.Unit)
		for _, m := range modes {
			if s, ok := byMode[m]; ok {
				fmt.Fprintf(tw, "\t%s", fmtSummary(s))
			} else if wl.Proxied && !hasProxy(m) || wl.UDP && !carriesUDP(m) {
				fmt.Fprint(tw, "\tn/a")
			} else {
				fmt.Fprint(tw, "\t-")
			}
		}
		fmt.Fprintln(tw)
	}
	tw.Flush()
	fmt.Fprintln(w, "(median (min–max) over rounds; proxy CPU: the proxy's utime+stime over the whole run (HAProxy: all its processes),")
	fmt.Fprintf(w, " per GiB iperf3 sent (UDP: received), per 10k requests wrk completed or per million datagrams the UDP sink counted;\n")
	fmt.Fprintf(w, " softirq and kworker time it causes is not in it; %s; HAProxy has no transparent UDP proxy: n/a)\n", clkTckNote())

	cmp := compare(sum)
	if len(cmp) == 0 {
		return
	}
	fmt.Fprintln(w)
	tw = tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "ghostwire\t× plain\t× divert\t× best HAProxy\ttarget\tresult")
	evald := evaluate(issueTargets, cmp)
	for _, c := range cmp {
		wl := workloadByKey(c.Workload)
		vsPlain := "-"
		if c.PlainVal != 0 {
			vsPlain = fmtRatio(c.VsPlain)
		}
		vsDivert := "-"
		if c.DivertVal != 0 {
			vsDivert = fmtRatio(c.VsDivert)
		}
		vsHAP := "-"
		if wl.UDP {
			vsHAP = "n/a"
		} else if c.BestHAProxy != "" {
			vsHAP = fmt.Sprintf("%s (%s)", fmtRatio(c.VsHAProxy), c.BestHAProxy)
		}
		var goals, results []string
		for _, t := range evald {
			if t.Workload != c.Workload {
				continue
			}
			goal := t.String()
			if t.Against == modeHAProxySplice && t.Measured {
				// the × best HAProxy column may show another mode
				goal += " (" + fmtRatio(t.Got) + ")"
			}
			goals = append(goals, goal)
			results = append(results, verdict(t))
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\n", wl.Short, vsPlain, vsDivert, vsHAP, strings.Join(goals, ", "), strings.Join(results, " "))
	}
	tw.Flush()
	fmt.Fprintln(w, "(ratios of medians; for p99, loss, proxy CPU and RSS lower is better, so a ratio below 1 favours ghostwire;")
	fmt.Fprintln(w, " divert: the diversion in place, nothing listening, the box routes: the fail-open cost and the ceiling of any proxy on this path)")
	writeInvisibleReport(w, sum)
}

// writeInvisibleReport prints invisible ÷ visible ghostwire for every
// workload both ran, issue 15's targets against it, and one verdict line.
func writeInvisibleReport(w io.Writer, sum map[string]map[string]summary) {
	inv := compareInvisible(sum)
	if len(inv) == 0 {
		return
	}
	evald := evaluateInvisible(invisibleTargets, inv)
	fmt.Fprintln(w)
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintf(tw, "%s\t× %s\ttarget\tresult\n", modeInvisible, modeGhostwire)
	for _, c := range inv {
		goal, result := "", ""
		for _, t := range evald {
			if t.Workload == c.Workload {
				goal, result = t.String(), verdict(t)
			}
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", workloadByKey(c.Workload).Short, fmtRatio(c.Ratio), goal, result)
	}
	tw.Flush()
	fmt.Fprintln(w, "(invisible ÷ visible ghostwire, ratios of medians from the same run: what bridge.invisible costs;")
	fmt.Fprintln(w, " for p99, loss, proxy CPU and RSS lower is better, so a ratio above 1 is a cost there)")
	var measured, passed int
	var missed []string
	for _, t := range evald {
		if !t.Measured {
			continue
		}
		measured++
		if t.Pass {
			passed++
		} else {
			missed = append(missed, fmt.Sprintf("%s %s", workloadByKey(t.Workload).Short, fmtRatio(t.Got)))
		}
	}
	switch {
	case measured == 0:
		fmt.Fprintln(w, "issue 15, invisible >= 0.95× visible in Gbit/s and connections/s: n/a (none of its workloads ran in both modes)")
	case passed == measured:
		fmt.Fprintf(w, "issue 15, invisible >= 0.95× visible in Gbit/s and connections/s: PASS (%d of %d)\n", passed, measured)
	default:
		fmt.Fprintf(w, "issue 15, invisible >= 0.95× visible in Gbit/s and connections/s: MISS (%d of %d; %s)\n",
			passed, measured, strings.Join(missed, ", "))
	}
}

// verdict is a target's result column: PASS, MISS or n/a.
func verdict(t target) string {
	switch {
	case !t.Measured:
		return "n/a"
	case t.Pass:
		return "PASS"
	}
	return "MISS"
}
