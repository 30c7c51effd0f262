// Package appliance reads ghostwire's configuration, turns it and the kernel's facts into the box's desired state, and runs the proxy daemon (`ghostwire run`).
package appliance

import (
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"reflect"
	"regexp"
	"slices"
	"strings"
	"time"

	"github.com/go-viper/mapstructure/v2"
	"github.com/spf13/viper"

	"github.com/ghostwire/ghostwire/bridge"
	"github.com/ghostwire/ghostwire/proxy/inspect"
	"github.com/ghostwire/ghostwire/rules"
)

// Config is ghostwire's whole configuration, as read from YAML, GHOSTWIRE_*
// environment variables and flags.
type Config struct {
	Bridge    BridgeConfig    `mapstructure:"bridge"`
	Intercept InterceptConfig `mapstructure:"intercept"`
	Proxy     ProxyConfig     `mapstructure:"proxy"`
	Routing   RoutingConfig   `mapstructure:"routing"`
	Log       LogConfig       `mapstructure:"log"`
	Policy    PolicyConfig    `mapstructure:"policy"`
	Metrics   MetricsConfig   `mapstructure:"metrics"`
	StateFile string          `mapstructure:"state_file"`
	// ControlSocket is the unix socket `ghostwire run` answers `ghostwire
	// bypass` and `status --json` on (see control.go).
	ControlSocket string `mapstructure:"control_socket"`
}

type BridgeConfig struct {
	Name      string   `mapstructure:"name"`
	ClientNIC string   `mapstructure:"client_nic"`
	ServerNIC string   `mapstructure:"server_nic"`
	Addresses []string `mapstructure:"addresses"`
	Routes    []string `mapstructure:"routes"`
	// Invisible: the box sends no frame of its own (see bridge.Spec and
	// rules.Quiet); the proxy's frames carry the hosts' MACs, learned
	// from the diverted frames, each entry for NeighbourTimeout.
	Invisible        bool          `mapstructure:"invisible"`
	NeighbourTimeout time.Duration `mapstructure:"neighbour_timeout"`
}

type InterceptConfig struct {
	TCPPorts []int `mapstructure:"tcp_ports"`
	// UDPPorts are the UDP destination ports whose datagrams are relayed by
	// the proxy; empty (the default) intercepts no UDP.
	UDPPorts []int `mapstructure:"udp_ports"`
	// ClientCIDRs and ServerCIDRs select the flows that are proxied, by
	// client and by server address: prefixes ("192.0.2.0/24") or bare
	// addresses (a /32 or /128), IPv4 and IPv6 mixed; empty (the default)
	// selects every address. ExcludeClientCIDRs and ExcludeServerCIDRs
	// take flows out again. Unselected flows cross the bridge untouched.
	ClientCIDRs        []string `mapstructure:"client_cidrs"`
	ServerCIDRs        []string `mapstructure:"server_cidrs"`
	ExcludeClientCIDRs []string `mapstructure:"exclude_client_cidrs"`
	ExcludeServerCIDRs []string `mapstructure:"exclude_server_cidrs"`
}

type ProxyConfig struct {
	TCPPort        int           `mapstructure:"tcp_port"`
	ConnectTimeout time.Duration `mapstructure:"connect_timeout"`
	IdleTimeout    time.Duration `mapstructure:"idle_timeout"`
	ShutdownGrace  time.Duration `mapstructure:"shutdown_grace"`
	// ReceiveBuffer fixes each proxied socket's receive buffer ("4MiB");
	// 0 leaves the kernel's autotuning (up to tcp_rmem's maximum).
	ReceiveBuffer ByteSize `mapstructure:"receive_buffer"`
	// MaxConnections is how many connections the proxy carries at once;
	// 0 derives it from the fd limit (see proxy.DefaultMaxConns).
	MaxConnections int `mapstructure:"max_connections"`
	// Overload is what happens to new connections at the limit: "bypass"
	// (bridged untouched) or "refuse" (reset).
	Overload string `mapstructure:"overload"`
	// UDPPort is the port of the proxy's transparent UDP listener (TCP and
	// UDP ports are separate: it may equal TCPPort).
	UDPPort int `mapstructure:"udp_port"`
	// UDPIdleTimeout ends a UDP session with no datagram either way for
	// this long; the bridge remembers a UDP flow as long.
	UDPIdleTimeout time.Duration `mapstructure:"udp_idle_timeout"`
	// MaxUDPSessions is how many UDP sessions the proxy keeps at once; at
	// the limit new UDP flows cross the bridge untouched.
	MaxUDPSessions int `mapstructure:"max_udp_sessions"`
}

