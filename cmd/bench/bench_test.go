package main

import (
	"bufio"
	"bytes"
	"math"
	"strings"
	"testing"
	"time"
)

func TestParseIperf3(t *testing.T) {
	out := []byte(`{"start":{},"intervals":[],"end":{"sum_sent":{"bytes":5000,"bits_per_second":2.1e10,"retransmits":3},
		"sum_received":{"bits_per_second":2.05e10}}}`)
	r, err := parseIperf3(out)
	if err != nil {
		t.Fatal(err)
	}
	if math.Abs(r.Gbps-20.5) > 1e-9 || r.Retransmits != 3 || r.Bytes != 5000 {
		t.Errorf("got %+v, want 20.5 Gbit/s, 3 retransmits, 5000 bytes", r)
	}
	// the intervals, omitted ones included, are the whole run's bytes
	out = []byte(`{"intervals":[{"sum":{"bytes":1000,"omitted":true}},{"sum":{"bytes":2000,"omitted":false}}],
		"end":{"sum_sent":{"bytes":2000,"bits_per_second":1e9},"sum_received":{"bits_per_second":1e9}}}`)
	if r, err := parseIperf3(out); err != nil || r.Bytes != 3000 {
		t.Errorf("with an omitted interval: %+v, %v; want 3000 bytes", r, err)
	}
	if _, err := parseIperf3([]byte(`{"error":"unable to connect to server: Connection refused"}`)); err == nil ||
		!strings.Contains(err.Error(), "Connection refused") {
		t.Errorf("iperf3 error field not reported: %v", err)
	}
	if _, err := parseIperf3([]byte(`not json`)); err == nil {
		t.Error("garbage parsed")
	}
}

const wrkOut = `Running 2s test @ http://192.0.2.2:80/
  2 threads and 64 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     2.46ms    1.02ms  21.94ms   80.21%
    Req/Sec    13.12k   612.37    14.25k    70.00%
  Latency Distribution
     50%    2.30ms
     75%    2.88ms
     90%    3.62ms
     99%  812.50us
  52274 requests in 2.00s, 5.13MB read
  Socket errors: connect 0, read 12, write 1, timeout 2
  Non-2xx or 3xx responses: 4
Requests/sec:  26119.85
Transfer/sec:      2.56MB
`

func TestParseWrk(t *testing.T) {
	r, err := parseWrk([]byte(wrkOut))
	if err != nil {
		t.Fatal(err)
	}
	want := wrkResult{ReqPerSec: 26119.85, P99: 812500 * time.Nanosecond, Requests: 52274, Errors: 19}
	if r != want {
		t.Errorf("got %+v, want %+v", r, want)
	}
	if _, err := parseWrk([]byte("unable to connect to 192.0.2.2:80 Connection refused\n")); err == nil {
		t.Error("wrk failure parsed as a result")
	}
}

func TestParseWrkDuration(t *testing.T) {
	for in, want := range map[string]time.Duration{
		"812.00us": 812 * time.Microsecond, "1.50ms": 1500 * time.Microsecond,
		"2.00s": 2 * time.Second, "1.00m": time.Minute,
	} {
		got, err := parseWrkDuration(in)
		if err != nil || got != want {
			t.Errorf("%s: got %v, %v; want %v", in, got, err, want)
		}
	}
	if _, err := parseWrkDuration("3.0x"); err == nil {
		t.Error("unknown unit accepted")
	}
}

func TestParseProc(t *testing.T) {
	rss, err := parseVmRSS([]byte("Name:\tghostwire\nVmPeak:\t  9000 kB\nVmRSS:\t   12345 kB\nThreads:\t5\n"))
	if err != nil || rss != 12345 {
		t.Errorf("VmRSS: got %d, %v", rss, err)
	}
	if _, err := parseVmRSS([]byte("Name:\tkthreadd\n")); err == nil {
		t.Error("missing VmRSS not reported")
	}
	// comm with a space and a parenthesis; utime 150, stime 50
	stat := "4242 (gw (x) y) S 1 4242 4242 0 -1 4194560 100 0 0 0 150 50 0 0 20 0 7 0 100 0 0"
	if p, err := parseProcStat([]byte(stat)); err != nil || p != (procStat{pid: 4242, ppid: 1, ticks: 200}) {
		t.Errorf("stat: got %+v, %v", p, err)
	}
	if _, err := parseProcStat([]byte("4242 gw S 1")); err == nil {
		t.Error("stat without (comm) parsed")
	}
}

