package e2e

import (
	"bufio"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"hash"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ghostwire/ghostwire/lab"
)

// Every byte the proxy relays is flow-controlled: a receiver that stops
// reading stops its sender after a bounded amount, in either direction, and
// nothing is lost or corrupted when it reads again.
func TestFlowControlNonReader(t *testing.T) {
	b := proxiedBox(t, 80)
	for _, f := range families(b) {
		t.Run(f.name, func(t *testing.T) {
			var accepted <-chan *net.TCPConn
			addr := listenServer(t, b, f.server, "80", func(t *testing.T, ln net.Listener) { accepted = acceptAll(t, ln) })
			c, err := lab.Dial(b.Lab.Client, "tcp", addr, 5*time.Second)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			var s *net.TCPConn
			select {
			case s = <-accepted:
			case <-time.After(5 * time.Second):
				t.Fatal("the server accepted no connection")
			}
			defer s.Close()

			// A conversation first, so that the connection is an
			// established small-message flow when the bulk starts.
			var up, down int64
			for i := range 20 {
				q, a := fmt.Sprintf("ping %02d", i), fmt.Sprintf("pong %02d", i)
				if err := exchange(c, s, q); err != nil {
					t.Fatalf("exchange %d client→server: %v", i, err)
				}
				if err := exchange(s, c, a); err != nil {
					t.Fatalf("exchange %d server→client: %v", i, err)
				}
				up, down = up+int64(len(q)), down+int64(len(a))
			}

			upPushed, upTotal := pushUntilBlocked(t, b, "client→server", c, s, 1)
			downPushed, downTotal := pushUntilBlocked(t, b, "server→client", s, c, 2)
			t.Logf("%s: pushed before blocking: client→server %d bytes (%.1f MiB), server→client %d bytes (%.1f MiB)",
				f.name, upPushed, mib(upPushed), downPushed, mib(downPushed))

			// Both ends half-closed: the proxy ends the connection
			// cleanly and counts every byte.
			line := waitConnLog(t, b, c.LocalAddr())
			if line["reason"] != "eof" || line["bytes_up"] != float64(up+upTotal) || line["bytes_down"] != float64(down+downTotal) {
				t.Errorf("proxy log line = %v, want eof, %d bytes up, %d down", line, up+upTotal, down+downTotal)
			}
		})
	}
}

// maxPushBeforeBlocked is how much a sender may get into the path before a
// receiver that does not read must have stopped it.
const maxPushBeforeBlocked = 32 << 20

// pushUntilBlocked writes from w as fast as it can while r does not read,
// until w makes no progress for a second; asserts that happened within
// maxPushBeforeBlocked; then lets r read everything and checks it arrived
// intact. It half-closes w and returns the bytes pushed before blocking
// and the total written.
func pushUntilBlocked(t *testing.T, b *lab.Appliance, dir string, w, r *net.TCPConn, seed uint64) (blockedAt, total int64) {
	t.Helper()
	p := startPusher(w, seed, true)
	blockedAt, err := waitAllBlocked([]*pusher{p}, time.Second, 60*time.Second, 4*maxPushBeforeBlocked)
	if err != nil {
		p.stop.Store(true)
		t.Fatalf("%s: %v", dir, err)
	}
	if blockedAt > maxPushBeforeBlocked {
		t.Errorf("%s: the sender got %d bytes (%.1f MiB) into a receiver that does not read before it blocked, want ≤ %d MiB",
			dir, blockedAt, mib(blockedAt), maxPushBeforeBlocked>>20)
	}
	t.Logf("%s: blocked after %d bytes; where they wait (Recv-Q, Send-Q per socket):\n%s", dir, blockedAt, whereQueued(t, b))

	p.stop.Store(true)
	r.SetReadDeadline(time.Now().Add(60 * time.Second))
	sha, n, err := drain(r)
	<-p.done
	if p.err != nil {
		t.Fatalf("%s: sender: %v", dir, p.err)
	}
	if err != nil || n != p.total || sha != p.sha {
		t.Fatalf("%s: receiver got %d bytes (err %v) of %d sent, checksum match %v", dir, n, err, p.total, sha == p.sha)
	}
	return blockedAt, p.total
}

