package proxy

import (
	"errors"
	"time"
)

// defaultOffloadAfter is Config.OffloadAfter's default. Chatty flows gain
// from the handoff: the kernel forwards a message without waking the
// process. Bulk flows (a read filled the buffer) stay on splice, which
// the kernel's redirect does not beat for one fast stream, and
// short-lived connections never pay the set-up.
const defaultOffloadAfter = 8

// errResume says a pump should carry on relaying: the handoff it stopped
// for was abandoned.
var errResume = errors.New("resume relaying")

// requestHandoff asks both pumps to stop at their next wait, with the
// same past read deadline the sweeper uses for parking.
func (c *conn) requestHandoff() {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed || c.handoff || c.off != nil {
		return
	}
	c.handoff = true
	past := time.Unix(1, 0)
	c.client.SetReadDeadline(past)
	c.server.SetReadDeadline(past)
}

func (c *conn) handoffPending() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.handoff
}

// hold stops d for a pending handoff. held is false when none is pending
// (the caller goes on as before). Otherwise err is errParked (d's goroutine
// exits: the other pump, or d's own goroutine as the second to stop, takes
// it from here) or errResume (the other direction has ended, so there is
// nothing to hand off: d relays on). Both pumps are stopped between
// messages, so every byte read so far has been written: the kernel takes
// over exactly where they left off.
func (c *conn) hold(d *direction) (held bool, err error) {
	c.mu.Lock()
	if !c.handoff || c.closed {
		c.mu.Unlock()
		return false, nil
	}
	if c.directions.Load() < 2 {
		c.handoff = false
		c.mu.Unlock()
		return true, errResume
	}
	other := &c.up
	if d == &c.up {
		other = &c.down
	}
	// The other pump may be parked in the sleeper: taking it back stops it
	// as well as holding would.
	if other.held || other.sleepID != 0 && c.p.sleeper.cancel(other.sleepID, other.sleepFD) {
		other.held, other.sleepID = false, 0
		c.handingOff = true
		c.mu.Unlock()
		c.handOff()
		return true, errParked
	}
	d.held = true
	c.mu.Unlock()
	return true, errParked
}

// handOff runs on the second pump to stop. If the kernel will not take the
// connection (a FIN arrived meanwhile, the sockhash is full), both
// directions relay on.
func (c *conn) handOff() {
	if c.offload() {
		return
	}
	c.mu.Lock()
	c.handoff, c.handingOff = false, false
	closed := c.closed
	c.mu.Unlock()
	if closed { // abort left the stopped directions to us
		c.p.closeConn(c)
		return
	}
	go c.p.relayClientToServer(c)
	go c.p.relayServerToClient(c)
}
