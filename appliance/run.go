package appliance

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"os"
	"os/signal"
	"runtime"
	"syscall"
	"time"

	"github.com/coreos/go-systemd/v22/daemon"
	"github.com/google/nftables"
	"github.com/vishvananda/netlink"

	"github.com/ghostwire/ghostwire/provision"
	"github.com/ghostwire/ghostwire/proxy"
	"github.com/ghostwire/ghostwire/rules"
)

// Runner is `ghostwire run`: the proxy plus the diversion it owns.
type Runner struct {
	Path      string         // config file
	Overrides map[string]any // flag values
	Level     *slog.LevelVar // changed on reload
	// Out is where the log goes, as log.format says, or as JSON lines
	// whatever it says when JSON is set (--json).
	Out    io.Writer
	JSON   bool
	Logger *slog.Logger // made by Run from the above
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
	opts := &slog.HandlerOptions{Level: r.Level}
	if r.JSON || cfg.Log.Format == "json" {
		r.Logger = slog.New(slog.NewJSONHandler(r.Out, opts))
	} else {
		r.Logger = slog.New(slog.NewTextHandler(r.Out, opts))
	}
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
	s := &session{r: r, cfg: cfg, box: &provision.Box{Netlink: h}, overloadc: make(chan struct{}, 1), nftc: make(chan func()),
		healc: make(chan struct{}, 1), healer: newHealer(h, r.Logger), unansweredc: make(chan netip.Addr, 64)}
	if s.plan, err = diversion(s.box, cfg, nil); err != nil {
		return err
	}
	pcfg, err := s.startProxy()
	if err != nil {
		return err
	}
	// Before the diversion: a metrics address that cannot be served
	// stops the start while frames are still plainly bridged.
	if a := cfg.Metrics.Listen; a != "" {
		_, stop, err := serveMetrics(ctx, a, s.p.Stats, nftRuleCounters(s.plan.Config().Name), r.Logger)
		if err != nil {
			s.p.Shutdown(context.Background())
			return err
		}
		defer stop()
	}
	// The control socket too (served once the bypass list is restored).
	ctlL, err := listenControl(cfg.ControlSocket)
	if err != nil {
		s.p.Shutdown(context.Background())
		return err
	}
	defer ctlL.Close()
	// One lasting socket for the life of the process: it owns the tables.
	if s.nft, err = nftables.New(nftables.AsLasting()); err != nil {
		s.p.Shutdown(context.Background())
		return fmt.Errorf("opening nftables netlink: %w", err)
	}
	defer s.nft.CloseLasting()
	if err := s.plan.ApplyOwned(s.nft); err != nil {
		s.p.Shutdown(context.Background())
		return fmt.Errorf("installing owned diversion: %w", err)
	}
	ctl := &controller{file: bypassFile(cfg.StateFile), kernel: loopKernel{s}, stats: s.p.Stats, restored: s.healer.restored, now: time.Now}
	if err := ctl.restore(r.Logger, directKernel{s}); err != nil {
		r.Logger.Error("restoring the bypass list", "err", err)
	}
	defer serveControl(ctx, ctlL, ctl, r.Logger)()
	// Self-healing: restores the routing and bridge ports others remove.
	if want, err := healWantFor(cfg); err != nil {
		r.Logger.Error("self-healing disabled", "err", err)
	} else if w, err := startHealWatch(want, s.healc, r.Logger); err != nil {
		r.Logger.Error("self-healing disabled", "err", err)
	} else {
		defer w.stop()
	}
	serveErr := make(chan error, 1)
	go func() { serveErr <- s.p.Serve(ctx) }()
	r.Logger.Info("intercepting", "bridge", cfg.Bridge.Name, "tcp_ports", cfg.Intercept.TCPPorts, "proxy_port", cfg.Proxy.TCPPort,
		"max_connections", pcfg.MaxConns, "overload", cfg.Proxy.Overload, "conn_memory_bound_bytes", connMemoryBound(cfg, r.Logger),
		"udp_ports", cfg.Intercept.UDPPorts, "udp_port", cfg.Proxy.UDPPort, "max_udp_sessions", cfg.Proxy.MaxUDPSessions)
	daemon.SdNotify(false, daemon.SdNotifyReady)
	return s.loop(ctx, sigs, serveErr)
}