type RoutingConfig struct {
	Mark     uint32 `mapstructure:"mark"`
	Table    int    `mapstructure:"table"`
	Priority int    `mapstructure:"priority"`
}

// PolicyConfig decides by server name: the proxy peeks at a connection's
// first bytes (TLS SNI, HTTP Host) before dialing.
type PolicyConfig struct {
	SNI      NameLists `mapstructure:"sni"`
	HTTPHost NameLists `mapstructure:"http_host"`
	// Default decides when no name is found (or inspection times out):
	// "allow" or "deny".
	Default        string        `mapstructure:"default"`
	InspectTimeout time.Duration `mapstructure:"inspect_timeout"`
}

// NameLists are names, exact or "*.suffix".
type NameLists struct {
	Allow []string `mapstructure:"allow"`
	Deny  []string `mapstructure:"deny"`
}

// MetricsConfig is the Prometheus endpoint.
type MetricsConfig struct {
	// Listen is IP:PORT for /metrics; empty: no endpoint.
	Listen string `mapstructure:"listen"`
}

type LogConfig struct {
	Level string `mapstructure:"level"`
	// Format is "text" (logfmt-like key=value) or "json" (one object per
	// line, for log shippers).
	Format string `mapstructure:"format"`
}

// defaults are also the list of keys viper knows, which is what makes
// GHOSTWIRE_* environment variables reach every key.
var defaults = map[string]any{
	"bridge.name":              "br0",
	"bridge.client_nic":        "",
	"bridge.server_nic":        "",
	"bridge.addresses":         []string{},
	"bridge.routes":            []string{},
	"bridge.invisible":         false,
	"bridge.neighbour_timeout": "60s",
	"intercept.tcp_ports":      []int{80, 443},
	"intercept.udp_ports":      []int{},
	"proxy.tcp_port":           9876,
	"proxy.connect_timeout":    "5s",
	"proxy.idle_timeout":       "5m",
	"proxy.shutdown_grace":     "30s",
	"proxy.max_connections":    0,
	"proxy.receive_buffer":     "4MiB",
	"proxy.overload":           "bypass",
	"proxy.udp_port":           9877,
	"proxy.udp_idle_timeout":   "60s",
	"proxy.max_udp_sessions":   65536,
	"routing.mark":             1,
	"routing.table":            100,
	"routing.priority":         1000,
	"log.level":                "info",
	"log.format":               "text",
	"policy.sni.allow":         []string{},
	"policy.sni.deny":          []string{},
	"policy.http_host.allow":   []string{},
	"policy.http_host.deny":    []string{},
	"policy.default":           "allow",
	"policy.inspect_timeout":   "2s",
	"metrics.listen":           "",
	"state_file":               "/var/lib/ghostwire/state.json",
	"control_socket":           "/run/ghostwire/control.sock",

	// The selection (rules.Config.ClientCIDRs...): empty selects everything.
	"intercept.client_cidrs":         []string{},
	"intercept.server_cidrs":         []string{},
	"intercept.exclude_client_cidrs": []string{},
	"intercept.exclude_server_cidrs": []string{},
}

