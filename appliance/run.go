package appliance

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"runtime"
	"slices"
	"syscall"
	"time"

	"github.com/coreos/go-systemd/v22/daemon"
	"github.com/google/nftables"
	"github.com/vishvananda/netlink"

	"github.com/ghostwire/ghostwire/proxy"
	"github.com/ghostwire/ghostwire/rules"
)

// Runner is `ghostwire run`: the proxy plus the diversion it owns.
type Runner struct {
	Path      string         // config file
	Overrides map[string]any // flag values
	Level     *slog.LevelVar // changed on reload
	Logger    *slog.Logger
}

// Run serves until ctx is done or SIGTERM/SIGINT, reloading on SIGHUP.
//
// The order is what keeps the wire whole: listeners first, then the
// diversion (owned: the kernel deletes it when this process's netlink
// socket closes, however the process dies). On SIGTERM new SYNs stop being
// diverted (they are routed straight through), established flows drain up
// to proxy.shutdown_grace, then the tables go and frames are plainly bridged.
func (r *Runner) Run(ctx context.Context) error {
	cfg, err := Load(r.Path, r.Overrides)
	if err != nil {
		return err
	}
	lvl, _ := cfg.LogLevel()
	r.Level.Set(lvl)
	log := r.Logger
	// Catch signals before the diversion exists: a SIGTERM that lands
	// during start-up must drain, not kill the process with default action.
	sigs := make(chan os.Signal, 4)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT, syscall.SIGHUP, syscall.SIGUSR1)
	defer signal.Stop(sigs)

	h, err := netlink.NewHandle()
	if err != nil {
		return fmt.Errorf("opening netlink: %w", err)
	}
	defer h.Close()
	plan, err := divertPlan(h, cfg, nil)
	if err != nil {
		return err
	}
	// The proxy reports overload changes here; the loop below, which owns
	// the plan and the netlink socket, switches the diversion.
	overloadc := make(chan struct{}, 1)
	pcfg, err := proxyConfig(cfg, log)
	if err != nil {
		return err
	}
	pcfg.OnOverload = func(proxy.Overload) {
		select {
		case overloadc <- struct{}{}:
		default:
		}
	}
	p, err := proxy.New(pcfg)
	if err != nil {
		return err
	}
	if err := p.Start(); err != nil {
		return fmt.Errorf("starting proxy: %w", err)
	}
	// One lasting socket for the life of the process: it owns the tables.
	nft, err := nftables.New(nftables.AsLasting())
	if err != nil {
		p.Shutdown(context.Background())
		return fmt.Errorf("opening nftables netlink: %w", err)
	}
	defer nft.CloseLasting()
	if err := plan.ApplyOwned(nft); err != nil {
		p.Shutdown(context.Background())
		return fmt.Errorf("installing owned diversion: %w", err)
	}
	serveErr := make(chan error, 1)
	go func() { serveErr <- p.Serve(ctx) }()
	log.Info("intercepting", "bridge", cfg.Bridge.Name, "tcp_ports", cfg.Intercept.TCPPorts, "proxy_port", cfg.Proxy.TCPPort,
		"max_connections", pcfg.MaxConns, "overload", cfg.Proxy.Overload, "conn_memory_bound_bytes", connMemoryBound(cfg, log))
	daemon.SdNotify(false, daemon.SdNotifyReady)

	var tick <-chan time.Time
	if iv, err := daemon.SdWatchdogEnabled(false); err == nil && iv > 0 {
		t := time.NewTicker(iv / 3)
		defer t.Stop()
		tick = t.C
	}
	linger := time.NewTicker(lingerCheck)
	defer linger.Stop()
	for {
		select {
		case <-tick:
			daemon.SdNotify(false, daemon.SdNotifyWatchdog)
		case <-overloadc:
			if err := r.overloadPlan(plan, cfg, p).ApplyOwned(nft); err != nil {
				log.Error("switching the diversion for overload", "overloaded", p.Overloaded(), "err", err)
			}
		case <-linger.C:
			if nplan, err := r.shrinkLinger(plan, cfg, nft, p); err != nil {
				log.Error("updating diversion for ports dropped on reload", "err", err)
			} else {
				plan = nplan
			}
		case err := <-serveErr:
			if ctx.Err() != nil { // Serve saw the cancellation first
				return r.drain(cfg, plan, nft, p)
			}
			return fmt.Errorf("proxy stopped: %w", err)
		case <-ctx.Done():
			return r.drain(cfg, plan, nft, p)
		case s := <-sigs:
			if s == syscall.SIGUSR1 {
				logStats(log, p)
				continue
			}
			if s != syscall.SIGHUP {
				log.Info("stopping", "signal", s.String(), "grace", cfg.Proxy.ShutdownGrace)
				return r.drain(cfg, plan, nft, p)
			}
			daemon.SdNotify(false, daemon.SdNotifyReloading)
			ncfg, nplan, err := r.reload(cfg, plan, h, nft, p)
			if err != nil {
				log.Error("reload refused; keeping the running config", "err", err)
			} else {
				cfg, plan = ncfg, nplan
				log.Info("reloaded", "tcp_ports", cfg.Intercept.TCPPorts, "lingering", plan.Config().LingerPorts, "idle_timeout", cfg.Proxy.IdleTimeout, "log_level", cfg.Log.Level)
			}
			daemon.SdNotify(false, daemon.SdNotifyReady)
		}
	}
}

