package e2e

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/ghostwire/ghostwire/lab"
)

// The metrics endpoint and the JSON log (issue 13), end to end.

const metricsAddr = "127.0.0.1:9109"

// scrape GETs /metrics at addr from inside the box namespace and returns
// the exposition and its samples by series ("name{label=\"v\"}").
func scrape(t *testing.T, b *lab.Appliance, addr string) (string, map[string]float64) {
	t.Helper()
	hc := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{
		DisableKeepAlives: true,
		DialContext: func(_ context.Context, network, a string) (net.Conn, error) {
			c, err := lab.Dial(b.Lab.Box, network, a, 5*time.Second)
			if err != nil {
				return nil, err
			}
			return c, nil
		},
	}}
	resp, err := hc.Get("http://" + addr + "/metrics")
	if err != nil {
		t.Fatalf("scraping %s in the box: %v", addr, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("scraping %s: %s, %v\n%s", addr, resp.Status, err, body)
	}
	samples := map[string]float64{}
	for _, l := range strings.Split(string(body), "\n") {
		if l == "" || strings.HasPrefix(l, "#") {
			continue
		}
		i := strings.LastIndexByte(l, ' ')
		v, err := strconv.ParseFloat(l[i+1:], 64)
		if i < 0 || err != nil {
			t.Fatalf("metrics line %q is not SERIES VALUE", l)
		}
		samples[l[:i]] = v
	}
	return string(body), samples
}

// httpGet sends one HTTP/1.1 request for host with Connection: close to
// addr from the client namespace and reads the reply to EOF.
func httpGet(b *lab.Appliance, addr, host string) ([]byte, error) {
	c, err := lab.Dial(b.Lab.Client, "tcp", addr, 5*time.Second)
	if err != nil {
		return nil, err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := fmt.Fprintf(c, "GET / HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n", host); err != nil {
		return nil, err
	}
	return io.ReadAll(c)
}

// After 20 allowed HTTP requests (Connection: close) and 3 denied Hosts,
// /metrics (scraped on loopback in the box) counts them: accepted, closed
// by class, policy decisions, bytes down at least what the server sent,
// one dial observation per relayed connection, none active. promtool lints
// the exposition.
func TestMetricsAfterKnownTraffic(t *testing.T) {
	b := policyBox(t, policyYAML+"metrics:\n  listen: "+metricsAddr+"\n", 80)
	addr := net.JoinHostPort(b.Lab.ServerIP4.String(), "80")
	srv := startHTTPServer(t, b, addr)

	const ok, denied = 20, 3
	var received int
	for i := range ok {
		reply, err := httpGet(b, addr, "good.example")
		if err != nil || !bytes.HasSuffix(reply, []byte("host=good.example\n")) {
			t.Fatalf("request %d: %v\n%s", i, err, reply)
		}
		received += len(reply)
	}
	for i := range denied {
		reply, err := httpGet(b, addr, fmt.Sprintf("h%d.bad.example", i))
		if !errors.Is(err, syscall.ECONNRESET) {
			t.Fatalf("denied request %d: reply %q, err %v; want a connection reset", i, reply, err)
		}
	}
	// Counters move when a connection finishes, which is when it is logged.
	if err := lab.WaitFor(10*time.Second, func() (bool, error) {
		return len(b.ProxyLog("connection closed")) >= ok+denied, nil
	}); err != nil {
		t.Fatalf("%d connections, but the proxy logged %d: %v", ok+denied, len(b.ProxyLog("connection closed")), err)
	}
	if int64(received) != srv.sent.Load() {
		t.Errorf("clients received %d bytes, the server sent %d", received, srv.sent.Load())
	}

	text, m := scrape(t, b, metricsAddr)
	at := func(series string) float64 {
		v, found := m[series]
		if !found {
			t.Errorf("no series %s in /metrics", series)
		}
		return v
	}
	checks := []struct {
		series string
		ok     func(float64) bool
		want   string
	}{
		{"ghostwire_connections_accepted_total", func(v float64) bool { return v >= ok+denied }, fmt.Sprintf("≥ %d", ok+denied)},
		{`ghostwire_connections_closed_total{reason="eof"}`, func(v float64) bool { return v >= ok }, fmt.Sprintf("≥ %d", ok)},
		{`ghostwire_connections_closed_total{reason="policy denied"}`, func(v float64) bool { return v == denied }, fmt.Sprint(denied)},
		{`ghostwire_policy_decisions_total{action="deny"}`, func(v float64) bool { return v == denied }, fmt.Sprint(denied)},
		{`ghostwire_policy_decisions_total{action="allow"}`, func(v float64) bool { return v >= ok }, fmt.Sprintf("≥ %d", ok)},
		{`ghostwire_bytes_total{direction="down"}`, func(v float64) bool { return v >= float64(srv.sent.Load()) }, fmt.Sprintf("≥ %d (server sent)", srv.sent.Load())},
		{`ghostwire_bytes_total{direction="up"}`, func(v float64) bool { return v > 0 }, "> 0"},
		{"ghostwire_upstream_dial_duration_seconds_count", func(v float64) bool { return v >= ok }, fmt.Sprintf("≥ %d", ok)},
		{`ghostwire_upstream_dial_duration_seconds_bucket{le="+Inf"}`, func(v float64) bool { return v >= ok }, fmt.Sprintf("≥ %d", ok)},
		{"ghostwire_connections_active", func(v float64) bool { return v == 0 }, "0"},
		{`ghostwire_overloaded{proto="tcp"}`, func(v float64) bool { return v == 0 }, "0"},
		// The rules' own counters (nftables): every connection's SYN
		// went through the inet table's tproxy rule, and its frames both
		// ways through the bridge's lift rules.
		{`ghostwire_rule_packets_total{rule="tcp syn",table="inet"}`, func(v float64) bool { return v >= ok+denied }, fmt.Sprintf("≥ %d", ok+denied)},
		{`ghostwire_rule_bytes_total{rule="tcp syn",table="inet"}`, func(v float64) bool { return v >= 40*(ok+denied) }, fmt.Sprintf("≥ %d", 40*(ok+denied))},
		{`ghostwire_rule_packets_total{rule="lift tcp client",table="bridge"}`, func(v float64) bool { return v >= 3*(ok+denied) }, fmt.Sprintf("≥ %d", 3*(ok+denied))},
		{`ghostwire_rule_packets_total{rule="lift tcp server",table="bridge"}`, func(v float64) bool { return v >= 2*(ok+denied) }, fmt.Sprintf("≥ %d", 2*(ok+denied))},
		{`ghostwire_rule_bytes_total{rule="lift tcp server",table="bridge"}`, func(v float64) bool { return v >= float64(srv.sent.Load()) }, fmt.Sprintf("≥ %d (server sent)", srv.sent.Load())},
		{`ghostwire_rule_packets_total{rule="tcp socket",table="inet"}`, func(v float64) bool { return v > 0 }, "> 0"},
		{`ghostwire_rule_packets_total{rule="bypass flow client4",table="bridge"}`, func(v float64) bool { return v == 0 }, "0"},
		{"ghostwire_rule_read_errors_total", func(v float64) bool { return v == 0 }, "0"},
	}
	for _, c := range checks {
		if v := at(c.series); !c.ok(v) {
			t.Errorf("%s = %v, want %s", c.series, v, c.want)
		}
	}
	if t.Failed() {
		t.Logf("/metrics:\n%s", text)
	}

	if _, err := exec.LookPath("promtool"); err != nil {
		t.Skip("promtool not installed (apt-get install prometheus, or make deps): exposition not linted")
	}
	cmd := exec.Command("promtool", "check", "metrics")
	cmd.Stdin = strings.NewReader(text)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Errorf("promtool check metrics: %v\n%s", err, out)
	}
}