// 200 connections whose receivers do not read, in both directions at once:
// the box holds no more than its socket buffers and the relay's pipes and
// buffers allow, and all 200 end cleanly afterwards.
func TestFlowControl200NonReaders(t *testing.T) {
	b := proxiedBox(t, 80)
	const n = 200

	rmax, wmax := tcpMemMax(t, b.Lab.Box, "net.ipv4.tcp_rmem"), tcpMemMax(t, b.Lab.Box, "net.ipv4.tcp_wmem")
	// The per-connection bound the proxy states in its start line, which is
	// the docs' formula: each direction can fill the receiving box socket's
	// receive buffer (2 × proxy.receive_buffer, default 4 MiB) and the
	// sending box socket's send buffer (tcp_wmem max), plus a splice pipe
	// and a read buffer. It must not depend on tcp_rmem any more.
	startLine := b.ProxyLog("intercepting")
	if len(startLine) != 1 {
		t.Fatalf("%d \"intercepting\" lines, want 1", len(startLine))
	}
	bf, _ := startLine[0]["conn_memory_bound_bytes"].(float64)
	bound := int64(bf)
	if want := 2*(2*(4<<20)+wmax) + 2*(1<<20) + 2*(16<<10); bound != want {
		t.Fatalf("the proxy states a bound of %d bytes per connection, the docs' formula gives %d (tcp_wmem max %d)", bound, want, wmax)
	}
	t.Logf("box tcp_rmem max %d (not used: fixed receive buffers), tcp_wmem max %d: bound per connection %d bytes (%.1f MiB), for %d connections %.1f MiB",
		rmax, wmax, bound, mib(bound), n, mib(n*bound))

	var accepted [2]<-chan *net.TCPConn
	var addrs [2]string
	fams := families(b)
	for i, f := range fams {
		addrs[i] = listenServer(t, b, f.server, "80", func(t *testing.T, ln net.Listener) { accepted[i] = acceptAll(t, ln) })
	}
	// One warm-up connection so the baseline is of a proxy that has
	// relayed, not of a fresh process.
	warm, err := lab.Dial(b.Lab.Client, "tcp", addrs[0], 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	ws := <-accepted[0]
	if err := exchange(warm, ws, "warm-up"); err != nil {
		t.Fatal(err)
	}
	warm.Close()
	ws.Close()
	waitConnLog(t, b, warm.LocalAddr())

	before := takeMemSample(t, b)

	var (
		mu      sync.Mutex
		conns   []*net.TCPConn
		pushers []*pusher
	)
	t.Cleanup(func() {
		mu.Lock()
		defer mu.Unlock()
		for _, c := range conns {
			c.Close()
		}
	})
	add := func(c *net.TCPConn, p *pusher) {
		mu.Lock()
		conns = append(conns, c)
		pushers = append(pushers, p)
		mu.Unlock()
	}
	var wg sync.WaitGroup
	errs := make(chan error, n)
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c, err := lab.Dial(b.Lab.Client, "tcp", addrs[i%2], 10*time.Second)
			if err != nil {
				errs <- fmt.Errorf("dial %d: %w", i, err)
				return
			}
			add(c, startPusher(c, uint64(i), false))
		}()
	}
	// The servers push too and never read.
	for range n {
		select {
		case s := <-accepted[0]:
			add(s, startPusher(s, 1000, false))
		case s := <-accepted[1]:
			add(s, startPusher(s, 1000, false))
		case err := <-errs:
			t.Fatal(err)
		case <-time.After(20 * time.Second):
			t.Fatal("the servers did not accept all connections")
		}
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	mu.Lock()
	all := append([]*pusher(nil), pushers...)
	mu.Unlock()
	start := time.Now()
	if _, err := waitAllBlocked(all, time.Second, 120*time.Second, 4*maxPushBeforeBlocked); err != nil {
		t.Fatalf("%d senders into non-readers: %v", len(all), err)
	}
	var pushed, most int64
	for _, p := range all {
		pushed += p.n.Load()
		most = max(most, p.n.Load())
	}
	t.Logf("all %d senders blocked %s after the last connection: %.1f MiB pushed in all, %.2f MiB per connection, %.2f MiB the most by one sender",
		len(all), time.Since(start).Round(time.Millisecond), mib(pushed), mib(pushed/n), mib(most))

	during := takeMemSample(t, b)
	sock := during.boxSock - before.boxSock
	rss := max(during.rss-before.rss, 0)
	newPipes := 0
	for ino := range during.pipes {
		if _, ok := before.pipes[ino]; !ok {
			newPipes++
		}
	}
	pipes := int64(newPipes) << 20
	boxMem := sock + rss + pipes
	t.Logf("box: socket memory +%.1f MiB (%d sockets), proxy RSS +%.1f MiB (%.1f → %.1f MiB), %d new pipes ≤ %.0f MiB (%.1f MiB queued in them): %.1f MiB in all, %.2f MiB per connection",
		mib(sock), during.box.sockets, mib(rss), mib(before.rss), mib(during.rss), newPipes, mib(pipes), mib(during.pipeBytes), mib(boxMem), mib(boxMem/n))
	t.Logf("client sockets +%.1f MiB (%.2f per connection), server sockets +%.1f MiB (%.2f per connection); MemAvailable dropped %.1f MiB (%.2f per connection; whole host: all three namespaces, the test and the pushers)",
		mib(during.clientSock-before.clientSock), mib((during.clientSock-before.clientSock)/n),
		mib(during.serverSock-before.serverSock), mib((during.serverSock-before.serverSock)/n),
		mib(before.memAvail-during.memAvail), mib((before.memAvail-during.memAvail)/n))
	t.Logf("box socket memory by field: %v; largest box socket: r %.1f MiB (rb %.1f MiB), w %.1f MiB (tb %.1f MiB); host TCP memory (sockstat): %s; tcp_mem %s",
		during.box.fields, mib(during.box.maxR), mib(during.box.maxRB), mib(during.box.maxW), mib(during.box.maxTB),
		during.sockstat, strings.TrimSpace(readProc(t, "/proc/sys/net/ipv4/tcp_mem")))
	if boxMem > n*bound {
		t.Errorf("the box holds %.1f MiB for %d stuck connections, over the documented bound of %.1f MiB (%.1f MiB each)",
			mib(boxMem), n, mib(n*bound), mib(bound))
	}
	// Tighter figures, for what the proxy itself controls (the socket
	// buffers are the kernel's, sized by the sysctls above and, with this
	// many stuck connections, by the host-wide tcp_mem): each stuck
	// direction holds at most one splice pipe, and the process grows by
	// little more than its two 16 KiB buffers and two goroutine stacks per
	// connection.
	if newPipes > 2*n {
		t.Errorf("the proxy holds %d new pipes for %d connections, want at most one per direction (%d)", newPipes, n, 2*n)
	}
	const rssPerConn = 64 << 10
	if rss > n*rssPerConn {
		t.Errorf("the proxy's RSS rose %.1f MiB (%.0f KiB per connection), want ≤ %d KiB per connection", mib(rss), float64(rss)/n/1024, rssPerConn>>10)
	}
	if mem, pressure := hostTCPPages(t); mem >= pressure {
		t.Logf("note: host TCP memory is %d pages, at or past tcp_mem pressure (%d): the kernel, not the receivers' windows alone, is what stopped the senders, and the per-connection figures are capped by it", mem, pressure)
	}

	// Cleanup: closing with unread data resets; every connection ends.
	mu.Lock()
	for _, c := range conns {
		c.Close()
	}
	conns = nil
	mu.Unlock()
	st := waitActiveZero(t, b, 30*time.Second)
	if got := st["accepted"]; got != float64(n+1) {
		t.Errorf("the proxy accepted %v connections, want %d", got, n+1)
	}
	if got := len(b.ProxyLog("connection closed")); got != n+1 {
		t.Errorf("%d connection closed lines, want %d", got, n+1)
	}
}

