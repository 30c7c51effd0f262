package appliance

import (
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
)

const goodYAML = `
bridge:
  name: br0
  client_nic: lan0
  server_nic: wan0
  addresses: [192.0.2.254/24, "2001:db8:1::fe/64"]
  routes: ["192.0.2.0/24", "default via 192.0.2.1"]
intercept:
  tcp_ports: [80, 443]
proxy:
  tcp_port: 9876
  connect_timeout: 2s
  idle_timeout: 1m
  shutdown_grace: 10s
routing:
  mark: 0x1
  table: 100
`

func writeConfig(t *testing.T, body string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "ghostwire.yaml")
	if err := os.WriteFile(p, []byte(body), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestLoadGood(t *testing.T) {
	c, err := Load(writeConfig(t, goodYAML), nil)
	if err != nil {
		t.Fatalf("Load: %v", err)
	}
	if c.Proxy.ConnectTimeout != 2*time.Second || c.Proxy.IdleTimeout != time.Minute || c.Routing.Mark != 1 {
		t.Errorf("decoded %+v", c.Proxy)
	}
	if c.Proxy.TCPPort != 9876 || len(c.Intercept.TCPPorts) != 2 || c.Routing.Priority != 1000 {
		t.Errorf("decoded %+v %+v", c.Intercept, c.Routing)
	}
	spec, err := c.BridgeSpec()
	if err != nil || len(spec.Routes) != 2 || len(spec.Addresses) != 2 {
		t.Errorf("BridgeSpec = %+v, %v", spec, err)
	}
}

func TestEnvAndOverrides(t *testing.T) {
	t.Setenv("GHOSTWIRE_PROXY_TCP_PORT", "9000")
	t.Setenv("GHOSTWIRE_ROUTING_MARK", "0x20")
	c, err := Load(writeConfig(t, goodYAML), map[string]any{"state_file": "/tmp/x.json"})
	if err != nil {
		t.Fatalf("Load: %v", err)
	}
	if c.Proxy.TCPPort != 9000 || c.Routing.Mark != 0x20 || c.StateFile != "/tmp/x.json" {
		t.Errorf("env/override not applied: port %d mark %#x state %s", c.Proxy.TCPPort, c.Routing.Mark, c.StateFile)
	}
	if _, err := Load("", map[string]any{"proxy.nope": 1}); err == nil || !strings.Contains(err.Error(), `unknown config key "proxy.nope"`) {
		t.Errorf("unknown override: %v", err)
	}
}

func TestLoadRefusals(t *testing.T) {
	for _, tc := range []struct {
		name, old, new, want string
	}{
		{"unknown key", "intercept:", "bogus: 1\nintercept:", "unknown config key(s): bogus"},
		{"unknown nested key", "  tcp_ports: [80, 443]", "  tcp_ports: [80, 443]\n  udp_portz: [53]", "unknown config key(s): intercept.udp_portz"},
		{"same NIC twice", "server_nic: wan0", "server_nic: lan0", `same interface "lan0"`},
		{"missing NIC", "  server_nic: wan0\n", "", "bridge.server_nic is required"},
		{"port 0", "[80, 443]", "[0, 443]", "port 0 is outside 1-65535"},
		{"port too big", "[80, 443]", "[80, 70000]", "port 70000 is outside 1-65535"},
		{"proxy port too big", "tcp_port: 9876", "tcp_port: 65536", "proxy.tcp_port: 65536"},
		{"intercept equals proxy", "[80, 443]", "[80, 9876]", "proxy.tcp_port: 9876 is also an intercepted port: the proxy would divert to itself"},
		{"malformed address", "192.0.2.254/24,", "192.0.2.300/24,", `"192.0.2.300/24" is not an address`},
		{"address without prefix", "192.0.2.254/24,", "192.0.2.254,", `"192.0.2.254" is not an address`},
		{"malformed route", `"192.0.2.0/24"`, `"192.0.2.0/24 dev x"`, "bridge.routes"},
		{"zero duration", "connect_timeout: 2s", "connect_timeout: 0s", "proxy.connect_timeout: 0s must be positive"},
		{"negative duration", "idle_timeout: 1m", "idle_timeout: -1m", "proxy.idle_timeout: -1m0s must be positive"},
		{"unparseable duration", "shutdown_grace: 10s", "shutdown_grace: soon", "shutdown_grace"},
		{"mark zero", "mark: 0x1", "mark: 0", "routing.mark: must be non-zero"},
		{"main table", "table: 100", "table: 254", "routing.table: 254 is the kernel's main table"},
		{"table too big", "table: 100", "table: 2147483648", "routing.table: 2147483648 is out of range"},
		{"priority zero", "table: 100", "table: 100\n  priority: 0", "routing.priority: 0 is out of range 1..32765"},
		{"quote in NIC name", "client_nic: lan0", `client_nic: "la\"n0"`, "a quote"},
		{"long bridge name", "name: br0", "name: averyveryverylongbridge", "longer than 15"},
		{"log level", "routing:", "log:\n  level: loud\nrouting:", `log.level: "loud"`},
		{"log format", "routing:", "log:\n  format: xml\nrouting:", `log.format: "xml" is not one of text, json`},
		{"policy name", "routing:", "policy:\n  sni:\n    deny: [\"bad..example\"]\nrouting:", `policy.sni.deny:`},
		{"policy default", "routing:", "policy:\n  default: maybe\nrouting:", `policy.default: "maybe" must be allow or deny`},
		{"inspect timeout", "routing:", "policy:\n  inspect_timeout: 0s\nrouting:", `policy.inspect_timeout: 0s must be positive`},
		{"metrics address", "routing:", "metrics:\n  listen: localhost\nrouting:", `metrics.listen: "localhost" is not IP:PORT`},
		{"metrics intercepted", "routing:", "metrics:\n  listen: 127.0.0.1:80\nrouting:", `metrics.listen: port 80 is in intercept.tcp_ports`},
		{"udp port 0", "  tcp_ports: [80, 443]", "  tcp_ports: [80, 443]\n  udp_ports: [53, 0]", "intercept.udp_ports: port 0 is outside 1-65535"},
		{"udp port too big", "  tcp_ports: [80, 443]", "  tcp_ports: [80, 443]\n  udp_ports: [65536]", "intercept.udp_ports: port 65536 is outside 1-65535"},
		{"udp proxy port 0", "tcp_port: 9876", "tcp_port: 9876\n  udp_port: 0", "proxy.udp_port: 0 is outside 1-65535"},
		{"udp proxy port too big", "tcp_port: 9876", "tcp_port: 9876\n  udp_port: 70000", "proxy.udp_port: 70000 is outside 1-65535"},
		{"udp proxy port intercepted", "  tcp_ports: [80, 443]", "  tcp_ports: [80, 443]\n  udp_ports: [53, 9877]",
			"proxy.udp_port: 9877 is also an intercepted UDP port: the proxy would divert to itself"},
		{"negative udp idle timeout", "idle_timeout: 1m", "idle_timeout: 1m\n  udp_idle_timeout: -1s", "proxy.udp_idle_timeout: -1s must be positive"},
		{"zero udp idle timeout", "idle_timeout: 1m", "idle_timeout: 1m\n  udp_idle_timeout: 0s", "proxy.udp_idle_timeout: 0s must be positive"},
		{"zero max udp sessions", "idle_timeout: 1m", "idle_timeout: 1m\n  max_udp_sessions: 0", "proxy.max_udp_sessions: 0 must be at least 1"},
		{"negative max udp sessions", "idle_timeout: 1m", "idle_timeout: 1m\n  max_udp_sessions: -5", "proxy.max_udp_sessions: -5 must be at least 1"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			body := strings.Replace(goodYAML, tc.old, tc.new, 1)
			if body == goodYAML {
				t.Fatalf("test case did not change the config (%q not found)", tc.old)
			}
			_, err := Load(writeConfig(t, body), nil)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("Load error = %v, want containing %q", err, tc.want)
			}
		})
	}
}

