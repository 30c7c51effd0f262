package proxy

import (
	"context"
	"log/slog"
	"net"
	"sync"
	"sync/atomic"
	"time"
)

// bufSize is the pooled read buffer for small messages: a read that fills
// it switches the direction to splicing.
const bufSize = 16 << 10

// maxChunk bounds one splice call chain so that activity is stamped at least
// every 256 KiB even when the receiver drains slowly: a transfer that keeps
// moving must not look idle.
const maxChunk = 256 << 10

// conn is one proxied connection: the accepted client side and the dialed
// server side. It owns no buffer: small messages borrow a pooled one for the
// length of a read and a write, bulk bytes are spliced in the kernel. Where
// it is in its life is state, which only lifecycle.go changes.
type conn struct {
	p        *Proxy
	client   *net.TCPConn
	src, dst *net.TCPAddr // client's address, original destination
	start    time.Time

	lastActive atomic.Int64 // p.now() at the last burst, in either direction
	directions atomic.Int32 // relay directions still running (or parked)
	parkAsked  atomic.Bool  // the sweeper woke the pumps to park them
	// kernelProgress is progress() of both sockets at the watchdog's last
	// look (atomic: a reload's rearm can run the watchdog twice at once).
	kernelProgress atomic.Uint64

	// up is client to server, down server to client.
	up, down direction

	mu         sync.Mutex
	state      connState
	server     *net.TCPConn       // nil until dialed
	cancelDial context.CancelFunc // non-nil while dialing
	watchdog   *time.Timer
	reason     string // why it was aborted, for the log
}

// direction is one way of a connection. n is written only by the goroutine
// relaying it (one at a time: parking hands it over) and read by finish
// after both ended.
type direction struct {
	src, dst *net.TCPConn
	from, to string // "client" / "server", for the log
	total    *atomic.Uint64
	n        int64
	relay    func(*conn) // the named relay function, to resume it
	sleepID  uint64      // non-zero while parked in the sleeper; guarded by conn.mu
	sleepFD  int
}

func (c *conn) log(level slog.Level, reason string) {
	c.p.log.LogAttrs(context.Background(), level, "connection closed",
		slog.String("client", c.src.String()),
		slog.String("server", c.dst.String()),
		slog.Int64("bytes_up", c.up.n),
		slog.Int64("bytes_down", c.down.n),
		slog.Duration("duration", time.Since(c.start)),
		slog.String("reason", reason),
	)
}

func (c *conn) touch() { c.lastActive.Store(int64(c.p.now())) }