// exchange writes msg on w and reads it back from r.
func exchange(w, r *net.TCPConn, msg string) error {
	r.SetReadDeadline(time.Now().Add(5 * time.Second))
	defer r.SetReadDeadline(time.Time{})
	if _, err := io.WriteString(w, msg); err != nil {
		return err
	}
	buf := make([]byte, len(msg))
	if _, err := io.ReadFull(r, buf); err != nil {
		return err
	}
	if string(buf) != msg {
		return fmt.Errorf("sent %q, got %q", msg, buf)
	}
	return nil
}

// acceptAll hands over every connection ln accepts, until the test ends.
func acceptAll(t *testing.T, ln net.Listener) <-chan *net.TCPConn {
	out := make(chan *net.TCPConn, 1024)
	go func() {
		defer close(out)
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			out <- c.(*net.TCPConn)
		}
	}()
	t.Cleanup(func() { ln.Close() })
	return out
}

// pusher writes a deterministic stream as fast as the socket takes it,
// counting every byte the kernel accepted.
type pusher struct {
	n    atomic.Int64 // bytes written so far
	stop atomic.Bool  // finish the current chunk, half-close, end
	done chan struct{}
	// Set before done closes.
	total int64
	sha   string // of all written (if hashing)
	err   error
}

func startPusher(c *net.TCPConn, seed uint64, hashing bool) *pusher {
	p := &pusher{done: make(chan struct{})}
	go func() {
		defer close(p.done)
		var h hash.Hash
		if hashing {
			h = sha256.New()
		}
		src := rand.NewChaCha8([32]byte{byte(seed), byte(seed >> 8), 'p'})
		chunk := make([]byte, 16<<10)
		for !p.stop.Load() {
			src.Read(chunk)
			if h != nil {
				h.Write(chunk)
			}
			// Short deadlines so that a partial write is counted at
			// once: the counter is exact even while the socket is full.
			for off := 0; off < len(chunk); {
				c.SetWriteDeadline(time.Now().Add(100 * time.Millisecond))
				w, err := c.Write(chunk[off:])
				off += w
				p.n.Add(int64(w))
				if err != nil && !errors.Is(err, os.ErrDeadlineExceeded) {
					p.err = err
					return
				}
			}
		}
		c.SetWriteDeadline(time.Time{})
		p.total = p.n.Load()
		if h != nil {
			p.sha = hex.EncodeToString(h.Sum(nil))
		}
		p.err = c.CloseWrite()
	}()
	return p
}

