//go:build !linux

package proxy

import (
	"fmt"
	"net"
	"runtime"
	"syscall"
)

// errNotImplemented is what every kernel-facing helper returns off Linux:
// TPROXY, IP_TRANSPARENT and SIOCOUTQ are Linux features.
var errNotImplemented = fmt.Errorf("transparent proxying is not implemented on %s", runtime.GOOS)

func setTransparent(fd uintptr, v6 bool) error { return errNotImplemented }
func setV6Only(fd uintptr) error               { return errNotImplemented }
func setBindNoPort(fd uintptr) error           { return errNotImplemented }
func readFD(uintptr, []byte) (int, error)      { return 0, errNotImplemented }
func wasReset(c syscall.Conn) bool             { return false }

func setAbortOnClose(uintptr) error          { return errNotImplemented }
func closedState(*net.TCPConn) (bool, error) { return true, errNotImplemented }
func progress(*net.TCPConn) uint64           { return 0 }
func setReceiveBuffer(uintptr, int) error    { return errNotImplemented }
func setReusePort(uintptr) error             { return errNotImplemented }

func openReserve() int { return -1 }
func closeFD(int)      {}
