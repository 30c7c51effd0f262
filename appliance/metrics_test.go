package appliance

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/ghostwire/ghostwire/proxy"
	"github.com/ghostwire/ghostwire/rules"
)

func fakeStats() proxy.Stats {
	return proxy.Stats{
		Active: 3, Accepted: 10, BytesUp: 100, BytesDown: 2000,
		Closed:      map[string]uint64{"eof": 6, "dial failed": 1},
		DialSeconds: proxy.Histogram{Bounds: []float64{0.001, 0.01}, Cumulative: []uint64{4, 6}, Count: 7, Sum: 0.5},
		UDPSessions: 2, UDPSessionsTotal: 5, UDPDropped: map[string]uint64{proxy.DropSendBufferFull: 4},
		UDPOverloaded: true, PolicyDenied: 2,
	}
}

// The collector reports what Stats says, under lint-clean names.
func TestProxyCollector(t *testing.T) {
	c := newProxyCollector(fakeStats)
	if problems, err := testutil.CollectAndLint(c); err != nil || len(problems) > 0 {
		t.Fatalf("lint: %v %v", problems, err)
	}
	want := `
# HELP ghostwire_bytes_total Bytes relayed, by direction (up: client to server).
# TYPE ghostwire_bytes_total counter
ghostwire_bytes_total{direction="down"} 2000
ghostwire_bytes_total{direction="up"} 100
# HELP ghostwire_connections_closed_total Relayed TCP connections that ended, by class of end reason.
# TYPE ghostwire_connections_closed_total counter
ghostwire_connections_closed_total{reason="dial failed"} 1
ghostwire_connections_closed_total{reason="eof"} 6
# HELP ghostwire_overloaded 1 while new flows bypass or are refused because a limit or a resource was reached.
# TYPE ghostwire_overloaded gauge
ghostwire_overloaded{proto="tcp"} 0
ghostwire_overloaded{proto="udp"} 1
# HELP ghostwire_policy_decisions_total Connections the name policy (policy.*) allowed or denied.
# TYPE ghostwire_policy_decisions_total counter
ghostwire_policy_decisions_total{action="allow"} 0
ghostwire_policy_decisions_total{action="deny"} 2
# HELP ghostwire_upstream_dial_duration_seconds Time from the upstream SYN to the server's answer, for connects that succeeded.
# TYPE ghostwire_upstream_dial_duration_seconds histogram
ghostwire_upstream_dial_duration_seconds_bucket{le="0.001"} 4
ghostwire_upstream_dial_duration_seconds_bucket{le="0.01"} 6
ghostwire_upstream_dial_duration_seconds_bucket{le="+Inf"} 7
ghostwire_upstream_dial_duration_seconds_sum 0.5
ghostwire_upstream_dial_duration_seconds_count 7
`
	if err := testutil.CollectAndCompare(c, strings.NewReader(want),
		"ghostwire_bytes_total", "ghostwire_connections_closed_total", "ghostwire_overloaded", "ghostwire_policy_decisions_total", "ghostwire_upstream_dial_duration_seconds"); err != nil {
		t.Error(err)
	}
}

