package proxy

import (
	"context"
	"io"
	"net"
	"testing"
	"time"
)

// Idle connections leave their goroutines for the epoll set, come back
// when either side speaks, and still close on idle timeout and shutdown.
func TestIdleConnectionsPark(t *testing.T) {
	const park = 30 * time.Millisecond
	echo := func(c *net.TCPConn) { io.Copy(c, c); c.CloseWrite() }

	t.Run("park then resume both ways", func(t *testing.T) {
		checkGoroutines(t)
		h := startProxy(t, echo, func(c *Config) { c.ParkAfter = park })
		const n = 20
		var cs []*net.TCPConn
		for range n {
			cs = append(cs, h.dial())
		}
		waitFor(t, "all directions parked", func() bool { return h.p.Stats().Parked == 2*n })
		for i, c := range cs {
			msg := []byte{'a' + byte(i)}
			if _, err := c.Write(msg); err != nil {
				t.Fatal(err)
			}
			got := make([]byte, 1)
			if _, err := io.ReadFull(c, got); err != nil || got[0] != msg[0] {
				t.Fatalf("conn %d after parking: %q, %v", i, got, err)
			}
		}
		// Parked again, then a clean half-close from a parked state.
		waitFor(t, "parked again", func() bool { return h.p.Stats().Parked == 2*n })
		for _, c := range cs {
			c.CloseWrite()
			if rest, err := io.ReadAll(c); err != nil || len(rest) != 0 {
				t.Fatalf("EOF through a parked connection: %q, %v", rest, err)
			}
		}
		h.logs.closed(t, n)
		waitFor(t, "no parked directions left", func() bool { return h.p.Stats().Parked == 0 })
	})

	t.Run("idle timeout closes a parked connection", func(t *testing.T) {
		checkGoroutines(t)
		h := startProxy(t, echo, func(c *Config) { c.ParkAfter = park; c.IdleTimeout = 300 * time.Millisecond })
		c := h.dial()
		waitFor(t, "parked", func() bool { return h.p.Stats().Parked == 2 })
		_, err := c.Read(make([]byte, 1))
		wantReset(t, err)
		if r := h.logs.closed(t, 1)[0]; field(r, "reason") != "idle timeout" {
			t.Errorf("reason = %s, want idle timeout", field(r, "reason"))
		}
		waitFor(t, "connection gone", func() bool { return h.p.Stats().Active == 0 && h.p.Stats().Parked == 0 })
	})

	t.Run("shutdown closes parked connections after the grace period", func(t *testing.T) {
		checkGoroutines(t)
		h := startProxy(t, echo, func(c *Config) { c.ParkAfter = park })
		c := h.dial()
		waitFor(t, "parked", func() bool { return h.p.Stats().Parked == 2 })
		ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
		defer cancel()
		if err := h.p.Shutdown(ctx); err == nil {
			t.Error("Shutdown reported a clean drain with a connection still open")
		}
		_, err := c.Read(make([]byte, 1))
		wantReset(t, err)
		if a := h.p.Stats().Active; a != 0 {
			t.Errorf("Active after forced shutdown = %d", a)
		}
	})
}
