package proxy

import (
	"errors"
	"fmt"
	"net"
	"time"
)

// nudge asks c's pumps to park: their next wait ends at once with a
// deadline error, and they hand themselves to the sleeper.
func (c *conn) nudge() {
	c.mu.Lock()
	server, relaying := c.server, c.state == relaying
	c.mu.Unlock()
	if !relaying || c.parkAsked.Swap(true) {
		return
	}
	past := time.Unix(1, 0)
	c.client.SetReadDeadline(past)
	server.SetReadDeadline(past)
}

// errParked says a direction's goroutine handed it to the sleeper.
var errParked = errors.New("parked")

// park hands d to the sleeper: its goroutine exits, and d.relay runs again
// on a new one when d.src has something to read (or fails).
func (c *conn) park(d *direction) error {
	d.src.SetReadDeadline(time.Time{})
	fd := -1
	if rc, err := d.src.SyscallConn(); err == nil {
		rc.Control(func(f uintptr) { fd = int(f) })
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.state != relaying || fd < 0 {
		return net.ErrClosed
	}
	id, err := c.p.sleeper.park(fd, readable, func() {
		c.mu.Lock()
		d.sleepID = 0
		c.mu.Unlock()
		go d.relay(c) // pump clears the nudge and parkAsked
	})
	if err != nil {
		return fmt.Errorf("parking idle direction: %w", err)
	}
	d.sleepID, d.sleepFD = id, fd
	c.p.parkedSinceRelease.Add(1)
	return errParked
}

// unpark takes the parked directions back from the sleeper when the
// connection is being torn down: each one the sleeper had not woken yet is
// finished here, since no goroutine will come back for it. Called with
// c.mu held, before the sockets close.
func (c *conn) unpark() (finished int) {
	for _, d := range []*direction{&c.up, &c.down} {
		if d.sleepID != 0 && c.p.sleeper.cancel(d.sleepID, d.sleepFD) {
			finished++
		}
		d.sleepID = 0
	}
	return finished
}
