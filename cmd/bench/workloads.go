package main

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// cpuMeter measures the proxy's CPU time (its process and descendants) and
// the machine's busy time over one workload, in cores (1.0 = one core busy
// for the whole run), and the proxy's in seconds.
type cpuMeter struct {
	pid             int
	t0              time.Time
	proc0           int64
	busy0, total0   int64
	procOK, sysOKay bool
}

func startCPU(pid int) *cpuMeter {
	m := &cpuMeter{pid: pid, t0: time.Now()}
	if pid > 0 {
		if v, err := procTreeCPU(pid); err == nil {
			m.proc0, m.procOK = v, true
		}
	}
	if b, t, err := machineCPU(); err == nil {
		m.busy0, m.total0, m.sysOKay = b, t, true
	}
	return m
}

func (m *cpuMeter) stop(s *sample) {
	secs := time.Since(m.t0).Seconds()
	if m.procOK {
		if v, err := procTreeCPU(m.pid); err == nil && secs > 0 {
			cpu := float64(v-m.proc0) / float64(clkTck)
			c := cpu / secs
			s.ProxyCPU, s.ProxyCPUSeconds = &c, &cpu
		}
	}
	if m.sysOKay {
		if b, t, err := machineCPU(); err == nil && t > m.total0 {
			// share of all CPUs busy, scaled to cores
			c := float64(b-m.busy0) / float64(t-m.total0) * float64(numCPU())
			s.BusyCPU = &c
		}
	}
}

// machineCPU returns busy and total jiffies from /proc/stat's cpu line.
func machineCPU() (busy, total int64, err error) {
	b, err := os.ReadFile("/proc/stat")
	if err != nil {
		return 0, 0, err
	}
	line, _, _ := strings.Cut(string(b), "\n")
	f := strings.Fields(line)
	if len(f) < 5 || f[0] != "cpu" {
		return 0, 0, errors.New("unexpected /proc/stat")
	}
	for i, s := range f[1:] {
		v, err := strconv.ParseInt(s, 10, 64)
		if err != nil {
			return 0, 0, err
		}
		total += v
		if i != 3 && i != 4 { // idle, iowait
			busy += v
		}
	}
	return busy, total, nil
}

func numCPU() int {
	n := 0
	b, _ := os.ReadFile("/proc/stat")
	for _, l := range strings.Split(string(b), "\n") {
		if strings.HasPrefix(l, "cpu") && len(l) > 3 && l[3] >= '0' && l[3] <= '9' {
			n++
		}
	}
	return max(n, 1)
}

func (b *bench) proxyPID() int {
	if b.proxy == nil {
		return 0
	}
	return labPID(b.proxy)
}

func (b *bench) add(s sample) {
	b.samples = append(b.samples, s)
	wl := workloadByKey(s.Workload)
	extra := ""
	if s.ProxyCPU != nil {
		extra += fmt.Sprintf("  proxy %.2f cores", *s.ProxyCPU)
	}
	if s.ProxyCPUSeconds != nil {
		extra += fmt.Sprintf(" (%.2f s)", *s.ProxyCPUSeconds)
	}
	if s.BusyCPU != nil {
		extra += fmt.Sprintf("  machine %.2f cores busy", *s.BusyCPU)
	}
	if s.Errors > 0 {
		extra += fmt.Sprintf("  %d errors", s.Errors)
	}
	if s.Note != "" {
		extra += "  " + s.Note
	}
	fmt.Fprintf(os.Stderr, "  %-24s %10s %-6s%s\n", strings.TrimSpace(wl.Name), fmtVal(s.Value), wl.Unit, extra)
}

func (b *bench) measureIperf(ctx context.Context, round int, mode string, streams int, key, cpuKey string) error {
	args := []string{"-c", serverIP4, "-p", strconv.Itoa(iperfPort), "-P", strconv.Itoa(streams),
		"-t", strconv.Itoa(int(b.o.iperfDur.Seconds())), "-J"}
	if !b.o.quick {
		args = append(args, "-O", "1") // leave slow start out of the figure
	}
	s := sample{Round: round, Mode: mode, Workload: key, Unit: "Gbit/s"}
	out, runErr := b.clientRun(ctx, b.o.iperfDur, &s, "iperf3", args...)
	r, err := parseIperf3(out)
	if err != nil {
		return fmt.Errorf("iperf3 -P %d: %w", streams, errors.Join(err, runErr))
	}
	s.Value, s.Work, s.WorkUnit = r.Gbps, float64(r.Bytes), "bytes"
	if r.Retransmits > 0 {
		s.Note = fmt.Sprintf("%d retransmits", r.Retransmits)
	}
	b.add(s)
	b.addCPU(s, cpuKey)
	return nil
}