// A metrics address on an intercepted port, or on the bridged segment
// without being a br0 address, is refused by apply and by run, in words
// that name metrics.listen; nothing is provisioned.
func TestMetricsListenRefused(t *testing.T) {
	needRoot(t)
	b := newBox(t, 80)
	for _, c := range []struct{ name, listen, want string }{
		{"intercepted port", "127.0.0.1:80", "metrics.listen: port 80"},
		{"segment address", b.Lab.ClientIP4.String() + ":9109", "metrics.listen: " + b.Lab.ClientIP4.String()},
	} {
		t.Run(c.name, func(t *testing.T) {
			if err := b.WriteConfig([]int{80}, "metrics:\n  listen: \""+c.listen+"\"\n"); err != nil {
				t.Fatal(err)
			}
			out, err := b.Ghostwire("apply")
			if err == nil || !strings.Contains(out, c.want) {
				t.Errorf("apply with metrics.listen %s: %v\n%s\nwant an error saying %q", c.listen, err, out, c.want)
			}
			if st, _ := b.Status(); strings.Contains(st, "intercepting") {
				t.Errorf("status after the refused apply: %q", st)
			}
			p, err := b.Lab.Start(b.Lab.Box, b.Bin, "run", "-c", b.Config, "--json")
			if err != nil {
				t.Fatal(err)
			}
			select {
			case <-p.Done():
			case <-time.After(20 * time.Second):
				p.Stop(syscall.SIGTERM, 10*time.Second)
				t.Fatalf("run with metrics.listen %s was not refused: still running after 20s\n%s", c.listen, p.Stderr())
			}
			if err := p.Wait(); err == nil || !strings.Contains(string(p.Stderr()), c.want) {
				t.Errorf("run with metrics.listen %s: exit %v\n%s\nwant a failure saying %q", c.listen, err, p.Stderr(), c.want)
			}
		})
	}
}