// waitAllBlocked polls the pushers until none made progress for quiet, and
// returns the most any of them wrote. It fails if one wrote more than
// limit, ended, or timeout passed first.
func waitAllBlocked(ps []*pusher, quiet, timeout time.Duration, limit int64) (int64, error) {
	last := make([]int64, len(ps))
	moved := make([]time.Time, len(ps))
	now := time.Now()
	for i := range moved {
		moved[i] = now
	}
	deadline := now.Add(timeout)
	for {
		blocked := 0
		var most int64
		now := time.Now()
		for i, p := range ps {
			select {
			case <-p.done:
				return 0, fmt.Errorf("sender %d ended after %d bytes: %v", i, p.n.Load(), p.err)
			default:
			}
			n := p.n.Load()
			most = max(most, n)
			if n > limit {
				return n, fmt.Errorf("sender %d wrote %d bytes (%.1f MiB) into a receiver that does not read and is still not blocked", i, n, mib(n))
			}
			if n != last[i] {
				last[i], moved[i] = n, now
			} else if now.Sub(moved[i]) >= quiet {
				blocked++
			}
		}
		if blocked == len(ps) {
			return most, nil
		}
		if now.After(deadline) {
			return most, fmt.Errorf("%d of %d senders still making progress after %s", len(ps)-blocked, len(ps), timeout)
		}
		time.Sleep(50 * time.Millisecond) // polling interval
	}
}

// whereQueued lists the TCP sockets on port 80 in the three
// namespaces with their queues.
func whereQueued(t *testing.T, b *lab.Appliance) string {
	var s strings.Builder
	for _, ns := range []struct {
		name string
		ns   *lab.NS
	}{{"client", b.Lab.Client}, {"box", b.Lab.Box}, {"server", b.Lab.Server}} {
		out := sh(t, ns.ns, "ss", "-tnH", "( sport = :80 or dport = :80 )")
		for _, l := range strings.Split(strings.TrimSpace(out), "\n") {
			fmt.Fprintf(&s, "  %-6s %s\n", ns.name, strings.Join(strings.Fields(l), " "))
		}
	}
	return s.String()
}