func TestTreeTicks(t *testing.T) {
	procs := []procStat{
		{pid: 1, ppid: 0, ticks: 1000},
		{pid: 10, ppid: 1, ticks: 5},    // haproxy master
		{pid: 11, ppid: 10, ticks: 300}, // its worker
		{pid: 12, ppid: 11, ticks: 7},   // a grandchild
		{pid: 20, ppid: 1, ticks: 50},   // unrelated
	}
	if got, ok := treeTicks(procs, 10); !ok || got != 312 {
		t.Errorf("tree of 10: %d, %v; want 312", got, ok)
	}
	if got, ok := treeTicks(procs, 20); !ok || got != 50 {
		t.Errorf("tree of 20: %d, %v; want 50", got, ok)
	}
	if _, ok := treeTicks(procs, 99); ok {
		t.Error("a missing pid has a tree")
	}
}

func TestClkTck(t *testing.T) {
	if hz, ok := clkTckOf([][2]uintptr{{6, 4096}, {atClkTck, 250}, {0, 0}}); !ok || hz != 250 {
		t.Errorf("AT_CLKTCK 250: got %d, %v", hz, ok)
	}
	if hz, ok := clkTckOf([][2]uintptr{{6, 4096}}); ok || hz != 100 {
		t.Errorf("no AT_CLKTCK: got %d, %v; want the assumed 100", hz, ok)
	}
	// this process's: Linux always passes it
	if !clkTckFromAuxv || clkTck <= 0 {
		t.Errorf("AT_CLKTCK of this process: %d, %v", clkTck, clkTckFromAuxv)
	}
}

func TestCPUPerWork(t *testing.T) {
	for _, tc := range []struct {
		cpu, work float64
		unit      string
		want      float64
		ok        bool
	}{
		{2, 4 << 30, unitCPUPerGiB, 0.5, true}, // 2 s over 4 GiB
		{3, 60000, unitCPUPer10k, 0.5, true},   // 3 s over 60k requests
		{0, 60000, unitCPUPer10k, 0, true},     // the sockmap offload can cost the process nothing
		{1, 0, unitCPUPer10k, 0, false},        // nothing done
		{1, 1000, "KiB", 0, false},             // not a CPU unit
		{math.NaN(), 1000, unitCPUPer10k, 0, false},
	} {
		got, ok := cpuPerWork(tc.cpu, tc.work, tc.unit)
		if ok != tc.ok || math.Abs(got-tc.want) > 1e-12 {
			t.Errorf("cpuPerWork(%v, %v, %s) = %v, %v; want %v, %v", tc.cpu, tc.work, tc.unit, got, ok, tc.want, tc.ok)
		}
	}
}

func TestFmtVal(t *testing.T) {
	for v, want := range map[float64]string{
		0: "0", 0.0004: "<0.001", 0.0123: "0.012", 0.5: "0.50", 12.34: "12.3", 123.4: "123", 41800: "41.8k",
	} {
		if got := fmtVal(v); got != want {
			t.Errorf("fmtVal(%v) = %q, want %q", v, got, want)
		}
	}
	if fmtVal(math.NaN()) != "-" {
		t.Error("NaN")
	}
}

func TestParseSnmpForwarding(t *testing.T) {
	snmp := "Ip: Forwarding DefaultTTL InReceives ForwDatagrams OutRequests\n" +
		"Ip: 1 64 5000 1234 400\n" +
		"Icmp: InMsgs\nIcmp: 0\n"
	on, n, err := parseSnmpForwarding([]byte(snmp))
	if err != nil || !on || n != 1234 {
		t.Errorf("got %v, %d, %v; want on, 1234", on, n, err)
	}
	on, _, err = parseSnmpForwarding([]byte(strings.Replace(snmp, "Ip: 1 ", "Ip: 2 ", 1)))
	if err != nil || on {
		t.Errorf("Forwarding 2 read as on (%v)", err)
	}
	if _, _, err := parseSnmpForwarding([]byte("Icmp: InMsgs\nIcmp: 0\n")); err == nil {
		t.Error("no Ip lines parsed")
	}
}

