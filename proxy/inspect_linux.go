package proxy

import (
	"log/slog"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ghostwire/ghostwire/proxy/inspect"
)

// Policy by name: with Config.Policy enabled, a connection waits in
// inspecting (before any upstream SYN) until its first bytes name the
// server (TLS SNI, HTTP Host), or prove they will not, or
// Config.InspectTimeout runs out; the policy then allows it (it is
// dialed and relayed, those bytes included: they were only peeked at) or
// denies it (the client is reset; no upstream connection was made).

// inspectState is what inspecting learned, for the log.
type inspectState struct {
	kind     inspect.Kind
	name     string
	decision string // "allow" or "deny"; "" when the connection was not inspected
	why      string
}

// attrs are the log's fields for it: the name under its kind's key, the
// decision and why (without a policy, the name alone, if the first read
// carried one whole).
func (s inspectState) attrs() slog.Attr {
	if s.decision == "" && s.name == "" {
		return slog.Attr{}
	}
	key := "name"
	switch s.kind {
	case inspect.TLS:
		key = "sni"
	case inspect.HTTP:
		key = "host"
	}
	if s.decision == "" { // named by the first read; no policy
		return slog.String(key, s.name)
	}
	return slog.Group("", slog.String(key, s.name), slog.String("decision", s.decision), slog.String("policy", s.why))
}

// policy is the current policy and its timeout (SetPolicy changes them).
type policy struct {
	p       *inspect.Policy // nil: none
	timeout time.Duration
}

// enabled reports whether connections must be inspected.
func (pol *policy) enabled() bool { return pol.p != nil && pol.p.Enabled() }

// inspectEvent peeks at what the client sent so far and decides once the
// bytes say enough.
func (l *loop) inspectEvent(c *conn) {
	if !c.client.readable {
		return
	}
	n, _, err := unix.Recvfrom(c.client.fd, l.buf[:inspect.MaxPeek], unix.MSG_PEEK|unix.MSG_DONTWAIT)
	switch {
	case err == unix.EAGAIN:
		c.client.readable = false
		return
	case err != nil:
		l.abort(c, failReason("client", err))
		return
	}
	kind, name, perr := inspect.Name(l.buf[:n])
	if perr == inspect.ErrNeedMore && n > 0 && n < inspect.MaxPeek && !c.client.rdhup {
		// The bytes stay queued; the next ones come with a new edge.
		c.client.readable = false
		return
	}
	if perr != nil {
		name = "" // malformed or incomplete for good: no name
	}
	l.decide(c, kind, name, "")
}

// decide applies the policy to what inspecting found (name "" for none);
// note says why there is none, when that is worth saying (a timeout).
func (l *loop) decide(c *conn, kind inspect.Kind, name, note string) {
	allow, why := true, "no policy" // it was switched off since
	if pol := l.p.policy.Load(); pol.p != nil {
		allow, why = pol.p.Decide(kind, name)
	}
	if note != "" {
		why = note + ": " + why
	}
	c.insp = inspectState{kind: kind, name: name, decision: "allow", why: why}
	if !allow {
		c.insp.decision = "deny"
		l.p.policyDenied.Add(1)
		l.abort(c, "policy: "+why)
		return
	}
	l.p.policyAllowed.Add(1)
	// What was peeked is still queued: the relay reads it first.
	c.client.readable = true
	c.state, c.since = dialing, l.p.now()
	l.dial(c)
}
