package proxy

import (
	"fmt"
	"os"
	"strconv"
	"strings"
)

// ConnMemoryBound is the most memory one proxied connection can hold on
// the box, in bytes: two sockets, each with a full receive and send
// buffer, one splice pipe per direction, and one read buffer per
// direction. Nothing else in the relay grows with what a peer sends: a
// receiver that stops reading stops its sender. A receive buffer is
// 2 × rcvbuf (Config.ReceiveBuffer; the kernel doubles it for overhead),
// or with rcvbuf 0 what autotuning may reach, tcp_rmem's maximum; a send
// buffer is autotuned up to tcp_wmem's maximum. root is the sysctl tree,
// "/proc/sys" on a box.
func ConnMemoryBound(root string, rcvbuf int) (int64, error) {
	rmem := 2 * int64(rcvbuf)
	if rcvbuf == 0 {
		var err error
		if rmem, err = sysctlMax(root, "net/ipv4/tcp_rmem"); err != nil {
			return 0, err
		}
	}
	wmem, err := sysctlMax(root, "net/ipv4/tcp_wmem")
	if err != nil {
		return 0, err
	}
	return 2*(rmem+wmem) + 2*pipeSize + 2*bufSize, nil
}

// sysctlMax reads the third (maximum) field of a "min default max" sysctl.
func sysctlMax(root, key string) (int64, error) {
	b, err := os.ReadFile(root + "/" + key)
	if err != nil {
		return 0, fmt.Errorf("reading %s: %w", key, err)
	}
	f := strings.Fields(string(b))
	if len(f) != 3 {
		return 0, fmt.Errorf("reading %s: %q is not \"min default max\"", key, b)
	}
	n, err := strconv.ParseInt(f[2], 10, 64)
	if err != nil {
		return 0, fmt.Errorf("reading %s: %w", key, err)
	}
	return n, nil
}