func TestSummarize(t *testing.T) {
	for _, tc := range []struct {
		in   []float64
		want summary
	}{
		{[]float64{3, 1, 2}, summary{Median: 2, Min: 1, Max: 3, N: 3}},
		{[]float64{4, 1, 3, 2}, summary{Median: 2.5, Min: 1, Max: 4, N: 4}},
		{[]float64{7}, summary{Median: 7, Min: 7, Max: 7, N: 1}},
	} {
		if got := summarize(tc.in); got != tc.want {
			t.Errorf("summarize(%v) = %+v, want %+v", tc.in, got, tc.want)
		}
	}
	if s := summarize(nil); !math.IsNaN(s.Median) || s.N != 0 {
		t.Errorf("empty: %+v", s)
	}
}

func samplesFor(w string, byMode map[string][]float64) []sample {
	var out []sample
	for m, vs := range byMode {
		for i, v := range vs {
			out = append(out, sample{Round: i + 1, Mode: m, Workload: w, Value: v})
		}
	}
	return out
}

func TestCompareAndTargets(t *testing.T) {
	var s []sample
	// iperf3 1 stream: plain HAProxy is the best mode (14), haproxy-splice
	// slower (12); the target is judged against haproxy-splice: 16/12
	// passes 1.3 where 16/14 would not
	s = append(s, samplesFor(wlIperf1, map[string][]float64{
		modePlain: {20, 21, 22}, modeGhostwire: {15, 16, 17}, modeHAProxy: {13, 14, 15}, modeHAProxySplice: {11, 12, 13},
	})...)
	// iperf3 4 streams without haproxy-splice: no target verdict, though
	// there is a best HAProxy
	s = append(s, samplesFor(wlIperf4, map[string][]float64{
		modeGhostwire: {12}, modeHAProxy: {10},
	})...)
	// HTTP against the best HAProxy mode, here haproxy-splice
	s = append(s, samplesFor(wlHTTPClose, map[string][]float64{
		modeGhostwire: {10000}, modeHAProxy: {9000}, modeHAProxySplice: {9500},
	})...)
	s = append(s, samplesFor(wlKeepAlive, map[string][]float64{
		modePlain: {90000}, modeGhostwire: {40000}, modeHAProxy: {50000}, modeHAProxySplice: {45000},
	})...)
	s = append(s, samplesFor(wlMemPer, map[string][]float64{
		modeGhostwire: {4.5}, modeHAProxy: {3}, modeHAProxySplice: {4},
	})...)
	cmp := compare(summaries(s))
	if len(cmp) != 5 {
		t.Fatalf("comparisons: %+v", cmp)
	}
	near := func(a, b float64) bool { return math.Abs(a-b) < 1e-9 }
	c := cmp[0]
	if c.Workload != wlIperf1 || c.BestHAProxy != modeHAProxy || !near(c.VsPlain, 16.0/21) ||
		!near(c.VsHAProxy, 16.0/14) || c.SpliceVal != 12 || !near(c.VsSplice, 16.0/12) {
		t.Errorf("iperf3-1: %+v", c)
	}
	if c := cmp[1]; c.Workload != wlIperf4 || c.BestHAProxy != modeHAProxy || c.SpliceVal != 0 || c.VsSplice != 0 {
		t.Errorf("iperf3-4: %+v", c)
	}
	if c := cmp[2]; c.Workload != wlHTTPClose || c.BestHAProxy != modeHAProxySplice || !near(c.VsHAProxy, 10000.0/9500) {
		t.Errorf("http-close: %+v", c)
	}
	// lower is better for memory: the best HAProxy is the smaller one
	if m := cmp[4]; m.BestHAProxy != modeHAProxy || m.VsPlain != 0 || m.PlainVal != 0 {
		t.Errorf("rss: %+v", m)
	}

	got := evaluate(issueTargets, cmp)
	res := map[string]string{}
	gotVal := map[string]float64{}
	for _, tg := range got {
		v := "n/a"
		if tg.Measured {
			v = map[bool]string{true: "PASS", false: "MISS"}[tg.Pass]
		}
		res[tg.Workload+" "+tg.Against] = v
		gotVal[tg.Workload+" "+tg.Against] = tg.Got
	}
	want := map[string]string{
		"iperf3-1 haproxy-splice": "PASS", // 16/12 = 1.33 >= 1.3 (16/14 against the best would miss)
		"iperf3-4 haproxy-splice": "n/a",  // haproxy-splice not run
		"http-close haproxy":      "PASS", // 10000/9500 = 1.05 >= 1.0
		"http-keepalive haproxy":  "MISS", // 40000/50000 = 0.8 < 1.0
		"rss-per-conn absolute":   "PASS", // 4.5 <= 4.5
	}
	if len(res) != len(want) {
		t.Errorf("targets %v, want %v", res, want)
	}
	for k, v := range want {
		if res[k] != v {
			t.Errorf("%s: %s, want %s", k, res[k], v)
		}
	}
	if g := gotVal["iperf3-1 haproxy-splice"]; !near(g, 16.0/12) {
		t.Errorf("iperf3-1 against haproxy-splice: got %v, want %v", g, 16.0/12)
	}
	if g := gotVal["http-keepalive haproxy"]; !near(g, 0.8) {
		t.Errorf("keep-alive against the best HAProxy: got %v, want 0.8", g)
	}

	// haproxy-splice just under 1.3×, the best HAProxy well under it: MISS;
	// a little more memory than 4.5 KiB: MISS
	s = samplesFor(wlIperf1, map[string][]float64{modeGhostwire: {12.9}, modeHAProxy: {5}, modeHAProxySplice: {10}})
	s = append(s, samplesFor(wlMemPer, map[string][]float64{modeGhostwire: {4.6}})...)
	for _, tg := range evaluate(issueTargets, compare(summaries(s))) {
		switch tg.Workload {
		case wlIperf1, wlMemPer:
			if !tg.Measured || tg.Pass {
				t.Errorf("%s %s: measured %v, pass %v (got %v); want MISS", tg.Workload, tg.Against, tg.Measured, tg.Pass, tg.Got)
			}
		default:
			if tg.Measured {
				t.Errorf("%s %s measured without samples", tg.Workload, tg.Against)
			}
		}
	}
}