func TestLoadMissingFile(t *testing.T) {
	_, err := Load(filepath.Join(t.TempDir(), "nope.yaml"), nil)
	if err == nil || !strings.Contains(err.Error(), "nope.yaml") {
		t.Fatalf("Load of a missing file: %v", err)
	}
}

func TestProxyLimitKeys(t *testing.T) {
	c, err := Load(writeConfig(t, goodYAML), nil)
	if err != nil {
		t.Fatal(err)
	}
	if c.Proxy.ReceiveBuffer != 4<<20 || c.Proxy.MaxConnections != 0 || c.Proxy.Overload != "bypass" {
		t.Errorf("defaults: receive_buffer %d, max_connections %d, overload %q; want 4MiB, 0, bypass",
			c.Proxy.ReceiveBuffer, c.Proxy.MaxConnections, c.Proxy.Overload)
	}
	c, err = Load(writeConfig(t, strings.Replace(goodYAML, "  shutdown_grace: 10s\n",
		"  shutdown_grace: 10s\n  receive_buffer: 512KiB\n  max_connections: 100\n  overload: refuse\n", 1)), nil)
	if err != nil {
		t.Fatal(err)
	}
	if c.Proxy.ReceiveBuffer != 512<<10 || c.Proxy.MaxConnections != 100 || c.Proxy.Overload != "refuse" {
		t.Errorf("decoded %+v", c.Proxy)
	}
	for keys, want := range map[string]string{
		"  offload: true\n":        "proxy.offload was removed: kernel forwarding (sockmap)",
		"  overload: drop\n":       `proxy.overload: "drop" must be bypass`,
		"  max_connections: -1\n":  "proxy.max_connections: -1 must be 0",
		"  receive_buffer: 1KiB\n": "proxy.receive_buffer: 1KiB must be 0 (kernel autotuning) or between 64KiB and 1GiB",
		"  receive_buffer: lots\n": `"lots" is not a size`,
		"  receive_buffer: 2GiB\n": "proxy.receive_buffer: 2GiB must be 0",
	} {
		_, err := Load(writeConfig(t, strings.Replace(goodYAML, "  shutdown_grace: 10s\n", "  shutdown_grace: 10s\n"+keys, 1)), nil)
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("with %q: err = %v, want it to say %q", strings.TrimSpace(keys), err, want)
		}
	}
}

