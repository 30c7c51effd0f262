package appliance

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"runtime/debug"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/google/nftables"

	"github.com/ghostwire/ghostwire/proxy"
	"github.com/ghostwire/ghostwire/rules"
)

// proxyCollector exposes the proxy's own counters at scrape time, so the
// metrics never disagree with Stats (and the hot path counts once).
type proxyCollector struct {
	stats func() proxy.Stats

	active, accepted, refused, closed, bytes, dial           *prometheus.Desc
	overloaded, overloadRefused, policy, portFallbacks       *prometheus.Desc
	udpActive, udpTotal, udpDropped, udpFallbacks, buildInfo *prometheus.Desc
}

func newProxyCollector(stats func() proxy.Stats) *proxyCollector {
	d := func(name, help string, labels ...string) *prometheus.Desc {
		return prometheus.NewDesc("ghostwire_"+name, help, labels, nil)
	}
	return &proxyCollector{
		stats:           stats,
		active:          d("connections_active", "TCP connections the proxy relays now."),
		accepted:        d("connections_accepted_total", "Diverted TCP connections taken for relaying."),
		refused:         d("connections_direct_refused_total", "Connections addressed to the proxy port itself, reset unrelayed."),
		closed:          d("connections_closed_total", "Relayed TCP connections that ended, by class of end reason.", "reason"),
		bytes:           d("bytes_total", "Bytes relayed, by direction (up: client to server).", "direction"),
		dial:            d("upstream_dial_duration_seconds", "Time from the upstream SYN to the server's answer, for connects that succeeded."),
		overloaded:      d("overloaded", "1 while new flows bypass or are refused because a limit or a resource was reached.", "proto"),
		overloadRefused: d("overload_refused_total", "TCP connections reset because the proxy was overloaded."),
		policy:          d("policy_decisions_total", "Connections the name policy (policy.*) allowed or denied.", "action"),
		portFallbacks:   d("port_fallbacks_total", "TCP connections whose upstream socket could not keep the client's port."),
		udpActive:       d("udp_sessions_active", "UDP sessions open now."),
		udpTotal:        d("udp_sessions_total", "UDP sessions set up."),
		udpDropped:      d("udp_datagrams_dropped_total", "Datagrams the proxy could not relay, by reason.", "reason"),
		udpFallbacks:    d("udp_port_fallbacks_total", "UDP sessions whose upstream socket could not keep the client's port."),
		buildInfo:       d("build_info", "The running build (value 1).", "version", "goversion"),
	}
}

func (c *proxyCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{c.active, c.accepted, c.refused, c.closed, c.bytes, c.dial,
		c.overloaded, c.overloadRefused, c.policy, c.portFallbacks, c.udpActive, c.udpTotal, c.udpDropped, c.udpFallbacks, c.buildInfo} {
		ch <- d
	}
}

func (c *proxyCollector) Collect(ch chan<- prometheus.Metric) {
	st := c.stats()
	gauge := func(d *prometheus.Desc, v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v, labels...)
	}
	counter := func(d *prometheus.Desc, v uint64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, float64(v), labels...)
	}
	gauge(c.active, float64(st.Active))
	counter(c.accepted, st.Accepted)
	counter(c.refused, st.Refused)
	for reason, n := range st.Closed {
		counter(c.closed, n, reason)
	}
	counter(c.bytes, st.BytesUp, "up")
	counter(c.bytes, st.BytesDown, "down")
	buckets := make(map[float64]uint64, len(st.DialSeconds.Bounds))
	for i, b := range st.DialSeconds.Bounds {
		buckets[b] = st.DialSeconds.Cumulative[i]
	}
	ch <- prometheus.MustNewConstHistogram(c.dial, st.DialSeconds.Count, st.DialSeconds.Sum, buckets)
	gauge(c.overloaded, b2f(st.Overloaded), "tcp")
	gauge(c.overloaded, b2f(st.UDPOverloaded), "udp")
	counter(c.overloadRefused, st.OverloadRefused)
	counter(c.policy, st.PolicyAllowed, "allow")
	counter(c.policy, st.PolicyDenied, "deny")
	counter(c.portFallbacks, st.PortFallbacks)
	gauge(c.udpActive, float64(st.UDPSessions))
	counter(c.udpTotal, st.UDPSessionsTotal)
	for reason, n := range st.UDPDropped {
		counter(c.udpDropped, n, reason)
	}
	counter(c.udpFallbacks, st.UDPPortFallbacks)
	version := "(devel)"
	if bi, ok := debug.ReadBuildInfo(); ok && bi.Main.Version != "" {
		version = bi.Main.Version
	}
	gauge(c.buildInfo, 1, version, goVersion())
}