// logStats is SIGUSR1: one "stats" line with the proxy's counters and the
// process's own use, so an operator (and the soak test) can watch for
// leaks without a debugger.
func logStats(log *slog.Logger, p *proxy.Proxy) {
	st := p.Stats()
	log.Info("stats",
		"active", st.Active, "accepted", st.Accepted, "refused", st.Refused,
		"dial_failed", st.DialFailed, "bytes_up", st.BytesUp, "bytes_down", st.BytesDown,
		"parked", st.Parked, "overloaded", st.Overloaded, "overload_refused", st.OverloadRefused,
		"goroutines", runtime.NumGoroutine())
}

func divertPlan(h *netlink.Handle, cfg *Config, linger []uint16) (*rules.Plan, error) {
	spec, err := cfg.BridgeSpec()
	if err != nil {
		return nil, err
	}
	if drift, err := spec.Check(h); err != nil {
		return nil, err
	} else if len(drift) > 0 {
		return nil, fmt.Errorf("box is not provisioned (%s): run `ghostwire apply` first", drift[0])
	}
	mac, err := spec.MAC(h)
	if err != nil {
		return nil, err
	}
	rc := cfg.RulesConfig(mac)
	rc.LingerPorts = linger
	plan, err := rules.NewPlan(rc)
	if err != nil {
		return nil, fmt.Errorf("building rule plan: %w", err)
	}
	return plan, nil
}

// lingerCheck is how often ports dropped by a reload are re-examined.
const lingerCheck = 2 * time.Second

// lingering are the ports the old plan diverted that still carry proxied
// connections: a reload must not strand them (their frames would be
// bridged past the proxy that both ends are talking to).
func lingering(old *rules.Plan, p *proxy.Proxy) []uint16 {
	c := old.Config()
	diverted := append(c.TCPPorts, c.LingerPorts...)
	var out []uint16
	for _, port := range p.ActivePorts() {
		if slices.Contains(diverted, port) {
			out = append(out, port)
		}
	}
	return out
}

// overloadPlan is plan as the diversion must be now: while the proxy is
// overloaded, new connections bypass it or are refused (proxy.overload).
// plan itself is always the normal variant.
func (r *Runner) overloadPlan(plan *rules.Plan, cfg *Config, p *proxy.Proxy) *rules.Plan {
	if !p.Overloaded() {
		return plan
	}
	mode, _ := rules.ParseOverload(cfg.Proxy.Overload) // validated by Load
	return plan.Overloaded(mode)
}

