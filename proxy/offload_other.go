//go:build !linux

package proxy

type offloader struct{}
type offloaded struct{}

func newOffloader() (*offloader, error) { return nil, errNotImplemented }
func (*offloader) close()               {}
func (*conn) offload() bool             { return false }
func (*conn) offloadedActivity()        {}
func (*conn) abortOffloaded()           {}
func (*conn) finishOffloaded()          {}