// Load reads the config file (if path is not empty), then GHOSTWIRE_* env
// (GHOSTWIRE_PROXY_TCP_PORT=9000), then overrides (flag values keyed like
// "proxy.tcp_port"), and validates the result. Unknown keys are errors.
func Load(path string, overrides map[string]any) (*Config, error) {
	v := viper.New()
	for k, d := range defaults {
		v.SetDefault(k, d)
	}
	v.SetEnvPrefix("GHOSTWIRE")
	v.SetEnvKeyReplacer(strings.NewReplacer(".", "_"))
	v.AutomaticEnv()
	if path != "" {
		v.SetConfigFile(path)
		v.SetConfigType("yaml")
		if err := v.ReadInConfig(); err != nil {
			return nil, fmt.Errorf("reading config %s: %w", path, err)
		}
	}
	for k, val := range overrides {
		if _, ok := defaults[k]; !ok {
			return nil, fmt.Errorf("unknown config key %q", k)
		}
		v.Set(k, val)
	}
	var c Config
	err := v.UnmarshalExact(&c, viper.DecodeHook(mapstructure.ComposeDecodeHookFunc(
		mapstructure.StringToTimeDurationHookFunc(),
		mapstructure.StringToSliceHookFunc(","),
		stringToUintHook,
		stringToByteSizeHook,
	)))
	if err != nil {
		return nil, fmt.Errorf("config %s: %w", describe(path), unknownKeys(err))
	}
	if err := c.Validate(); err != nil {
		return nil, fmt.Errorf("config %s: %w", describe(path), err)
	}
	return &c, nil
}

// invalidKeys matches mapstructure's "'SECTION' has invalid keys: A, B".
var invalidKeys = regexp.MustCompile(`'([a-z_.]*)' has invalid keys: ([^\n]+)`)

// unknownKeys restates mapstructure's unknown-key errors in config terms
// ("unknown config key intercept.udp_portz"); other errors pass through.
func unknownKeys(err error) error {
	ms := invalidKeys.FindAllStringSubmatch(err.Error(), -1)
	if len(ms) == 0 {
		return err
	}
	var keys []string
	for _, m := range ms {
		for _, k := range strings.Split(m[2], ", ") {
			if m[1] != "" {
				k = m[1] + "." + k
			}
			keys = append(keys, k)
		}
	}
	var why []string
	for _, k := range keys {
		if r, ok := removedKeys[k]; ok {
			why = append(why, fmt.Sprintf("%s was removed: %s", k, r))
		}
	}
	if len(why) > 0 {
		return fmt.Errorf("unknown config key(s): %s (%s)", strings.Join(keys, ", "), strings.Join(why, "; "))
	}
	return fmt.Errorf("unknown config key(s): %s", strings.Join(keys, ", "))
}

// removedKeys say why a key that older configs carry is gone, and what to do.
var removedKeys = map[string]string{
	"proxy.offload": "kernel forwarding (sockmap) let a peer queue without limit on the box; every byte is now relayed with flow control. Delete the line",
}

func describe(path string) string {
	if path == "" {
		return "(no file)"
	}
	return path
}

// stringToUintHook lets the mark be written as "0x1" in env vars and flags
// (YAML already reads 0x1 as a number).
func stringToUintHook(from, to reflect.Type, data any) (any, error) {
	s, ok := data.(string)
	if !ok || to.Kind() != reflect.Uint32 {
		return data, nil
	}
	var n uint64
	if _, err := fmt.Sscan(s, &n); err != nil {
		var x uint32
		if _, err := fmt.Sscanf(s, "0x%x", &x); err != nil {
			return nil, fmt.Errorf("%q is not a number", s)
		}
		return x, nil
	}
	return n, nil
}

