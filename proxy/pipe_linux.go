package proxy

import (
	"golang.org/x/sys/unix"
)

// pipeSize is each splice pipe's capacity (F_SETPIPE_SZ): what one
// direction in the bulk regime moves per pair of splice calls, and the
// most of its bytes the pipe holds.
const pipeSize = 1 << 20

// pipeIdle is how long a direction keeps its pipe with nothing to move.
// Then the pipe goes back to the loop's spares (or is closed): an idle
// connection holds no pipe and no fds beyond its sockets.
const pipeIdle = 1000 * tickEvery / 50 // 1s

// maxSparePipes is how many empty pipes a loop keeps for the next bulk
// direction, so a stream that pauses now and then does not create and
// close pipes at each pause.
const maxSparePipes = 16

type pipe struct {
	r, w int
	n    int // bytes in it
}

func (pp *pipe) close() {
	unix.Close(pp.r)
	unix.Close(pp.w)
}

// getPipe returns an empty pipe, or nil if none can be had (out of fds,
// say): the caller copies instead.
func (l *loop) getPipe() *pipe {
	l.pipesUsed = l.p.now()
	if n := len(l.pipes); n > 0 {
		pp := l.pipes[n-1]
		l.pipes = l.pipes[:n-1]
		return pp
	}
	var fds [2]int
	if err := unix.Pipe2(fds[:], unix.O_NONBLOCK|unix.O_CLOEXEC); err != nil {
		return nil
	}
	// A smaller pipe than asked is fine (pipe-max-size): splice moves less per call.
	unix.FcntlInt(uintptr(fds[0]), unix.F_SETPIPE_SZ, pipeSize)
	return &pipe{r: fds[0], w: fds[1]}
}

// putPipe takes h's pipe back if it is empty (a pipe still holding bytes
// stays with h until they are written, or until h's conn closes, which
// closes it).
func (l *loop) putPipe(h *half) {
	pp := h.pipe
	if pp == nil {
		return
	}
	if pp.n > 0 {
		if h.src.c.state != closed {
			return
		}
		pp.close() // its bytes go with the connection
		h.pipe = nil
		return
	}
	h.pipe = nil
	l.pipesUsed = l.p.now()
	if len(l.pipes) < maxSparePipes && !l.stop {
		l.pipes = append(l.pipes, pp)
		return
	}
	pp.close()
}

// spliceIn moves what src has queued into the empty pipe pp.
func spliceIn(src int, pp *pipe) (int, error) {
	for {
		n, err := unix.Splice(src, nil, pp.w, nil, pipeSize, unix.SPLICE_F_MOVE|unix.SPLICE_F_NONBLOCK)
		if err == unix.EINTR {
			continue
		}
		return int(n), err
	}
}

// spliceOut moves what pp holds to dst, as much as dst takes.
func spliceOut(pp *pipe, dst int) (int, error) {
	for {
		n, err := unix.Splice(pp.r, nil, dst, nil, pp.n, unix.SPLICE_F_MOVE|unix.SPLICE_F_NONBLOCK)
		if err == unix.EINTR {
			continue
		}
		if n < 0 {
			n = 0
		}
		return int(n), err
	}
}
