package appliance

import (
	"context"
	"time"

	"github.com/coreos/go-systemd/v22/daemon"
)

// acceptSettle is how long a stopping proxy keeps accepting after new SYNs
// stop being diverted to it: a few round trips of a LAN.
const acceptSettle = 300 * time.Millisecond

// drain stops diverting new connections, lets established ones finish
// within the grace period, then drops the diversion by closing its owner.
func (s *session) drain() error {
	daemon.SdNotify(false, daemon.SdNotifyStopping)
	log := s.r.Logger
	if err := s.plan.Draining().ApplyOwned(s.nft); err != nil {
		log.Error("could not stop diverting new connections; draining anyway", "err", err)
	} else {
		// From here on new connections are routed past the proxy.
		log.Info("draining", "active", s.p.Active())
	}
	// Handshakes the old ruleset sent here are still completing: take them.
	s.p.StopAccepting(acceptSettle)
	ctx, cancel := context.WithTimeout(context.Background(), s.cfg.Proxy.ShutdownGrace)
	defer cancel()
	if err := s.p.Shutdown(ctx); err != nil {
		log.Warn("grace period over; closed remaining connections", "err", err)
	}
	st := s.p.Stats()
	log.Info("stopped", "accepted", st.Accepted, "refused", st.Refused)
	return nil
}
