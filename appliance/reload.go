package appliance

import (
	"errors"
	"fmt"

	"github.com/coreos/go-systemd/v22/daemon"
	"github.com/ghostwire/ghostwire/rules"
)

// reload is SIGHUP: it applies the config file again, or logs why not and
// keeps the running one.
func (s *session) reload() {
	daemon.SdNotify(false, daemon.SdNotifyReloading)
	defer daemon.SdNotify(false, daemon.SdNotifyReady)
	cfg, plan, err := s.reloaded()
	if err != nil {
		s.r.Logger.Error("reload refused; keeping the running config", "err", err)
		return
	}
	s.cfg, s.plan = cfg, plan
	s.r.Logger.Info("reloaded", "tcp_ports", cfg.Intercept.TCPPorts, "lingering", plan.Config().LingerPorts,
		"udp_ports", cfg.Intercept.UDPPorts, "client_cidrs", cfg.Intercept.ClientCIDRs, "server_cidrs", cfg.Intercept.ServerCIDRs,
		"exclude_client_cidrs", cfg.Intercept.ExcludeClientCIDRs, "exclude_server_cidrs", cfg.Intercept.ExcludeServerCIDRs,
		"idle_timeout", cfg.Proxy.IdleTimeout, "udp_idle_timeout", cfg.Proxy.UDPIdleTimeout,
		"log_level", cfg.Log.Level)
}

// reloaded applies what can change live (intercepted TCP and UDP ports,
// the selection of hosts, timeouts, limits, log level) and refuses the rest, returning the new
// config and its plan.
func (s *session) reloaded() (*Config, *rules.Plan, error) {
	cfg, err := Load(s.r.Path, s.r.Overrides)
	if err != nil {
		return nil, nil, err
	}
	if err := liveChangeable(s.cfg, cfg); err != nil {
		return nil, nil, err
	}
	n, err := maxConns(cfg)
	if err != nil {
		return nil, nil, err
	}
	plan, err := diversion(s.box, cfg, lingering(s.plan, s.p))
	if err != nil {
		return nil, nil, err
	}
	if err := s.overloadPlan(plan).ApplyOwned(s.nft); err != nil {
		return nil, nil, fmt.Errorf("replacing diversion: %w", err)
	}
	s.p.SetTimeouts(cfg.Proxy.ConnectTimeout, cfg.Proxy.IdleTimeout)
	s.p.SetUDP(cfg.Proxy.UDPIdleTimeout, cfg.Proxy.MaxUDPSessions)
	pol, _ := cfg.NamePolicy() // Load validated it
	s.p.SetPolicy(&pol, cfg.Policy.InspectTimeout)
	s.p.SetRefuseOverload(cfg.overload() == rules.OverloadRefuse)
	s.p.SetMaxConns(n)
	lvl, _ := cfg.LogLevel()
	s.r.Level.Set(lvl)
	return cfg, plan, nil
}

// liveChangeable says which keys need a restart (or a re-apply) to change.
func liveChangeable(old, cfg *Config) error {
	var errs []error
	fixed := func(key string, a, b any) {
		if fmt.Sprint(a) != fmt.Sprint(b) {
			errs = append(errs, fmt.Errorf("%s cannot change on reload (%v -> %v): restart ghostwire", key, a, b))
		}
	}
	fixed("bridge", old.Bridge, cfg.Bridge)
	fixed("proxy.tcp_port", old.Proxy.TCPPort, cfg.Proxy.TCPPort)
	fixed("proxy.udp_port", old.Proxy.UDPPort, cfg.Proxy.UDPPort)
	fixed("proxy.receive_buffer", old.Proxy.ReceiveBuffer, cfg.Proxy.ReceiveBuffer)
	fixed("routing", old.Routing, cfg.Routing)
	fixed("state_file", old.StateFile, cfg.StateFile)
	fixed("control_socket", old.ControlSocket, cfg.ControlSocket)
	fixed("log.format", old.Log.Format, cfg.Log.Format)
	fixed("metrics.listen", old.Metrics.Listen, cfg.Metrics.Listen)
	return errors.Join(errs...)
}