// shrinkLinger drops lingering ports whose last proxied connection ended.
func (r *Runner) shrinkLinger(plan *rules.Plan, cfg *Config, nft *nftables.Conn, p *proxy.Proxy) (*rules.Plan, error) {
	c := plan.Config()
	if len(c.LingerPorts) == 0 {
		return plan, nil
	}
	active := p.ActivePorts()
	keep := slices.DeleteFunc(slices.Clone(c.LingerPorts), func(port uint16) bool { return !slices.Contains(active, port) })
	if len(keep) == len(c.LingerPorts) {
		return plan, nil
	}
	dropped := slices.DeleteFunc(slices.Clone(c.LingerPorts), func(port uint16) bool { return slices.Contains(keep, port) })
	c.LingerPorts = keep
	nplan, err := rules.NewPlan(c)
	if err != nil {
		return plan, err
	}
	if err := r.overloadPlan(nplan, cfg, p).ApplyOwned(nft); err != nil {
		return plan, err
	}
	r.Logger.Info("stopped diverting ports with no proxied connections left", "ports", dropped, "lingering", keep)
	return nplan, nil
}

func proxyConfig(cfg *Config, log *slog.Logger) (proxy.Config, error) {
	n, err := maxConns(cfg)
	if err != nil {
		return proxy.Config{}, err
	}
	return proxy.Config{
		Port:           uint16(cfg.Proxy.TCPPort),
		ConnectTimeout: cfg.Proxy.ConnectTimeout,
		IdleTimeout:    cfg.Proxy.IdleTimeout,
		MaxConns:       n,
		ReceiveBuffer:  int(cfg.Proxy.ReceiveBuffer),
		RefuseOverload: cfg.Proxy.Overload == "refuse",
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

// reload applies what can change live (intercepted ports, timeouts, log
// level) and refuses the rest, keeping the running config.
func (r *Runner) reload(old *Config, oldPlan *rules.Plan, h *netlink.Handle, nft *nftables.Conn, p *proxy.Proxy) (*Config, *rules.Plan, error) {
	cfg, err := Load(r.Path, r.Overrides)
	if err != nil {
		return nil, nil, err
	}
	if err := liveChangeable(old, cfg); err != nil {
		return nil, nil, err
	}
	n, err := maxConns(cfg)
	if err != nil {
		return nil, nil, err
	}
	plan, err := divertPlan(h, cfg, lingering(oldPlan, p))
	if err != nil {
		return nil, nil, err
	}
	if err := r.overloadPlan(plan, cfg, p).ApplyOwned(nft); err != nil {
		return nil, nil, fmt.Errorf("replacing diversion: %w", err)
	}
	p.SetTimeouts(cfg.Proxy.ConnectTimeout, cfg.Proxy.IdleTimeout)
	p.SetRefuseOverload(cfg.Proxy.Overload == "refuse")
	p.SetMaxConns(n)
	lvl, _ := cfg.LogLevel()
	r.Level.Set(lvl)
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
	fixed("proxy.receive_buffer", old.Proxy.ReceiveBuffer, cfg.Proxy.ReceiveBuffer)
	fixed("routing", old.Routing, cfg.Routing)
	fixed("state_file", old.StateFile, cfg.StateFile)
	return errors.Join(errs...)
}

// acceptSettle is how long a stopping proxy keeps accepting after new SYNs
// stop being diverted to it: a few round trips of a LAN.
const acceptSettle = 300 * time.Millisecond

// drain stops diverting new connections, lets established ones finish
// within the grace period, then drops the diversion by closing its owner.
func (r *Runner) drain(cfg *Config, plan *rules.Plan, nft *nftables.Conn, p *proxy.Proxy) error {
	daemon.SdNotify(false, daemon.SdNotifyStopping)
	if err := plan.Draining().ApplyOwned(nft); err != nil {
		r.Logger.Error("could not stop diverting new connections; draining anyway", "err", err)
	} else {
		// From here on new connections are routed past the proxy.
		r.Logger.Info("draining", "active", p.Stats().Active)
	}
	// Handshakes the old ruleset sent here are still completing: take them.
	p.StopAccepting(acceptSettle)
	ctx, cancel := context.WithTimeout(context.Background(), cfg.Proxy.ShutdownGrace)
	defer cancel()
	if err := p.Shutdown(ctx); err != nil {
		r.Logger.Warn("grace period over; closed remaining connections", "err", err)
	}
	st := p.Stats()
	r.Logger.Info("stopped", "accepted", st.Accepted, "refused", st.Refused)
	return nil
}
