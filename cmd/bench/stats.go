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
	modeGhostwire     = "ghostwire"
	modeHAProxy       = "haproxy"
	modeHAProxySplice = "haproxy-splice"
)

var allModes = []string{modePlain, modeGhostwire, modeHAProxy, modeHAProxySplice}

func isHAProxy(mode string) bool { return strings.HasPrefix(mode, "haproxy") }

// workload describes one measured figure.
type workload struct {
	Key          string
	Name         string
	Unit         string
	HigherBetter bool
	Proxied      bool   // only meaningful with a proxy (memory)
	Short        string // name in the ratio table
}

const (
	wlIperf1    = "iperf3-1"
	wlIperf4    = "iperf3-4"
	wlHTTPClose = "http-close"
	wlCloseP99  = "http-close-p99"
	wlKeepAlive = "http-keepalive"
	wlKeepP99   = "http-keepalive-p99"
	wlMemPer    = "rss-per-conn"
)

var workloads = []workload{
	{wlIperf1, "iperf3 1 stream", "Gbit/s", true, false, "iperf3 1 stream"},
	{wlIperf4, "iperf3 4 streams", "Gbit/s", true, false, "iperf3 4 streams"},
	{wlHTTPClose, "HTTP new conn/request", "req/s", true, false, "HTTP new conn/request"},
	{wlCloseP99, "  p99 latency", "ms", false, false, "  its p99 latency"},
	{wlKeepAlive, "HTTP keep-alive", "req/s", true, false, "HTTP keep-alive"},
	{wlKeepP99, "  p99 latency", "ms", false, false, "  its p99 latency"},
	{wlMemPer, "RSS per idle conn", "KiB", false, true, "RSS per idle conn"},
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

// comparison is ghostwire's median against plain and the best HAProxy mode.
type comparison struct {
	Workload    string  `json:"workload"`
	Ghostwire   float64 `json:"ghostwire"`
	VsPlain     float64 `json:"vs_plain,omitempty"`    // ghostwire / plain
	VsHAProxy   float64 `json:"vs_best_haproxy"`       // ghostwire / best HAProxy
	BestHAProxy string  `json:"best_haproxy_mode"`     // which HAProxy mode was best
	HAProxyVal  float64 `json:"best_haproxy_value"`    //
	PlainVal    float64 `json:"plain_value,omitempty"` //
	Higher      bool    `json:"higher_is_better"`      //
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
	Against  string  `json:"against"` // "plain", "haproxy" (best mode) or "absolute"
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
		return fmt.Sprintf("%s %.2g× HAProxy", t.Op, t.Want)
	default:
		return fmt.Sprintf("%s %g %s", t.Op, t.Want, workloadByKey(t.Workload).Unit)
	}
}

// issueTargets are issue 5's targets (ratios from the same run).
var issueTargets = []target{
	{Workload: wlIperf1, Against: "plain", Op: ">=", Want: 0.9},
	{Workload: wlIperf1, Against: "haproxy", Op: ">=", Want: 1.6},
	{Workload: wlIperf4, Against: "plain", Op: ">=", Want: 0.5},
	{Workload: wlHTTPClose, Against: "haproxy", Op: ">=", Want: 1.5},
	{Workload: wlKeepAlive, Against: "haproxy", Op: ">=", Want: 1.2},
	{Workload: wlMemPer, Against: "absolute", Op: "<=", Want: 8},
}

// evaluate fills Got/Pass for each target from the comparisons.
func evaluate(targets []target, cmp []comparison) []target {
	out := slices.Clone(targets)
	for i := range out {
		t := &out[i]
		for _, c := range cmp {
			if c.Workload != t.Workload {
				continue
			}
			switch t.Against {
			case "plain":
				t.Got, t.Measured = c.VsPlain, c.PlainVal != 0
			case "haproxy":
				t.Got, t.Measured = c.VsHAProxy, c.BestHAProxy != ""
			default:
				t.Got, t.Measured = c.Ghostwire, true
			}
		}
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

func fmtVal(v float64) string {
	switch {
	case math.IsNaN(v):
		return "-"
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
			} else if wl.Proxied && m == modePlain {
				fmt.Fprint(tw, "\tn/a")
			} else {
				fmt.Fprint(tw, "\t-")
			}
		}
		fmt.Fprintln(tw)
	}
	tw.Flush()
	fmt.Fprintln(w, "(median (min–max) over rounds)")

	cmp := compare(sum)
	if len(cmp) == 0 {
		return
	}
	fmt.Fprintln(w)
	tw = tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "ghostwire\t× plain\t× best HAProxy\ttarget\tresult")
	evald := evaluate(issueTargets, cmp)
	for _, c := range cmp {
		wl := workloadByKey(c.Workload)
		vsPlain := "-"
		if c.PlainVal != 0 {
			vsPlain = fmt.Sprintf("%.2f", c.VsPlain)
		}
		vsHAP := "-"
		if c.BestHAProxy != "" {
			vsHAP = fmt.Sprintf("%.2f (%s)", c.VsHAProxy, c.BestHAProxy)
		}
		var goals, results []string
		for _, t := range evald {
			if t.Workload != c.Workload {
				continue
			}
			goals = append(goals, t.String())
			switch {
			case !t.Measured:
				results = append(results, "n/a")
			case t.Pass:
				results = append(results, "PASS")
			default:
				results = append(results, "MISS")
			}
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\n", wl.Short, vsPlain, vsHAP, strings.Join(goals, ", "), strings.Join(results, " "))
	}
	tw.Flush()
	fmt.Fprintln(w, "(ratios of medians; for p99 and RSS lower is better, so a ratio below 1 favours ghostwire)")
}
