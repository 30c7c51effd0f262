package proxy

import (
	"context"
	"errors"
	"log/slog"
	"net/netip"
	"sync/atomic"
	"syscall"
	"time"
)

// bufSize is the loop's read buffer for small messages: a read that fills
// it moves the direction to splicing.
const bufSize = 16 << 10

// conn is one proxied connection: the accepted client socket and the
// dialed server socket. Only its loop's thread touches it. It owns no
// buffer while its bytes flow: small messages pass through the loop's
// buffer, bulk bytes through a splice pipe, and only bytes a peer is not
// taking yet wait in the connection (at most one buffer or one pipe per
// direction), so a receiver that stops reading stops its sender.
type conn struct {
	l              *loop
	client, server sock
	up, down       half // client to server, server to client
	src, dst       netip.AddrPort
	start          time.Time

	state connState
	since time.Duration // p.now() when it entered its state
	// lastActive is p.now() at the last bytes read; progress the
	// kernel's count for both sockets at the idle check before.
	lastActive time.Duration
	progress   uint64
	again      bool               // on the loop's list to move again (budget ran out)
	insp       inspectState       // what inspecting (or the first read) found, and decided
	named      bool               // the first client bytes were looked at for a name
	cancelDial context.CancelFunc // a Dial hook's, while it runs
}

// sock is one socket of a conn and what epoll last said of it. The loop
// is edge-triggered: it learns of readiness once, so it remembers it until
// a system call says it is gone.
type sock struct {
	c        *conn
	fd       int // -1 when there is none (yet)
	name     string
	readable bool // data, a FIN or an error may be queued
	rdhup    bool // the peer's FIN (or an error) has arrived: read on to EOF
	writable bool
	closed   bool // reached TCP_CLOSE while the conn was closing
	finNow   bool // the proxy sent its FIN in the current relay call
}

// half is one direction of a conn.
type half struct {
	src, dst *sock
	total    *atomic.Uint64
	n        int64   // bytes written to dst
	pend     []byte  // read from src, not yet taken by dst (in pendBuf)
	pendBuf  *[]byte // pooled, held only while pend is not empty
	pipe     *pipe   // splice pipe in the bulk regime, else nil
	eof      bool    // src's FIN was read
	shut     bool    // ... and passed on: dst is shut for writing
}

func (c *conn) log(level slog.Level, reason string) {
	c.l.p.log.LogAttrs(context.Background(), level, "connection closed",
		slog.String("client", c.src.String()),
		slog.String("server", c.dst.String()),
		slog.Int64("bytes_up", c.up.n),
		slog.Int64("bytes_down", c.down.n),
		slog.Duration("duration", time.Since(c.start)),
		slog.String("reason", reason),
		c.insp.attrs(),
	)
}

// failReason names a side's failure for the log: "client reset",
// "server timeout", "server error: ...".
func failReason(side string, err error) string {
	var errno syscall.Errno
	switch {
	case err == nil:
		return side + " error"
	case errors.Is(err, syscall.ECONNRESET), errors.Is(err, syscall.EPIPE):
		return side + " reset"
	case errors.Is(err, syscall.ETIMEDOUT):
		return side + " timeout"
	case errors.As(err, &errno):
		return side + " error: " + errno.Error()
	default:
		return side + " error: " + err.Error()
	}
}
