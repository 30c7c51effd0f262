package appliance

import (
	"fmt"
	"log/slog"
	"runtime"

	"github.com/ghostwire/ghostwire/proxy"
	"github.com/ghostwire/ghostwire/rules"
)

// logStats is SIGUSR1: one "stats" line with the proxy's counters and the
// process's own use, so an operator (and the soak test) can watch for
// leaks without a debugger.
func logStats(log *slog.Logger, p *proxy.Proxy) {
	st := p.Stats()
	log.Info("stats",
		"active", st.Active, "accepted", st.Accepted, "refused", st.Refused,
		"dial_failed", st.DialFailed, "port_fallbacks", st.PortFallbacks, "bytes_up", st.BytesUp, "bytes_down", st.BytesDown,
		"overloaded", st.Overloaded, "overload_refused", st.OverloadRefused,
		"udp_sessions", st.UDPSessions, "udp_sessions_total", st.UDPSessionsTotal,
		"udp_port_fallbacks", st.UDPPortFallbacks, "udp_overloaded", st.UDPOverloaded, "udp_dropped", st.UDPDropped,
		"policy_allowed", st.PolicyAllowed, "policy_denied", st.PolicyDenied,
		"goroutines", runtime.NumGoroutine())
}

func proxyConfig(cfg *Config, log *slog.Logger) (proxy.Config, error) {
	n, err := maxConns(cfg)
	if err != nil {
		return proxy.Config{}, err
	}
	pol, err := cfg.NamePolicy()
	if err != nil {
		return proxy.Config{}, err
	}
	return proxy.Config{
		Port:           uint16(cfg.Proxy.TCPPort),
		Policy:         &pol,
		InspectTimeout: cfg.Policy.InspectTimeout,
		ConnectTimeout: cfg.Proxy.ConnectTimeout,
		IdleTimeout:    cfg.Proxy.IdleTimeout,
		MaxConns:       n,
		ReceiveBuffer:  int(cfg.Proxy.ReceiveBuffer),
		RefuseOverload: cfg.overload() == rules.OverloadRefuse,
		// The UDP listener is open even with no UDP port intercepted, so
		// a reload can start intercepting some.
		UDPPort:        uint16(cfg.Proxy.UDPPort),
		UDPIdleTimeout: cfg.Proxy.UDPIdleTimeout,
		MaxUDPSessions: cfg.Proxy.MaxUDPSessions,
		Logger:         log,
	}, nil
}

// connMemoryBound is what the log states as one connection's memory
// ceiling, in bytes (0 if the sysctls cannot be read; the proxy works
// regardless).
func connMemoryBound(cfg *Config, log *slog.Logger) int64 {
	n, err := proxy.ConnMemoryBound("/proc/sys", int(cfg.Proxy.ReceiveBuffer))
	if err != nil {
		log.Warn("cannot state the per-connection memory bound", "err", err)
	}
	return n
}

// maxConns is proxy.max_connections, or its default from the fd limit. A
// value the fd limit cannot carry is refused: it could only end in EMFILE.
func maxConns(cfg *Config) (int, error) {
	n := cfg.Proxy.MaxConnections
	if n == 0 {
		return proxy.DefaultMaxConns(), nil
	}
	if ceil := proxy.MaxConnsCeiling(); n > ceil {
		return 0, fmt.Errorf("proxy.max_connections: %d needs at least %d file descriptors (two per connection, plus a reserve), but this process may open %d: raise LimitNOFILE or set at most %d",
			n, 2*n+1024, 2*ceil+1024, ceil)
	}
	return n, nil
}