// memSample is one reading of who holds memory.
type memSample struct {
	boxSock, clientSock, serverSock int64 // skmem r+w+f summed over the namespace's TCP sockets
	box                             skmemRead
	rss                             int64 // proxy VmRSS
	pipes                           map[string]bool
	pipeBytes                       int64 // queued in the proxy's pipes
	memAvail                        int64
	sockstat                        string
}

func takeMemSample(t *testing.T, b *lab.Appliance) memSample {
	t.Helper()
	var m memSample
	m.box = skmem(t, b.Lab.Box)
	m.boxSock = m.box.held()
	m.clientSock = skmem(t, b.Lab.Client).held()
	m.serverSock = skmem(t, b.Lab.Server).held()
	pid := b.Proxy.PID()
	rss, err := procRSS(pid)
	if err != nil {
		t.Fatal(err)
	}
	m.rss = rss
	m.pipes, m.pipeBytes = procPipes(t, pid)
	m.memAvail = meminfo(t, "MemAvailable")
	m.sockstat = strings.Join(strings.Fields(grepLine(readProc(t, "/proc/net/sockstat"), "TCP:")), " ")
	return m
}

var skmemRE = regexp.MustCompile(`skmem:\(([^)]*)\)`)
var skmemFieldRE = regexp.MustCompile(`^([a-z]+)(\d+)$`)

// skmemRead is ss's skmem fields over the TCP sockets of a namespace.
type skmemRead struct {
	sockets     int
	fields      map[string]int64 // each field summed over the sockets
	maxR, maxRB int64            // r and rb of the socket with the largest r
	maxW, maxTB int64            // w and tb of the one with the largest w
}

// held is r (rmem_alloc) + w (wmem_queued) + f (fwd_alloc), summed.
func (s skmemRead) held() int64 { return s.fields["r"] + s.fields["w"] + s.fields["f"] }

// skmem reads the skmem fields of ns's TCP sockets (one `ss -tanm`).
func skmem(t *testing.T, ns *lab.NS) skmemRead {
	t.Helper()
	s := skmemRead{fields: map[string]int64{}}
	for _, m := range skmemRE.FindAllStringSubmatch(sh(t, ns, "ss", "-tanmH"), -1) {
		s.sockets++
		f := map[string]int64{}
		for _, kv := range strings.Split(m[1], ",") {
			fm := skmemFieldRE.FindStringSubmatch(kv)
			if fm == nil {
				t.Fatalf("unparsable skmem field %q in %q", kv, m[0])
			}
			f[fm[1]], _ = strconv.ParseInt(fm[2], 10, 64)
			s.fields[fm[1]] += f[fm[1]]
		}
		if f["r"] > s.maxR {
			s.maxR, s.maxRB = f["r"], f["rb"]
		}
		if f["w"] > s.maxW {
			s.maxW, s.maxTB = f["w"], f["tb"]
		}
	}
	return s
}

// hostTCPPages returns the host's TCP memory in use and the tcp_mem
// pressure threshold, in pages (both host-wide, not per namespace).
func hostTCPPages(t *testing.T) (inUse, pressure int64) {
	t.Helper()
	f := strings.Fields(grepLine(readProc(t, "/proc/net/sockstat"), "TCP:"))
	for i := 0; i+1 < len(f); i++ {
		if f[i] == "mem" {
			inUse, _ = strconv.ParseInt(f[i+1], 10, 64)
		}
	}
	if tm := strings.Fields(readProc(t, "/proc/sys/net/ipv4/tcp_mem")); len(tm) == 3 {
		pressure, _ = strconv.ParseInt(tm[1], 10, 64)
	}
	return inUse, pressure
}