// jsonLogTraffic sends an allowed and a denied connection of each kind
// (TLS by SNI on 443, HTTP by Host on 80) through b, and one that carries
// neither (no name: allowed by default); it returns the client addresses
// by what each was.
func jsonLogTraffic(t *testing.T, b *lab.Appliance) map[string]net.Addr {
	t.Helper()
	server := b.Lab.ServerIP4.String()
	http80 := net.JoinHostPort(server, "80")
	startHTTPServer(t, b, http80)
	tls443 := listenServer(t, b, server, "443", echoServer)
	out := map[string]net.Addr{}

	dialSend := func(addr string, payload []byte) (net.Addr, []byte, error) {
		c, err := lab.Dial(b.Lab.Client, "tcp", addr, 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(10 * time.Second))
		if _, err := c.Write(payload); err != nil {
			return c.LocalAddr(), nil, err
		}
		if err := closeWrite(c); err != nil {
			return c.LocalAddr(), nil, err
		}
		got, err := io.ReadAll(c)
		return c.LocalAddr(), got, err
	}
	req := func(host string) []byte {
		return []byte("GET / HTTP/1.1\r\nHost: " + host + "\r\nConnection: close\r\n\r\n")
	}
	for _, c := range []struct {
		key, addr string
		payload   []byte
		deny      bool
	}{
		{"host allow", http80, req("good.example"), false},
		{"host deny", http80, req("x.bad.example"), true},
		{"sni allow", tls443, clientHello(t, "good.example"), false},
		{"sni deny", tls443, clientHello(t, "x.bad.example"), true},
		{"no name", tls443, []byte("not tls, not http\r\n\r\n"), false},
	} {
		local, got, err := dialSend(c.addr, c.payload)
		if c.deny != errors.Is(err, syscall.ECONNRESET) || (!c.deny && len(got) == 0) {
			t.Errorf("%s: got %d bytes, err %v", c.key, len(got), err)
		}
		out[c.key] = local
	}
	return out
}

// checkJSONLog parses every line of the proxy's stderr as a JSON object,
// and checks the connection lines of jsonLogTraffic's connections.
func checkJSONLog(t *testing.T, b *lab.Appliance, conns map[string]net.Addr) {
	t.Helper()
	lines := map[string]lab.LogLine{}
	for key, local := range conns {
		lines[key] = waitConnLog(t, b, local)
	}
	stderr := b.Proxy.Stderr()
	sc := bufio.NewScanner(bytes.NewReader(stderr))
	n := 0
	for sc.Scan() {
		if len(bytes.TrimSpace(sc.Bytes())) == 0 {
			continue
		}
		n++
		var l map[string]any
		if err := json.Unmarshal(sc.Bytes(), &l); err != nil {
			t.Errorf("log line %d is not a JSON object: %v\n%s", n, err, sc.Bytes())
			continue
		}
		for _, k := range []string{"time", "level", "msg"} {
			if _, ok := l[k]; !ok {
				t.Errorf("log line %d has no %q: %s", n, k, sc.Bytes())
			}
		}
	}
	if n == 0 {
		t.Fatal("the proxy logged nothing")
	}
	for key, l := range lines {
		for _, k := range []string{"client", "server", "reason"} {
			if s, ok := l[k].(string); !ok || s == "" {
				t.Errorf("%s: %q = %#v, want a string\n%v", key, k, l[k], l)
			}
		}
		for _, k := range []string{"bytes_up", "bytes_down", "duration"} {
			if _, ok := l[k].(float64); !ok {
				t.Errorf("%s: %q = %#v, want a number\n%v", key, k, l[k], l)
			}
		}
		kind, want, _ := strings.Cut(key, " ")
		if kind == "no" {
			kind, want = "name", "allow"
			if l["policy"] != "no name: default allow" {
				t.Errorf("%s: policy = %#v, want no name: default allow\n%v", key, l["policy"], l)
			}
		} else if _, ok := l[kind].(string); !ok {
			t.Errorf("%s: no %q field\n%v", key, kind, l)
		}
		if l["decision"] != want {
			t.Errorf("%s: decision = %#v, want %s\n%v", key, l["decision"], want, l)
		}
		if _, ok := l["policy"].(string); !ok {
			t.Errorf("%s: no policy field\n%v", key, l)
		}
	}
}

// Every line the proxy writes is JSON, both with `run --json` (the
// harness) and with log.format: json and no flag; the connection lines
// carry client, server, bytes, duration and reason, and for inspected
// connections the name under sni/host and the decision.
func TestJSONLog(t *testing.T) {
	t.Run("flag", func(t *testing.T) {
		b := policyBox(t, policyYAML, 80, 443)
		checkJSONLog(t, b, jsonLogTraffic(t, b))
	})
	t.Run("config", func(t *testing.T) {
		needRoot(t)
		b := newBox(t, 80, 443)
		if err := b.WriteConfig([]int{80, 443}, policyYAML+"log:\n  format: json\n"); err != nil {
			t.Fatal(err)
		}
		applied(t, b)
		if err := b.StartProxyWith(); err != nil { // no --json: the config says json
			t.Fatal(err)
		}
		checkJSONLog(t, b, jsonLogTraffic(t, b))
	})
}