// Validate checks everything that can be checked without a kernel.
func (c *Config) Validate() error {
	var errs []error
	bad := func(format string, a ...any) { errs = append(errs, fmt.Errorf(format, a...)) }
	if c.Bridge.ClientNIC == "" {
		bad("bridge.client_nic is required")
	}
	if c.Bridge.ServerNIC == "" {
		bad("bridge.server_nic is required")
	}
	if c.Bridge.ClientNIC != "" && c.Bridge.ServerNIC != "" {
		if _, err := c.BridgeSpec(); err != nil {
			errs = append(errs, err)
		}
	}
	if len(c.Intercept.TCPPorts) == 0 {
		bad("intercept.tcp_ports is empty: nothing to intercept")
	}
	portsOK := true
	for _, ports := range []struct {
		key   string
		ports []int
	}{{"intercept.tcp_ports", c.Intercept.TCPPorts}, {"intercept.udp_ports", c.Intercept.UDPPorts}} {
		for _, p := range ports.ports {
			if !validPort(p) {
				bad("%s: port %d is outside 1-65535", ports.key, p)
				portsOK = false
			}
		}
	}
	c.checkProxy(bad)
	for _, l := range c.selectionLists() {
		if _, err := parseCIDRs(l.key, l.entries); err != nil {
			errs = append(errs, err)
		}
	}
	// What the diversion needs of ports and routing is checked once, by
	// rules (without the bridge's MAC, which the kernel supplies later),
	// and said here in config keys. Numbers that do not fit its types
	// were refused above.
	if portsOK && validPort(c.Proxy.TCPPort) && validPort(c.Proxy.UDPPort) {
		if err := c.RulesConfig(nil).Validate(); err != nil {
			// The interface names are the bridge spec's to report (the
			// same rule, bridge.ValidIfName, checked above).
			errs = append(errs, inConfigKeys(err, "Bridge", "ClientPort", "ServerPort"))
		}
	}
	if _, err := c.LogLevel(); err != nil {
		errs = append(errs, err)
	}
	if f := c.Log.Format; f != "text" && f != "json" {
		bad("log.format: %q is not one of text, json", f)
	}
	if _, err := c.NamePolicy(); err != nil {
		errs = append(errs, err)
	}
	if a := c.Metrics.Listen; a != "" {
		c.checkMetricsListen(a, bad)
	}
	if c.StateFile == "" {
		bad("state_file is empty")
	}
	if c.ControlSocket == "" {
		bad("control_socket is empty")
	}
	return errors.Join(errs...)
}

// validPort is a port number a config key may hold.
func validPort(p int) bool { return p >= 1 && p <= 65535 }

// checkProxy reports, through bad, what is wrong with the proxy section.
func (c *Config) checkProxy(bad func(format string, a ...any)) {
	for _, p := range []struct {
		key  string
		port int
	}{{"proxy.tcp_port", c.Proxy.TCPPort}, {"proxy.udp_port", c.Proxy.UDPPort}} {
		if !validPort(p.port) {
			bad("%s: %d is outside 1-65535", p.key, p.port)
		}
	}
	for _, d := range []struct {
		key string
		v   time.Duration
	}{
		{"proxy.connect_timeout", c.Proxy.ConnectTimeout}, {"proxy.idle_timeout", c.Proxy.IdleTimeout},
		{"proxy.shutdown_grace", c.Proxy.ShutdownGrace}, {"proxy.udp_idle_timeout", c.Proxy.UDPIdleTimeout},
	} {
		if d.v <= 0 {
			bad("%s: %s must be positive", d.key, d.v)
		}
	}
	if rb := c.Proxy.ReceiveBuffer; rb != 0 && (rb < minReceiveBuffer || rb > maxReceiveBuffer) {
		bad("proxy.receive_buffer: %s must be 0 (kernel autotuning) or between %s and %s", rb, ByteSize(minReceiveBuffer), ByteSize(maxReceiveBuffer))
	}
	if c.Proxy.MaxConnections < 0 {
		bad("proxy.max_connections: %d must be 0 (derived from the fd limit) or positive", c.Proxy.MaxConnections)
	}
	if c.Proxy.MaxUDPSessions < 1 {
		bad("proxy.max_udp_sessions: %d must be at least 1", c.Proxy.MaxUDPSessions)
	}
	if _, err := rules.ParseOverload(c.Proxy.Overload); err != nil {
		bad("proxy.overload: %q must be bypass (new connections cross the bridge untouched) or refuse (they are reset)", c.Proxy.Overload)
	}
}

// overload is proxy.overload as rules reads it; Load has validated it.
func (c *Config) overload() rules.Overload {
	mode, _ := rules.ParseOverload(c.Proxy.Overload)
	return mode
}