func b2f(b bool) float64 {
	if b {
		return 1
	}
	return 0
}

func goVersion() string {
	if bi, ok := debug.ReadBuildInfo(); ok {
		return bi.GoVersion
	}
	return ""
}

// ruleCollector exposes the counters of the diversion's rules, read from
// the kernel at scrape time (rules.Counters): how many packets (bytes) each
// rule acted on, by table and rule name. A failed read leaves the rule
// metrics out of that scrape, counts the failure and logs it at debug: the
// rest of the scrape still succeeds.
type ruleCollector struct {
	read func() ([]rules.RuleCounter, error)
	log  *slog.Logger

	errs           prometheus.Counter
	packets, bytes *prometheus.Desc
}

func newRuleCollector(read func() ([]rules.RuleCounter, error), log *slog.Logger) *ruleCollector {
	return &ruleCollector{
		read: read,
		log:  log,
		errs: prometheus.NewCounter(prometheus.CounterOpts{Name: "ghostwire_rule_read_errors_total",
			Help: "Scrapes whose reading of the nftables rule counters failed (the rule metrics are then left out)."}),
		packets: prometheus.NewDesc("ghostwire_rule_packets_total",
			"Packets an nftables rule of the diversion acted on, by table and rule (its comment).", []string{"table", "rule"}, nil),
		bytes: prometheus.NewDesc("ghostwire_rule_bytes_total",
			"Bytes of the packets an nftables rule of the diversion acted on, by table and rule (its comment).", []string{"table", "rule"}, nil),
	}
}

// nftRuleCounters reads the counters of ghostwire's tables named name over
// a fresh non-lasting connection: the daemon's lasting one belongs to its
// loop goroutine, and reading owned tables from another socket is allowed.
func nftRuleCounters(name string) func() ([]rules.RuleCounter, error) {
	return func() ([]rules.RuleCounter, error) {
		c, err := nftables.New()
		if err != nil {
			return nil, err
		}
		return ruleCounters(c, name)
	}
}

func (c *ruleCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- c.packets
	ch <- c.bytes
	c.errs.Describe(ch)
}

func (c *ruleCollector) Collect(ch chan<- prometheus.Metric) {
	defer c.errs.Collect(ch)
	counters, err := c.read()
	if err != nil {
		c.errs.Inc()
		c.log.Debug("reading nftables rule counters", "err", err)
		return
	}
	// The plan's names are unique per table; a rule added by hand with
	// one of them must not fail the scrape with a duplicate series.
	seen := make(map[[2]string]bool, len(counters))
	for _, rc := range counters {
		if k := [2]string{rc.Table, rc.Rule}; !seen[k] {
			seen[k] = true
			ch <- prometheus.MustNewConstMetric(c.packets, prometheus.CounterValue, float64(rc.Packets), rc.Table, rc.Rule)
			ch <- prometheus.MustNewConstMetric(c.bytes, prometheus.CounterValue, float64(rc.Bytes), rc.Table, rc.Rule)
		}
	}
}

// serveMetrics serves /metrics on addr until ctx is done. The listener is
// opened before it returns, so a taken or bad address fails the start.
// ruleCounters, if not nil, reads the diversion's rule counters at each
// scrape (nftRuleCounters).
func serveMetrics(ctx context.Context, addr string, stats func() proxy.Stats, ruleCounters func() ([]rules.RuleCounter, error),
	log *slog.Logger) (bound net.Addr, stop func(), err error) {
	reg := prometheus.NewRegistry()
	reg.MustRegister(newProxyCollector(stats))
	if ruleCounters != nil {
		reg.MustRegister(newRuleCollector(ruleCounters, log))
	}
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, nil, fmt.Errorf("metrics.listen: %w", err)
	}
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	go func() {
		if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			log.Error("metrics server stopped", "err", err)
		}
	}()
	return ln.Addr(), func() {
		ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		defer cancel()
		srv.Shutdown(ctx)
	}, nil
}

// RuleCounters are the counters of ghostwire's rules: the diversion's
// tables' and, on an invisible box, the quiet table's (what the box would
// have said on the wire).
func RuleCounters(c *nftables.Conn) ([]rules.RuleCounter, error) {
	return ruleCounters(c, TableName)
}

func ruleCounters(c *nftables.Conn, name string) ([]rules.RuleCounter, error) {
	rc, err := rules.Counters(c, name)
	if err != nil {
		return nil, err
	}
	quiet, err := rules.Quiet{Name: name}.Counters(c)
	if err != nil {
		return nil, err
	}
	return append(rc, quiet...), nil
}