// addCPU records the proxy's CPU per unit of the work s did as workload
// key's sample, if s measured a proxy.
func (b *bench) addCPU(s sample, key string) {
	if s.ProxyCPUSeconds == nil {
		return
	}
	wl := workloadByKey(key)
	v, ok := cpuPerWork(*s.ProxyCPUSeconds, s.Work, wl.Unit)
	if !ok {
		return
	}
	b.add(sample{Round: s.Round, Mode: s.Mode, Workload: key, Unit: wl.Unit, Value: v})
}

func (b *bench) measureWrk(ctx context.Context, round int, mode string, closeEach bool) error {
	args := []string{"-t", strconv.Itoa(wrkThreads), "-c", strconv.Itoa(wrkConns),
		"-d", fmt.Sprintf("%ds", int(b.o.wrkDur.Seconds())), "--latency"}
	key, p99key, cpuKey := wlKeepAlive, wlKeepP99, wlKeepCPU
	if closeEach {
		args = append(args, "-H", "Connection: close")
		key, p99key, cpuKey = wlHTTPClose, wlCloseP99, wlCloseCPU
	}
	args = append(args, fmt.Sprintf("http://%s:%d/", serverIP4, httpPort))
	s := sample{Round: round, Mode: mode, Workload: key, Unit: "req/s"}
	out, runErr := b.clientRun(ctx, b.o.wrkDur, &s, "wrk", args...)
	r, err := parseWrk(out)
	if err != nil {
		return fmt.Errorf("wrk: %w", errors.Join(err, runErr))
	}
	if r.Requests > 0 && r.Errors*100 > r.Requests {
		return fmt.Errorf("wrk: %d errors in %d requests: the path is broken, not slow", r.Errors, r.Requests)
	}
	s.Value, s.Errors, s.Work, s.WorkUnit = r.ReqPerSec, r.Errors, float64(r.Requests), "requests"
	b.add(s)
	b.add(sample{Round: round, Mode: mode, Workload: p99key, Unit: "ms", Value: float64(r.P99) / float64(time.Millisecond)})
	b.addCPU(s, cpuKey)
	return nil
}

// measureMemory opens b.o.conns idle connections from the client to the
// HTTP server through the proxy, waits until the server holds them all
// (so the proxy holds both sides of each), and reports the proxy's RSS
// growth per connection.
func (b *bench) measureMemory(ctx context.Context, round int, mode string) error {
	pid := b.proxyPID()
	rss0, err := vmRSS(pid)
	if err != nil {
		return fmt.Errorf("reading the proxy's RSS: %w", err)
	}
	n := b.o.conns
	serverFilter := fmt.Sprintf("( sport = :%d )", httpPort)
	base, err := b.established(ctx, b.lab.Server, serverFilter)
	if err != nil {
		return err
	}
	t0 := time.Now()
	fds, err := b.openIdle(ctx, n)
	defer func() {
		// The server closes first: the proxies' upstream sockets then close
		// passively and leave no TIME_WAIT on the box's ephemeral ports
		// (closing from the client left ~8,000 per round there, and a few
		// rounds in HAProxy's usesrc binds ran out of ports).
		wctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
		defer cancel()
		if err := b.httpd.Signal(syscall.SIGUSR1); err != nil {
			fmt.Fprintf(os.Stderr, "bench: %v\n", err)
		}
		poll(wctx, 30*time.Second, "the server to close the idle connections", func() (bool, error) {
			c, err := b.established(wctx, b.lab.Server, serverFilter)
			return c <= base, err
		})
		for _, fd := range fds {
			closeFD(fd)
		}
		boxFilter := fmt.Sprintf("( src %s and sport = :%d )", serverIP4, httpPort)
		poll(wctx, 30*time.Second, "the proxy to let go of the idle connections", func() (bool, error) {
			c, err := b.established(wctx, b.lab.Box, boxFilter)
			return c == 0, err
		})
	}()
	if err != nil {
		return fmt.Errorf("opening %d idle connections: %w (opened %d)", n, err, len(fds))
	}
	held := 0
	err = poll(ctx, 60*time.Second, fmt.Sprintf("the server to hold %d connections", n), func() (bool, error) {
		c, err := b.established(ctx, b.lab.Server, serverFilter)
		held = c - base
		return c >= base+n, err
	})
	if err != nil {
		return fmt.Errorf("%w: the server holds %d of %d; the proxy's stderr ends: %s",
			err, held, n, tail(b.proxy.Stderr(), 600))
	}
	opened := time.Since(t0)
	// The workload is idle connections (ghostwire gives back a pipe a
	// direction has not used for a second).
	rss1, err := idleRSS(ctx, pid)
	if err != nil {
		return err
	}
	per := float64(rss1-rss0) / float64(n)
	b.add(sample{Round: round, Mode: mode, Workload: wlMemPer, Unit: "KiB", Value: per,
		Note: fmt.Sprintf("RSS %d -> %d KiB, %d conns opened in %.1fs", rss0, rss1, n, opened.Seconds())})
	return nil
}