func TestReport(t *testing.T) {
	s := samplesFor(wlIperf1, map[string][]float64{
		modePlain: {20, 21, 22}, modeDivert: {15, 16, 17}, modeGhostwire: {10, 11, 12}, modeHAProxy: {8, 9, 10}, modeHAProxySplice: {11},
	})
	s = append(s, samplesFor(wlIperf1CPU, map[string][]float64{
		modeGhostwire: {0.3, 0.25, 0.2}, modeHAProxy: {0.5}, modeHAProxySplice: {0.4},
	})...)
	s = append(s, samplesFor(wlKeepCPU, map[string][]float64{
		modeGhostwire: {0.004}, modeHAProxy: {0.5}, modeHAProxySplice: {0.6},
	})...)
	var buf bytes.Buffer
	writeReport(&buf, s, allModes)
	out := buf.String()
	for _, want := range []string{"21.0 (20.0–22.0)", "16.0 (15.0–17.0)", "11.0 (10.0–12.0)", "0.52", "0.69",
		"1.00 (haproxy-splice)", ">= 1.3× haproxy-splice (1.00)", "× divert", "s/GiB", "s/10k req",
		"0.25 (0.20–0.30)", "0.62 (haproxy-splice)", "0.008 (haproxy)", "0.004"} {
		if !strings.Contains(out, want) {
			t.Errorf("report lacks %q:\n%s", want, out)
		}
	}
	// the CPU rows: n/a without a proxy (plain, divert), and the ratio
	// table has no plain or divert ratio for them
	lines := strings.Split(out, "\n")
	var cpuRows, ratioRows []string
	for _, l := range lines {
		if strings.HasPrefix(l, "  proxy CPU") {
			cpuRows = append(cpuRows, l)
		}
		if strings.HasPrefix(l, "  its proxy CPU") {
			ratioRows = append(ratioRows, l)
		}
	}
	if len(cpuRows) != 2 || len(ratioRows) != 2 {
		t.Fatalf("proxy CPU rows: %q, ratios %q:\n%s", cpuRows, ratioRows, out)
	}
	for _, r := range cpuRows {
		if strings.Count(r, "n/a") != 2 {
			t.Errorf("plain and divert are not n/a in %q", r)
		}
	}
	if f := strings.Fields(ratioRows[0]); len(f) < 6 || f[3] != "-" || f[4] != "-" || f[5] != "0.62" {
		t.Errorf("iperf3-1 CPU ratios: %q", ratioRows[0])
	}
	// iperf3 1 stream: 11 / 21 plain, 11 / 16 divert, 11 / 11 splice;
	// the one target, 1.3× haproxy-splice, missed
	found := false
	for _, l := range lines {
		if strings.HasPrefix(l, "iperf3 1 stream") && strings.HasSuffix(l, ">= 1.3× haproxy-splice (1.00)  MISS") {
			found = true
			if f := strings.Fields(l); len(f) < 7 || f[3] != "0.52" || f[4] != "0.69" || f[5] != "1.00" {
				t.Errorf("iperf3-1 ratios: %q", l)
			}
		}
	}
	if !found {
		t.Errorf("no iperf3-1 ratio row:\n%s", out)
	}

	// haproxy-splice not the best mode: the row's × best HAProxy is against
	// haproxy, the target against haproxy-splice, with its own ratio
	buf.Reset()
	writeReport(&buf, samplesFor(wlIperf4, map[string][]float64{
		modeGhostwire: {16}, modeHAProxy: {14}, modeHAProxySplice: {12},
	}), allModes)
	found = false
	for _, l := range strings.Split(buf.String(), "\n") {
		if strings.HasPrefix(l, "iperf3 4 streams") && strings.Contains(l, "1.14 (haproxy)") {
			found = strings.HasSuffix(l, ">= 1.1× haproxy-splice (1.33)  PASS")
		}
	}
	if !found {
		t.Errorf("iperf3-4 row not judged against haproxy-splice:\n%s", buf.String())
	}
}