// tcpMemMax reads the max of a tcp_rmem / tcp_wmem triple in ns.
func tcpMemMax(t *testing.T, ns *lab.NS, key string) int64 {
	t.Helper()
	v, err := ns.ReadSysctl(key)
	if err != nil {
		t.Fatal(err)
	}
	f := strings.Fields(v)
	if len(f) != 3 {
		t.Fatalf("%s = %q, want three numbers", key, v)
	}
	m, err := strconv.ParseInt(f[2], 10, 64)
	if err != nil {
		t.Fatalf("%s = %q: %v", key, v, err)
	}
	return m
}

// procRSS is the process's VmRSS in bytes.
func procRSS(pid int) (int64, error) { return procStatusBytes(pid, "VmRSS") }

// procStatusBytes reads one "Key: N kB" line of /proc/PID/status in bytes.
func procStatusBytes(pid int, key string) (int64, error) {
	s, err := readFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, err
	}
	f := strings.Fields(grepLine(s, key+":"))
	if len(f) != 3 || f[2] != "kB" {
		return 0, fmt.Errorf("no %s in /proc/%d/status", key, pid)
	}
	kb, err := strconv.ParseInt(f[1], 10, 64)
	return kb << 10, err
}

// procFDs is the number of the process's open file descriptors.
func procFDs(pid int) (int, error) {
	ents, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	return len(ents), err
}

// procPipes returns the pipes the process holds (by inode) and how many
// bytes are queued in them, read with FIONREAD on a copy of one end taken
// with pidfd_getfd (0 where that is not possible).
func procPipes(t *testing.T, pid int) (map[string]bool, int64) {
	t.Helper()
	dir := fmt.Sprintf("/proc/%d/fd", pid)
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	pidfd, pidErr := unix.PidfdOpen(pid, 0)
	if pidErr == nil {
		defer unix.Close(pidfd)
	}
	pipes := map[string]bool{}
	var queued int64
	for _, e := range ents {
		target, err := os.Readlink(filepath.Join(dir, e.Name()))
		if err != nil || !strings.HasPrefix(target, "pipe:") || pipes[target] {
			continue // closed meanwhile, not a pipe, or the other end seen
		}
		fdn, _ := strconv.Atoi(e.Name())
		if fdn <= 2 {
			continue // stdio: the lab's output capture
		}
		pipes[target] = true
		if pidErr != nil {
			continue
		}
		fd, err := unix.PidfdGetfd(pidfd, fdn, 0)
		if err != nil {
			continue
		}
		if q, err := unix.IoctlGetInt(fd, unix.TIOCINQ); err == nil {
			queued += int64(q)
		}
		unix.Close(fd)
	}
	return pipes, queued
}

// meminfo reads one /proc/meminfo field in bytes.
func meminfo(t *testing.T, field string) int64 {
	t.Helper()
	f := strings.Fields(grepLine(readProc(t, "/proc/meminfo"), field+":"))
	if len(f) != 3 {
		t.Fatalf("no %s in /proc/meminfo", field)
	}
	kb, err := strconv.ParseInt(f[1], 10, 64)
	if err != nil {
		t.Fatal(err)
	}
	return kb << 10
}

func readProc(t *testing.T, p string) string {
	t.Helper()
	s, err := readFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func grepLine(s, prefix string) string {
	sc := bufio.NewScanner(strings.NewReader(s))
	for sc.Scan() {
		if strings.HasPrefix(sc.Text(), prefix) {
			return sc.Text()
		}
	}
	return ""
}

// proxyStats asks the proxy for a "stats" line (SIGUSR1) and returns it.
func proxyStats(t *testing.T, b *lab.Appliance) lab.LogLine {
	t.Helper()
	line, err := statsLine(b)
	if err != nil {
		t.Fatalf("no stats line after SIGUSR1: %v", err)
	}
	return line
}

// waitActiveZero polls the stats until the proxy has no connection open.
func waitActiveZero(t *testing.T, b *lab.Appliance, timeout time.Duration) lab.LogLine {
	t.Helper()
	var st lab.LogLine
	err := lab.WaitFor(timeout, func() (bool, error) {
		st = proxyStats(t, b)
		return st["active"] == float64(0), nil
	})
	if err != nil {
		t.Fatalf("the proxy still has %v connections open %s after they were closed: %v", st["active"], timeout, st)
	}
	return st
}

func mib(n int64) float64 { return float64(n) / (1 << 20) }