// The endpoint serves the exposition over HTTP and stops with its context.
func TestServeMetrics(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	addr, stop, err := serveMetrics(ctx, "127.0.0.1:0", fakeStats, nil, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	resp, err := http.Get("http://" + addr.String() + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if !strings.Contains(string(body), "ghostwire_connections_active 3\n") {
		t.Errorf("/metrics lacks the active count:\n%s", body)
	}
	stop()
	if _, err := http.Get("http://" + addr.String() + "/metrics"); err == nil {
		t.Error("the endpoint still answers after stop")
	}
	if _, _, err := serveMetrics(ctx, "256.0.0.1:1", fakeStats, nil, slog.New(slog.DiscardHandler)); err == nil || !strings.Contains(err.Error(), "metrics.listen") {
		t.Errorf("a bad address = %v, want an error naming metrics.listen", err)
	}
}

// metrics.listen may be a br0 address or loopback, not another host's
// address on the bridged segment.
func TestMetricsListenOnSegment(t *testing.T) {
	c := &Config{Intercept: InterceptConfig{TCPPorts: []int{80}}, Bridge: BridgeConfig{Addresses: []string{"192.0.2.254/24"}}}
	for addr, want := range map[string]string{
		"192.0.2.254:9109": "",
		"127.0.0.1:9109":   "",
		"192.0.2.7:9109":   "192.0.2.7 is on the bridged segment (192.0.2.0/24) but is not a br0 address",
	} {
		var got []string
		c.checkMetricsListen(addr, func(f string, a ...any) { got = append(got, fmt.Sprintf(f, a...)) })
		switch {
		case want == "" && len(got) > 0:
			t.Errorf("%s refused: %v", addr, got)
		case want != "" && (len(got) != 1 || !strings.Contains(got[0], want)):
			t.Errorf("%s: %v, want %q", addr, got, want)
		}
	}
}

// The rule collector reports the counters read at scrape time, by table and
// rule name; a failed read leaves them out, counts the failure and does not
// fail the scrape.
func TestRuleCollector(t *testing.T) {
	var fail error
	read := func() ([]rules.RuleCounter, error) {
		if fail != nil {
			return nil, fail
		}
		return []rules.RuleCounter{
			{Table: "bridge", Rule: "lift tcp client", Packets: 12, Bytes: 3400},
			{Table: "bridge", Rule: "lift tcp server", Packets: 10, Bytes: 9000},
			{Table: "inet", Rule: "tcp syn", Packets: 2, Bytes: 120},
			{Table: "inet", Rule: "tcp syn", Packets: 99, Bytes: 99}, // a duplicate is dropped
		}, nil
	}
	c := newRuleCollector(read, slog.New(slog.DiscardHandler))
	if problems, err := testutil.CollectAndLint(c); err != nil || len(problems) > 0 {
		t.Fatalf("lint: %v %v", problems, err)
	}
	want := `
# HELP ghostwire_rule_bytes_total Bytes of the packets an nftables rule of the diversion acted on, by table and rule (its comment).
# TYPE ghostwire_rule_bytes_total counter
ghostwire_rule_bytes_total{rule="lift tcp client",table="bridge"} 3400
ghostwire_rule_bytes_total{rule="lift tcp server",table="bridge"} 9000
ghostwire_rule_bytes_total{rule="tcp syn",table="inet"} 120
# HELP ghostwire_rule_read_errors_total Scrapes whose reading of the nftables rule counters failed (the rule metrics are then left out).
# TYPE ghostwire_rule_read_errors_total counter
ghostwire_rule_read_errors_total 0
# HELP ghostwire_rule_packets_total Packets an nftables rule of the diversion acted on, by table and rule (its comment).
# TYPE ghostwire_rule_packets_total counter
ghostwire_rule_packets_total{rule="lift tcp client",table="bridge"} 12
ghostwire_rule_packets_total{rule="lift tcp server",table="bridge"} 10
ghostwire_rule_packets_total{rule="tcp syn",table="inet"} 2
`
	if err := testutil.CollectAndCompare(c, strings.NewReader(want)); err != nil {
		t.Error(err)
	}
	fail = errors.New("netlink: no permission")
	want = `
# HELP ghostwire_rule_read_errors_total Scrapes whose reading of the nftables rule counters failed (the rule metrics are then left out).
# TYPE ghostwire_rule_read_errors_total counter
ghostwire_rule_read_errors_total 1
`
	if err := testutil.CollectAndCompare(c, strings.NewReader(want)); err != nil {
		t.Error(err)
	}
	// Over HTTP: the scrape still succeeds, with the proxy's metrics.
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	addr, stop, err := serveMetrics(ctx, "127.0.0.1:0", fakeStats, read, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	defer stop()
	resp, err := http.Get("http://" + addr.String() + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK || !strings.Contains(string(body), "ghostwire_connections_active 3\n") ||
		!strings.Contains(string(body), "ghostwire_rule_read_errors_total 1\n") || strings.Contains(string(body), "ghostwire_rule_packets_total{") {
		t.Errorf("scrape with a failing counter read: %s\n%s", resp.Status, body)
	}
}