func TestCompareDivert(t *testing.T) {
	s := samplesFor(wlHTTPClose, map[string][]float64{modeDivert: {40000}, modeGhostwire: {10000}})
	s = append(s, samplesFor(wlMemPer, map[string][]float64{modeGhostwire: {4}})...)
	cmp := compare(summaries(s))
	if len(cmp) != 2 || cmp[0].VsDivert != 0.25 || cmp[0].DivertVal != 40000 || cmp[1].VsDivert != 0 {
		t.Errorf("%+v", cmp)
	}
	if hasProxy(modeDivert) || hasProxy(modePlain) || !hasProxy(modeGhostwire) || !hasProxy(modeHAProxySplice) {
		t.Error("hasProxy")
	}
}

func TestHTTPRequestParsing(t *testing.T) {
	in := "GET / HTTP/1.1\r\nHost: x\r\n\r\n" +
		"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" +
		"POST / HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc" +
		"GET / HTTP/1.0\r\n\r\n"
	r := bufio.NewReader(strings.NewReader(in))
	for i, want := range []bool{false, true, false, true} {
		got, err := readRequest(r)
		if err != nil || got != want {
			t.Errorf("request %d: close=%v err=%v, want close=%v", i, got, err, want)
		}
	}
	if _, err := readRequest(r); err == nil {
		t.Error("EOF not reported")
	}
}

func TestFitConns(t *testing.T) {
	for limit, want := range map[uint64]int{20000: 8000, 24000: 10000, 200000: 98000, 1024: 0} {
		if got := fitConns(limit); got != want {
			t.Errorf("fitConns(%d) = %d, want %d", limit, got, want)
		}
	}
	cfg := haproxyConfig(true, 9200)
	for _, want := range []string{"maxconn 9200", "bind 0.0.0.0:9876 transparent", "bind [::]:9876 transparent v6only",
		"source 0.0.0.0 usesrc clientip", "server orig 0.0.0.0\n", "option splice-auto"} {
		if !strings.Contains(cfg, want) {
			t.Errorf("haproxy config lacks %q:\n%s", want, cfg)
		}
	}
	if strings.Contains(haproxyConfig(false, 2000), "splice") {
		t.Error("plain haproxy config splices")
	}
}
