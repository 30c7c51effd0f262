package proxy

import (
	"context"
	"log/slog"
	"net"
	"time"
)

// accept takes a connection from a listener: it refuses direct ones and
// starts relaying diverted ones.
func (p *Proxy) accept(client *net.TCPConn) {
	src, _ := client.RemoteAddr().(*net.TCPAddr)
	dst := p.origDst(client)
	if src == nil || dst == nil {
		p.log.Error("cannot read the connection's addresses; resetting it")
		reset(client)
		return
	}
	c := &conn{p: p, client: client, src: src, dst: dst, start: time.Now()}
	// Addressed to the proxy port itself: nobody was diverted here, and
	// relaying it would dial the proxy again.
	if dst.Port == int(p.port) {
		p.refused.Add(1)
		reset(client)
		c.log(slog.LevelWarn, "direct connection to the proxy port")
		return
	}
	if p.lim.over(p.active.Add(1)) {
		// Not logged one by one: a flood would flood the log too. The
		// overload's end line counts them.
		p.active.Add(-1)
		p.lim.refused.Add(1)
		reset(client)
		return
	}
	p.mu.Lock()
	if p.stopped {
		p.mu.Unlock()
		p.active.Add(-1)
		reset(client)
		c.log(slog.LevelInfo, "shutdown")
		return
	}
	p.conns[c] = struct{}{}
	p.connWG.Add(1)
	p.mu.Unlock()
	p.accepted.Add(1)
	go p.handle(c)
}

// handle dials upstream and hands the two directions to goroutines of
// their own; the last one to end finishes the connection. The dialing
// goroutine then exits: its stack grew deep in the dialer, and parking that
// for the life of an idle connection would cost more than a fresh one.
func (p *Proxy) handle(c *conn) {
	if !c.dialUpstream() {
		p.finish(c)
		return
	}
	// The directions exist before the watchdog can abort (which reads them).
	c.up = direction{src: c.client, dst: c.server, from: "client", to: "server", total: &p.up, relay: p.relayClientToServer}
	c.down = direction{src: c.server, dst: c.client, from: "server", to: "client", total: &p.down, relay: p.relayServerToClient}
	c.directions.Store(2)
	c.touch()
	c.mu.Lock()
	if c.state == relaying {
		c.watchdog = time.AfterFunc(p.idle(), c.checkIdle)
	}
	c.mu.Unlock()
	go p.relayServerToClient(c)
	go p.relayClientToServer(c)
}

// dialUpstream connects to the original destination from the client's IP.
// On failure it resets the client, so the client sees the failure at once
// instead of a connection that accepted and then hangs.
func (c *conn) dialUpstream() bool {
	p := c.p
	network := "tcp4"
	if c.dst.IP.To4() == nil {
		network = "tcp6"
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Duration(p.connectTimeout.Load()))
	defer cancel()
	c.mu.Lock()
	if c.state != dialing { // Shutdown got here first
		c.mu.Unlock()
		return false
	}
	c.cancelDial = cancel
	c.mu.Unlock()

	server, err := p.dial(ctx, network, &net.TCPAddr{IP: c.src.IP, Zone: c.src.Zone}, c.dst)
	if err != nil {
		p.dialFailed.Add(1)
		if isResourceShortage(err) {
			p.lim.short(err, p.active.Load(), p.now())
		}
		c.abort(dialReason(err))
		return false
	}
	if !c.dialed(server) {
		reset(server)
		return false
	}
	return true
}
