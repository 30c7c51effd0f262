package proxy

import "time"

func (p *Proxy) idle() time.Duration { return time.Duration(p.idleTimeout.Load()) }

// idleLeft is how long until c counts as idle under the current timeout.
func (c *conn) idleLeft() time.Duration {
	return c.p.idle() - (c.p.now() - time.Duration(c.lastActive.Load()))
}

// checkIdle is the watchdog: it closes c if nothing moved for IdleTimeout,
// else sleeps until the earliest moment that could be true. "Moved" is the
// relay's own reads and writes, or, checked only when those say idle, the
// kernel's count of bytes received or acknowledged on either socket: a
// receiver slowly draining one long splice is making progress, although
// the relay sees nothing until the splice returns.
func (c *conn) checkIdle() {
	left := c.idleLeft()
	if left <= 0 {
		c.mu.Lock()
		server := c.server
		c.mu.Unlock()
		if server != nil {
			if n := progress(c.client) + progress(server); c.kernelProgress.Swap(n) != n {
				c.touch()
				left = c.idleLeft()
			}
		}
	}
	if left <= 0 {
		c.abort("idle timeout")
		return
	}
	c.mu.Lock()
	if c.state == relaying {
		c.watchdog.Reset(left)
	}
	c.mu.Unlock()
}

// rearm reschedules the watchdog after the idle timeout changed.
func (c *conn) rearm() {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.state == relaying && c.watchdog != nil {
		c.watchdog.Reset(max(c.idleLeft(), 0))
	}
}