func TestMaxConnsAgainstFDLimit(t *testing.T) {
	c, err := Load(writeConfig(t, goodYAML), nil)
	if err != nil {
		t.Fatal(err)
	}
	if n, err := maxConns(c); err != nil || n < 1 {
		t.Errorf("derived max_connections = %d, %v", n, err)
	}
	c.Proxy.MaxConnections = 1 << 29 // more than any fd limit carries
	if _, err := maxConns(c); err == nil || !strings.Contains(err.Error(), "raise LimitNOFILE or set at most") {
		t.Errorf("max_connections 2^29: err = %v, want a refusal naming LimitNOFILE", err)
	}
}

func TestUDPKeys(t *testing.T) {
	c, err := Load(writeConfig(t, goodYAML), nil)
	if err != nil {
		t.Fatal(err)
	}
	if len(c.Intercept.UDPPorts) != 0 || c.Proxy.UDPPort != 9877 || c.Proxy.UDPIdleTimeout != time.Minute || c.Proxy.MaxUDPSessions != 65536 {
		t.Errorf("defaults: udp_ports %v, udp_port %d, udp_idle_timeout %v, max_udp_sessions %d; want [], 9877, 1m0s, 65536",
			c.Intercept.UDPPorts, c.Proxy.UDPPort, c.Proxy.UDPIdleTimeout, c.Proxy.MaxUDPSessions)
	}
	if rc := c.RulesConfig(nil); len(rc.UDPPorts) != 0 || rc.ProxyUDPPort != 9877 || rc.UDPSessionTimeout != time.Minute {
		t.Errorf("RulesConfig without UDP: %+v", rc)
	}

	// TCP and UDP ports are separate spaces: the UDP proxy port may be
	// the TCP one, and a port may be intercepted for both.
	t.Setenv("GHOSTWIRE_PROXY_UDP_PORT", "9876")
	c, err = Load(writeConfig(t, strings.Replace(goodYAML, "idle_timeout: 1m", "idle_timeout: 1m\n  udp_idle_timeout: 1500ms\n  max_udp_sessions: 10", 1)),
		map[string]any{"intercept.udp_ports": []int{4500, 53, 80, 53}})
	if err != nil {
		t.Fatal(err)
	}
	rc := c.RulesConfig(nil)
	if !slices.Equal(rc.UDPPorts, []uint16{53, 80, 4500}) || rc.ProxyUDPPort != 9876 || c.Proxy.MaxUDPSessions != 10 {
		t.Errorf("RulesConfig UDP ports %v, proxy port %d, max_udp_sessions %d; want [53 80 4500], 9876, 10", rc.UDPPorts, rc.ProxyUDPPort, c.Proxy.MaxUDPSessions)
	}
	// The bridge remembers a flow at least as long as the proxy's session.
	for idle, want := range map[time.Duration]time.Duration{
		1500 * time.Millisecond: 2 * time.Second,
		time.Millisecond:        time.Second,
		90 * time.Second:        90 * time.Second,
		30 * 24 * time.Hour:     7 * 24 * time.Hour,
	} {
		c.Proxy.UDPIdleTimeout = idle
		if got := c.RulesConfig(nil).UDPSessionTimeout; got != want {
			t.Errorf("udp_idle_timeout %v: UDPSessionTimeout %v, want %v", idle, got, want)
		}
	}
}