// BridgeSpec turns the bridge section into a bridge.Spec.
func (c *Config) BridgeSpec() (bridge.Spec, error) {
	s := bridge.Spec{Name: c.Bridge.Name, Ports: []string{c.Bridge.ClientNIC, c.Bridge.ServerNIC}, Invisible: c.Bridge.Invisible}
	// The name rule is bridge's (ValidIfName); here it is said in keys.
	for _, n := range []struct{ key, name string }{
		{"bridge.name", c.Bridge.Name}, {"bridge.client_nic", c.Bridge.ClientNIC}, {"bridge.server_nic", c.Bridge.ServerNIC},
	} {
		if err := bridge.ValidIfName(n.name); err != nil {
			return s, fmt.Errorf("%s: %w", n.key, err)
		}
	}
	for _, a := range c.Bridge.Addresses {
		p, err := netip.ParsePrefix(a)
		if err != nil {
			return s, fmt.Errorf("bridge.addresses: %q is not an address with prefix length (like 192.0.2.254/24): %w", a, err)
		}
		s.Addresses = append(s.Addresses, p)
	}
	for _, r := range c.Bridge.Routes {
		rt, err := bridge.ParseRoute(r)
		if err != nil {
			return s, fmt.Errorf("bridge.routes: %w", err)
		}
		s.Routes = append(s.Routes, rt)
	}
	if err := s.Validate(); err != nil {
		return s, fmt.Errorf("bridge: %w", err)
	}
	return s, nil
}

// TableName is the name of ghostwire's nftables tables (one per family).
const TableName = "ghostwire"

// RulesConfig is the rules package's view; the bridge MAC comes from the kernel.
func (c *Config) RulesConfig(mac []byte) rules.Config {
	return rules.Config{
		Name:         TableName,
		Bridge:       c.Bridge.Name,
		ClientPort:   c.Bridge.ClientNIC,
		ServerPort:   c.Bridge.ServerNIC,
		BridgeMAC:    mac,
		TCPPorts:     ports16(c.Intercept.TCPPorts),
		ProxyTCPPort: uint16(c.Proxy.TCPPort),
		Mark:         c.Routing.Mark,
		RouteTable:   c.Routing.Table,
		RulePriority: c.Routing.Priority,
		// A bypassed flow is remembered as long as a proxied one may idle
		// (within what rules accepts: whole seconds, at most a week).
		BypassTimeout: flowTimeout(c.Proxy.IdleTimeout.Round(time.Second)),
		UDPPorts:      ports16(c.Intercept.UDPPorts),
		ProxyUDPPort:  uint16(c.Proxy.UDPPort),
		// The bridge remembers a UDP flow at least as long as the proxy
		// keeps its session (rounded up to whole seconds), so under
		// UDPBypass an idle but live session keeps its diversion.
		UDPSessionTimeout: flowTimeout((c.Proxy.UDPIdleTimeout + time.Second - 1).Truncate(time.Second)),
		// Validate has refused entries that do not parse.
		ClientCIDRs:        mustCIDRs(c.Intercept.ClientCIDRs),
		ServerCIDRs:        mustCIDRs(c.Intercept.ServerCIDRs),
		ExcludeClientCIDRs: mustCIDRs(c.Intercept.ExcludeClientCIDRs),
		ExcludeServerCIDRs: mustCIDRs(c.Intercept.ExcludeServerCIDRs),
		Invisible:          c.Bridge.Invisible,
		NeighbourTimeout:   c.Bridge.NeighbourTimeout,
	}
}

// selectionLists are the intercept section's four prefix lists by key.
func (c *Config) selectionLists() []struct {
	key     string
	entries []string
} {
	return []struct {
		key     string
		entries []string
	}{
		{"intercept.client_cidrs", c.Intercept.ClientCIDRs},
		{"intercept.server_cidrs", c.Intercept.ServerCIDRs},
		{"intercept.exclude_client_cidrs", c.Intercept.ExcludeClientCIDRs},
		{"intercept.exclude_server_cidrs", c.Intercept.ExcludeServerCIDRs},
	}
}

