package proxy

import (
	"context"
	"net"
	"net/netip"
	"testing"
	"time"
)

// BenchmarkRelayLoopback streams through the relay on loopback and reports
// its throughput relative to a direct loopback connection measured in the
// same run (x-direct: 1.0 would mean the relay costs nothing). Both paths
// use the same userspace sender and sink; the relay adds a second TCP hop
// and its splice.
func BenchmarkRelayLoopback(b *testing.B) {
	const block = 1 << 20
	backend := startBackend(b, func(c *net.TCPConn) {
		buf := make([]byte, block)
		for {
			if _, err := c.Read(buf); err != nil {
				return
			}
		}
	})
	buf := make([]byte, block)
	send := func(c *net.TCPConn, n int) {
		for range n {
			if _, err := c.Write(buf); err != nil {
				b.Fatal(err)
			}
		}
	}

	direct, err := net.DialTCP("tcp4", nil, backend)
	if err != nil {
		b.Fatal(err)
	}
	defer direct.Close()
	const baselineBlocks = 2048 // 2 GiB
	start := time.Now()
	send(direct, baselineBlocks)
	directRate := float64(baselineBlocks*block) / time.Since(start).Seconds()

	p, err := New(Config{
		Port: testPort, ConnectTimeout: time.Second, IdleTimeout: time.Minute,
		Listen: func(network, addr string) (net.Listener, error) {
			return net.Listen("tcp4", "127.0.0.1:0")
		},
		Dial: func(ctx context.Context, network string, local, remote *net.TCPAddr) (*net.TCPConn, error) {
			var d net.Dialer
			c, err := d.DialContext(ctx, network, remote.String())
			if err != nil {
				return nil, err
			}
			return c.(*net.TCPConn), nil
		},
		OrigDst: func(netip.AddrPort) netip.AddrPort { return addrOf(backend) },
	})
	if err != nil {
		b.Fatal(err)
	}
	if err := p.Start(); err != nil {
		b.Fatal(err)
	}
	served := make(chan error, 1)
	go func() { served <- p.Serve(context.Background()) }()
	defer func() {
		p.Shutdown(context.Background())
		<-served
	}()
	c, err := net.DialTCP("tcp4", nil, p.Addrs()[0].(*net.TCPAddr))
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()

	b.SetBytes(block)
	b.ResetTimer()
	send(c, b.N)
	b.StopTimer()
	rate := float64(b.N*block) / b.Elapsed().Seconds()
	b.ReportMetric(directRate/1e6, "direct-MB/s")
	b.ReportMetric(rate/directRate, "x-direct")
}