// Which keys a reload may change: the intercepted UDP ports, the UDP idle
// timeout and the session limit do; the UDP proxy port (its listener) does
// not.
func TestLiveChangeableUDP(t *testing.T) {
	old, err := Load(writeConfig(t, goodYAML), nil)
	if err != nil {
		t.Fatal(err)
	}
	c := *old
	c.Intercept.UDPPorts = []int{53, 443}
	c.Proxy.UDPIdleTimeout = 5 * time.Minute
	c.Proxy.MaxUDPSessions = 1000
	if err := liveChangeable(old, &c); err != nil {
		t.Errorf("UDP ports, idle timeout and session limit refused on reload: %v", err)
	}
	c.Proxy.UDPPort = 5000
	if err := liveChangeable(old, &c); err == nil || !strings.Contains(err.Error(), "proxy.udp_port cannot change on reload (9877 -> 5000): restart ghostwire") {
		t.Errorf("a new proxy.udp_port on reload: %v; want a refusal naming the key", err)
	}
}

// The selection keys: prefixes and bare addresses, IPv4 and IPv6 mixed,
// from YAML, env (comma separated) and overrides; bad entries refused with
// the key and the entry named; all four reloadable.
func TestSelectionKeys(t *testing.T) {
	c, err := Load(writeConfig(t, goodYAML), nil)
	if err != nil {
		t.Fatal(err)
	}
	if rc := c.RulesConfig(nil); rc.ClientCIDRs != nil || rc.ServerCIDRs != nil || rc.ExcludeClientCIDRs != nil || rc.ExcludeServerCIDRs != nil {
		t.Errorf("default selection not empty: %+v", rc)
	}

	t.Setenv("GHOSTWIRE_INTERCEPT_EXCLUDE_CLIENT_CIDRS", "192.0.2.9, 2001:db8::9")
	c, err = Load(writeConfig(t, strings.Replace(goodYAML, "  tcp_ports: [80, 443]",
		"  tcp_ports: [80, 443]\n  client_cidrs: [192.0.2.0/24, \"2001:db8::/32\", 10.1.2.3/8, 198.51.100.7]", 1)),
		map[string]any{"intercept.exclude_server_cidrs": []string{"203.0.113.0/24"}})
	if err != nil {
		t.Fatal(err)
	}
	rc := c.RulesConfig(nil)
	for _, tc := range []struct {
		key       string
		got, want []netip.Prefix
	}{
		{"client_cidrs", rc.ClientCIDRs, pfxs("192.0.2.0/24", "2001:db8::/32", "10.0.0.0/8", "198.51.100.7/32")},
		{"server_cidrs", rc.ServerCIDRs, nil},
		{"exclude_client_cidrs", rc.ExcludeClientCIDRs, pfxs("192.0.2.9/32", "2001:db8::9/128")},
		{"exclude_server_cidrs", rc.ExcludeServerCIDRs, pfxs("203.0.113.0/24")},
	} {
		if !slices.Equal(tc.got, tc.want) {
			t.Errorf("%s: %v, want %v", tc.key, tc.got, tc.want)
		}
	}

	for _, tc := range []struct{ key, entry, want string }{
		{"client_cidrs", "192.0.2.300/24", `intercept.client_cidrs: "192.0.2.300/24" is not an address or prefix`},
		{"server_cidrs", "example.com", `intercept.server_cidrs: "example.com" is not an address or prefix`},
		{"exclude_client_cidrs", "10.0.0.0/33", `intercept.exclude_client_cidrs: "10.0.0.0/33" is not an address or prefix`},
		{"exclude_server_cidrs", "fe80::1%eth0", `intercept.exclude_server_cidrs: "fe80::1%eth0" is not an address or prefix`},
	} {
		_, err := Load(writeConfig(t, goodYAML), map[string]any{"intercept." + tc.key: []string{"192.0.2.1", tc.entry}})
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: [192.0.2.1, %s]: %v; want an error containing %q", tc.key, tc.entry, err, tc.want)
		}
	}

	old := c
	n := *old
	n.Intercept.ClientCIDRs = []string{"10.0.0.0/8"}
	n.Intercept.ServerCIDRs = []string{"203.0.113.0/24"}
	n.Intercept.ExcludeClientCIDRs = nil
	n.Intercept.ExcludeServerCIDRs = []string{"2001:db8::/32"}
	if err := liveChangeable(old, &n); err != nil {
		t.Errorf("selection change refused on reload: %v", err)
	}
}

func pfxs(ss ...string) []netip.Prefix {
	var out []netip.Prefix
	for _, s := range ss {
		out = append(out, netip.MustParsePrefix(s))
	}
	return out
}
