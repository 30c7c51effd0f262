//go:build !linux

package proxy

type sleeper struct{}

func newSleeper() (*sleeper, error)               { return nil, errNotImplemented }
func (*sleeper) park(int, func()) (uint64, error) { return 0, errNotImplemented }
func (*sleeper) cancel(uint64, int) bool          { return false }
func (*sleeper) sleeping() int                    { return 0 }
func (*sleeper) close()                           {}
