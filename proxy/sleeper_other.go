//go:build !linux

package proxy

type sleeper struct{}

const readable, peerClosed, failed = 1, 2, 0

func newSleeper() (*sleeper, error)                       { return nil, errNotImplemented }
func (*sleeper) park(int, uint32, func()) (uint64, error) { return 0, errNotImplemented }
func (*sleeper) cancel(uint64, int) bool                  { return false }
func (*sleeper) sleeping() int                            { return 0 }
func (*sleeper) close()                                   {}