// idleRSS holds what was opened idle for idleHold, the same for every
// mode, then returns pid's VmRSS once it has stopped moving.
func idleRSS(ctx context.Context, pid int) (int64, error) {
	select {
	case <-ctx.Done():
		return 0, ctx.Err()
	case <-time.After(idleHold):
	}
	var rss int64
	poll(ctx, 10*time.Second, "the proxy's RSS to settle", func() (bool, error) {
		prev := rss
		r, err := vmRSS(pid)
		rss = r
		return prev > 0 && abs(r-prev) <= prev/200, err
	})
	if rss == 0 {
		return 0, errors.New("could not read the proxy's RSS")
	}
	return rss, nil
}

// idleHold is how long the memory workload keeps its connections idle
// before measuring.
const idleHold = 5 * time.Second

func abs(x int64) int64 {
	if x < 0 {
		return -x
	}
	return x
}

func vmRSS(pid int) (int64, error) {
	if pid <= 0 {
		return 0, errors.New("no proxy process")
	}
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, err
	}
	return parseVmRSS(b)
}

// openIdle creates n sockets in the client namespace (a socket belongs to
// the namespace it was created in, whichever thread uses it later), then
// connects them to the server, 64 at a time.
func (b *bench) openIdle(ctx context.Context, n int) ([]int, error) {
	fds := make([]int, 0, n)
	err := b.lab.Client.Do(func() error {
		for range n {
			fd, err := syscall.Socket(syscall.AF_INET, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
			if err != nil {
				return fmt.Errorf("socket: %w", err)
			}
			fds = append(fds, fd)
		}
		return nil
	})
	if err != nil {
		return fds, err
	}
	dst := &syscall.SockaddrInet4{Port: httpPort, Addr: netip.MustParseAddr(serverIP4).As4()}
	// Bound the whole phase: a proxy that stops completing handshakes must
	// not keep the bench here for n × the connect timeout.
	ctx, cancel := context.WithTimeout(ctx, 90*time.Second)
	defer cancel()
	failed, first := onEach(ctx, fds, func(fd int) error { return connectTimeout(fd, dst, 5*time.Second) })
	if ctx.Err() != nil {
		return fds, ctx.Err()
	}
	if failed > 0 {
		return fds, fmt.Errorf("%d connects failed, first: %w", failed, first)
	}
	return fds, nil
}

// onEach runs do on every fd, 64 at a time, until done or ctx ends, and
// counts the failures (first is the first one's error).
func onEach(ctx context.Context, fds []int, do func(fd int) error) (failed int, first error) {
	var (
		next atomic.Int64
		wg   sync.WaitGroup
		mu   sync.Mutex
	)
	for range 64 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for ctx.Err() == nil {
				i := int(next.Add(1)) - 1
				if i >= len(fds) {
					return
				}
				if err := do(fds[i]); err != nil {
					mu.Lock()
					failed++
					if first == nil {
						first = err
					}
					mu.Unlock()
				}
			}
		}()
	}
	wg.Wait()
	return failed, first
}

// connectTimeout is a blocking connect bounded by SO_SNDTIMEO.
func connectTimeout(fd int, sa syscall.Sockaddr, d time.Duration) error {
	tv := syscall.NsecToTimeval(d.Nanoseconds())
	if err := syscall.SetsockoptTimeval(fd, syscall.SOL_SOCKET, syscall.SO_SNDTIMEO, &tv); err != nil {
		return fmt.Errorf("setsockopt SO_SNDTIMEO: %w", err)
	}
	for {
		// With SO_SNDTIMEO set, connect is not restarted after a signal
		// (Go preempts threads with SIGURG): call it again, it waits on
		// for the handshake already under way, and EISCONN means done.
		err := syscall.Connect(fd, sa)
		if err == syscall.EINTR || err == syscall.EALREADY {
			continue
		}
		if err == syscall.EISCONN {
			return nil
		}
		if err != nil {
			return fmt.Errorf("connect: %w", err)
		}
		return nil
	}
}

// dialBlocking connects a new socket in the calling thread's namespace.
func dialBlocking(ip string, port int, d time.Duration) (int, error) {
	fd, err := syscall.Socket(syscall.AF_INET, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		return -1, fmt.Errorf("socket: %w", err)
	}
	sa := &syscall.SockaddrInet4{Port: port, Addr: netip.MustParseAddr(ip).As4()}
	if err := connectTimeout(fd, sa, d); err != nil {
		syscall.Close(fd)
		return -1, err
	}
	return fd, nil
}

func closeFD(fd int) {
	if fd >= 0 {
		syscall.Close(fd)
	}
}

// clientRun runs name in the client namespace for a run of length d (and
// at most 30 s more), with the proxy's CPU time over it recorded in s.
func (b *bench) clientRun(ctx context.Context, d time.Duration, s *sample, name string, args ...string) ([]byte, error) {
	cctx, cancel := context.WithTimeout(ctx, d+30*time.Second)
	defer cancel()
	m := startCPU(b.proxyPID())
	out, err := b.lab.Client.Command(cctx, name, args...).Output()
	m.stop(s)
	return out, err
}