// parseCIDRs reads the entries of the list at key: each a prefix
// ("192.0.2.0/24", "2001:db8::/32"; host bits are masked off) or a bare
// address (a /32 or /128). Every bad entry is named in the error.
func parseCIDRs(key string, entries []string) ([]netip.Prefix, error) {
	var out []netip.Prefix
	var errs []error
	for _, e := range entries {
		s := strings.TrimSpace(e)
		if strings.Contains(s, "/") {
			p, err := netip.ParsePrefix(s)
			if err != nil {
				errs = append(errs, fmt.Errorf("%s: %q is not an address or prefix (like 192.0.2.0/24, 2001:db8::/32 or 192.0.2.7): %w", key, e, err))
				continue
			}
			out = append(out, p.Masked())
			continue
		}
		a, err := netip.ParseAddr(s)
		if err == nil && a.Zone() != "" {
			err = errors.New("a zone is not an address")
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("%s: %q is not an address or prefix (like 192.0.2.0/24, 2001:db8::/32 or 192.0.2.7): %w", key, e, err))
			continue
		}
		out = append(out, netip.PrefixFrom(a, a.BitLen()))
	}
	return out, errors.Join(errs...)
}

// mustCIDRs is parseCIDRs of entries Validate has checked (any bad one
// is left out).
func mustCIDRs(entries []string) []netip.Prefix {
	ps, _ := parseCIDRs("", entries)
	return ps
}

// flowTimeout is d, whole seconds, within what rules accepts for a flow
// set's timeout (1s to a week).
func flowTimeout(d time.Duration) time.Duration { return min(max(d, time.Second), 7*24*time.Hour) }

// ports16 is ports as rules takes them, sorted and deduplicated; Validate
// has checked they fit.
func ports16(ports []int) []uint16 {
	out := make([]uint16, 0, len(ports))
	for _, p := range ports {
		out = append(out, uint16(p))
	}
	slices.Sort(out)
	return slices.Compact(out)
}

// checkMetricsListen refuses a metrics address the box would intercept,
// or one on the bridged segment that is not a br0 address: scrapes would
// reach the proxy as diverted traffic, or the box would answer for a host
// on the segment.
func (c *Config) checkMetricsListen(a string, bad func(format string, a ...any)) {
	ap, err := netip.ParseAddrPort(a)
	if err != nil {
		bad("metrics.listen: %q is not IP:PORT (like 127.0.0.1:9109 or [::1]:9109): %v", a, err)
		return
	}
	if slices.Contains(c.Intercept.TCPPorts, int(ap.Port())) {
		bad("metrics.listen: port %d is in intercept.tcp_ports: the box would divert scrapes to the proxy", ap.Port())
	}
	ip := ap.Addr().Unmap()
	for _, s := range c.Bridge.Addresses {
		p, err := netip.ParsePrefix(s)
		if err != nil {
			continue // reported by the bridge section
		}
		if p.Addr() == ip {
			return
		}
		if p.Masked().Contains(ip) {
			bad("metrics.listen: %s is on the bridged segment (%s) but is not a br0 address: use one of bridge.addresses, or loopback", ip, p.Masked())
			return
		}
	}
}

// NamePolicy is the policy section as the proxy takes it.
func (c *Config) NamePolicy() (inspect.Policy, error) {
	var errs []error
	list := func(key string, names []string) inspect.List {
		l, err := inspect.NewList(names)
		if err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", key, err))
		}
		return l
	}
	p := inspect.Policy{
		SNIAllow:  list("policy.sni.allow", c.Policy.SNI.Allow),
		SNIDeny:   list("policy.sni.deny", c.Policy.SNI.Deny),
		HostAllow: list("policy.http_host.allow", c.Policy.HTTPHost.Allow),
		HostDeny:  list("policy.http_host.deny", c.Policy.HTTPHost.Deny),
	}
	switch c.Policy.Default {
	case "allow":
		p.DefaultAllow = true
	case "deny":
	default:
		errs = append(errs, fmt.Errorf("policy.default: %q must be allow or deny", c.Policy.Default))
	}
	if c.Policy.InspectTimeout <= 0 {
		errs = append(errs, fmt.Errorf("policy.inspect_timeout: %s must be positive", c.Policy.InspectTimeout))
	}
	return p, errors.Join(errs...)
}

// LogLevel parses log.level.
func (c *Config) LogLevel() (slog.Level, error) {
	var l slog.Level
	if err := l.UnmarshalText([]byte(c.Log.Level)); err != nil {
		return 0, fmt.Errorf("log.level: %q is not one of debug, info, warn, error", c.Log.Level)
	}
	return l, nil
}