// session is one `ghostwire run` from its diversion's install to its
// drain: what the loop changes and the handles it changes it through.
type session struct {
	r    *Runner
	cfg  *Config
	plan *rules.Plan // normal variant, with the ports lingering after a reload
	box  *provision.Box
	nft  *nftables.Conn // lasting: owns the tables
	p    *proxy.Proxy
	// overloadc is where the proxy reports overload changes; the loop,
	// which owns the plan and the netlink socket, switches the diversion.
	overloadc chan struct{}
	// nftc carries the control socket's bypass changes to the loop, the
	// one user of nft.
	nftc chan func()
	// healc is where the self-healing watcher kicks the loop, which
	// restores what is missing (never while draining: the loop has ended).
	healc  chan struct{}
	healer *healer
	// unansweredc is where the proxy reports servers that did not answer
	// a connect at all; on an invisible box the loop bypasses them for a
	// while (bypassUnanswered).
	unansweredc chan netip.Addr
}

// startProxy opens the listeners; the diversion comes after them.
func (s *session) startProxy() (proxy.Config, error) {
	pcfg, err := proxyConfig(s.cfg, s.r.Logger)
	if err != nil {
		return pcfg, err
	}
	// One event loop per CPU, and one P more than loops for the Go
	// runtime: a loop blocked in epoll_wait holds its P "in a syscall",
	// and with no idle P left the runtime's monitor retakes it every
	// 20 µs and hands it between threads (a measurable share of the
	// proxy's CPU); an idle P spare stops that.
	pcfg.Loops = runtime.GOMAXPROCS(0)
	runtime.GOMAXPROCS(pcfg.Loops + 1)
	pcfg.OnOverload = func(proxy.Overload) {
		select {
		case s.overloadc <- struct{}{}:
		default:
		}
	}
	if s.cfg.Bridge.Invisible {
		pcfg.OnUnanswered = func(a netip.Addr) {
			select {
			case s.unansweredc <- a:
			default: // the loop is behind; the next dial to a will say it again
			}
		}
	}
	if s.p, err = proxy.New(pcfg); err != nil {
		return pcfg, err
	}
	if err := s.p.Start(); err != nil {
		return pcfg, fmt.Errorf("starting proxy: %w", err)
	}
	return pcfg, nil
}

// loop serves signals, the systemd watchdog, overload changes and the
// linger check until the proxy stops or the process is told to.
func (s *session) loop(ctx context.Context, sigs <-chan os.Signal, serveErr <-chan error) error {
	var tick <-chan time.Time
	if iv, err := daemon.SdWatchdogEnabled(false); err == nil && iv > 0 {
		t := time.NewTicker(iv / 3)
		defer t.Stop()
		tick = t.C
	}
	linger := time.NewTicker(lingerCheck)
	defer linger.Stop()
	log := s.r.Logger
	for {
		select {
		case <-tick:
			daemon.SdNotify(false, daemon.SdNotifyWatchdog)
		case f := <-s.nftc:
			f()
		case <-s.overloadc:
			if err := s.overloadPlan(s.plan).ApplyOwned(s.nft); err != nil {
				log.Error("switching the diversion for overload", "overloaded", s.p.Overloaded(), "err", err)
			}
		case a := <-s.unansweredc:
			s.bypassUnanswered(a)
		case <-s.healc:
			if want, err := healWantFor(s.cfg); err == nil {
				s.healer.heal(want)
			}
		case <-linger.C:
			if err := s.shrinkLinger(); err != nil {
				log.Error("updating diversion for ports dropped on reload", "err", err)
			}
		case err := <-serveErr:
			if ctx.Err() != nil { // Serve saw the cancellation first
				return s.drain()
			}
			return fmt.Errorf("proxy stopped: %w", err)
		case <-ctx.Done():
			return s.drain()
		case sig := <-sigs:
			switch sig {
			case syscall.SIGUSR1:
				logStats(log, s.p)
				s.healer.logCounts(log)
			case syscall.SIGHUP:
				s.reload()
			default:
				log.Info("stopping", "signal", sig.String(), "grace", s.cfg.Proxy.ShutdownGrace)
				return s.drain()
			}
		}
	}
}
