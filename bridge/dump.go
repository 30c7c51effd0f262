package bridge

import (
	"errors"

	"github.com/vishvananda/netlink"
)

// dumpAttempts is how many times RetryDump runs a dump in all.
const dumpAttempts = 5

// RetryDump runs a netlink dump (a list of links, addresses, routes or
// rules) again while the kernel reports it interrupted by a concurrent
// change (netlink.ErrDumpInterrupted: the result may be incomplete), up to
// dumpAttempts times in all; the last result and error are returned. It is
// the one retry loop for dumps: every dump ghostwire makes goes through it.
func RetryDump[T any](dump func() (T, error)) (T, error) {
	for i := 1; ; i++ {
		v, err := dump()
		if !errors.Is(err, netlink.ErrDumpInterrupted) || i == dumpAttempts {
			return v, err
		}
	}
}
