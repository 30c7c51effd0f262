package e2e

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/ghostwire/ghostwire/lab"
)

// soakMin is the shortest soak; GHOSTWIRE_SOAK_DURATION (a Go duration)
// runs a longer one.
const soakMin = 60 * time.Second

// soakWarmUp is the mixed traffic before the idle baseline is taken.
const soakWarmUp = 3 * time.Second

// At least a minute of mixed traffic, both families at once: short
// request/response connections, keep-alive conversations, bulk both ways,
// slow readers on either side, resets from either side and refused
// upstreams. Every transfer not reset on purpose arrives whole, resets and
// refusals reach the other side as resets, and afterwards the proxy is back
// to its idle file descriptors, goroutines and memory.
func TestSoak(t *testing.T) {
	if testing.Short() {
		t.Skip("soak test: at least 60 s of mixed traffic; skipped in -short mode")
	}
	dur := soakMin
	if v := os.Getenv("GHOSTWIRE_SOAK_DURATION"); v != "" {
		d, err := time.ParseDuration(v)
		if err != nil {
			t.Fatalf("GHOSTWIRE_SOAK_DURATION=%q: %v", v, err)
		}
		dur = max(d, soakMin)
	}
	// 81 is intercepted but nothing listens there: refused upstreams.
	b := proxiedBox(t, 80, 81)
	srv := &soakServer{verdicts: map[int64]soakVerdict{}}
	for _, f := range families(b) {
		listenServer(t, b, f.server, "80", srv.serve)
	}
	s := &soak{t: t, b: b, srv: srv}
	// Until the box's IPv6 addresses finish duplicate address detection
	// the first IPv6 connection stalls for 1-2 s (the box cannot resolve
	// the client's address yet); the soak is about a running box.
	waitNoTentative(t, b.Lab.Box)

	// Warm-up: a short spell of the same mixed traffic, then the idle
	// baseline. The Go runtime's one-time growth under concurrency (OS
	// threads and their stacks, poller descriptors, the heap arena's
	// metadata: 1.5 MiB of anonymous memory here, measured) lands in the
	// baseline, as it would on a box that has carried traffic once. A
	// leak grows with the traffic: a 60 s soak after a 3 s warm-up would
	// show it many times over.
	s.traffic(time.Now().Add(soakWarmUp))
	if fails := s.failures(); len(fails) > 0 {
		t.Fatalf("warm-up traffic: %v", fails)
	}
	if err := srv.wait(30 * time.Second); err != nil {
		t.Fatalf("warm-up server handlers: %v", err)
	}
	waitActiveZero(t, b, 60*time.Second)
	// The proxy returns memory once it has been quiet for a moment (its
	// sweeper, every 0.5 s); the baseline is that quiet state: no change in
	// RSS or fds for 1.5 s.
	base := readSoak(t, b)
	steady := time.Now()
	lab.WaitFor(15*time.Second, func() (bool, error) {
		r := readSoak(t, b)
		if r.rss != base.rss || r.fds != base.fds {
			base, steady = r, time.Now()
		}
		return time.Since(steady) >= 1500*time.Millisecond, nil
	})
	t.Logf("idle baseline after %s of warm-up traffic: %s", soakWarmUp, base)

	// Peaks, sampled while the traffic runs.
	peak := base
	stopSampling := make(chan struct{})
	sampled := make(chan struct{})
	go func() {
		defer close(sampled)
		tick := time.NewTicker(500 * time.Millisecond)
		defer tick.Stop()
		for i := 0; ; i++ {
			select {
			case <-stopSampling:
				return
			case <-tick.C:
			}
			pid := b.Proxy.PID()
			if n, err := procFDs(pid); err == nil {
				peak.fds = max(peak.fds, n)
			}
			if r, err := procRSS(pid); err == nil {
				peak.rss = max(peak.rss, r)
			}
			if i%10 == 0 {
				if st, err := statsLine(b); err == nil {
					peak.goroutines = max(peak.goroutines, int(st["goroutines"].(float64)))
					peak.active = max(peak.active, int(st["active"].(float64)))
				}
			}
		}
	}()

	start := time.Now()
	s.traffic(start.Add(dur))
	trafficTook := time.Since(start)
	close(stopSampling)
	<-sampled

	// Everything the clients opened is closed; the servers finish theirs.
	if err := srv.wait(30 * time.Second); err != nil {
		t.Errorf("server handlers: %v", err)
	}
	st := waitActiveZero(t, b, 60*time.Second)
	idleAt := time.Now()
	first := readSoak(t, b)
	after := first
	// A bounded settle: goroutines of the last connections may still be
	// returning, pipes in Go's splice pool are closed by a finalizer. The
	// assertion below is on the last reading either way; how long it took
	// is logged.
	settle := 10 * time.Second
	if v := os.Getenv("GHOSTWIRE_SOAK_SETTLE"); v != "" { // to explore how long the return takes; the default is what CI asserts
		var err error
		if settle, err = time.ParseDuration(v); err != nil {
			t.Fatalf("GHOSTWIRE_SOAK_SETTLE=%q: %v", v, err)
		}
	}
	// When each measure first came back, for the log.
	back := map[string]time.Duration{}
	lab.WaitFor(settle, func() (bool, error) {
		after = readSoak(t, b)
		err := after.within(base)
		for _, m := range []string{"fds", "goroutines", "RSS"} {
			if _, ok := back[m]; !ok && (err == nil || !strings.Contains(err.Error(), m+" ")) {
				back[m] = time.Since(idleAt).Round(time.Millisecond)
			}
		}
		return err == nil, nil
	})
	settled := time.Since(idleAt)

	// Verdicts.
	fails := s.failures()
	fails = append(fails, srv.check(s.expectServer())...)
	counts, bytes := s.summary()
	var sum strings.Builder
	fmt.Fprintf(&sum, "soak: %s of traffic (%s wanted), IPv4 and IPv6\n", trafficTook.Round(time.Millisecond), dur)
	kinds := make([]string, 0, len(counts))
	for k := range counts {
		kinds = append(kinds, k)
	}
	sort.Strings(kinds)
	for _, k := range kinds {
		fmt.Fprintf(&sum, "  %-13s %6d connections  %9.1f MiB\n", k, counts[k], mib(bytes[k]))
	}
	fmt.Fprintf(&sum, "  keep-alive exchanges %d; refusals: %d, slowest reset %s; server saw %d resets before a header\n",
		s.exchanges.Load(), s.refusals.Load(), time.Duration(s.slowestRefusal.Load()), srv.earlyResets.Load())
	fmt.Fprintf(&sum, "  proxy stats at the end: %v\n", st)
	reasons := map[string]int{}
	for _, l := range b.ProxyLog("connection closed") {
		r, _ := l["reason"].(string)
		if _, port, _ := net.SplitHostPort(fmt.Sprint(l["server"])); port == "81" {
			r = "(port 81) " + r
		}
		reasons[r]++
	}
	fmt.Fprintf(&sum, "  proxy's closing reasons: %v\n", reasons)
	fmt.Fprintf(&sum, "  back within tolerance after active 0 (absent: not within %s): %v\n", settle, back)
	fmt.Fprintf(&sum, "  fds by kind: baseline %v, after %v\n", base.fdKinds, after.fdKinds)
	fmt.Fprintf(&sum, "  baseline: %s\n  peak:     %s\n  at active 0: %s\n  after %s settle: %s\n  failures: %d",
		base, peak, first, settled.Round(time.Millisecond), after, len(fails))
	t.Log(sum.String())

	for i, f := range fails {
		if i == 30 {
			t.Errorf("... and %d more failures", len(fails)-30)
			break
		}
		t.Error(f)
	}
	// The proxy's side of every deliberate reset: it saw it and passed it
	// on (both sockets reset, the reason logged).
	for kind, reason := range map[string]string{"reset-client": "client reset", "reset-server": "server reset"} {
		if reasons[reason] != counts[kind] {
			t.Errorf("the proxy logged %d %q closes for %d %s connections", reasons[reason], reason, counts[kind], kind)
		}
	}
	resets := int64(counts["reset-client"] + counts["reset-server"])
	lost := s.lostResets.Load() + srv.lostResets.Load()
	t.Logf("resets made on purpose: %d; lost on the way to the far peer: %d (budget %d)", resets, lost, lostResetBudget(resets))
	if lost > lostResetBudget(resets) {
		t.Errorf("%d of %d resets never reached the far peer, over the budget of %d", lost, resets, lostResetBudget(resets))
	}
	if got, want := st["dial_failed"], float64(s.refusals.Load()); got != want {
		t.Errorf("the proxy counted %v failed dials, want one per refused connection (%v)", got, want)
	}
	if got, want := st["accepted"], float64(s.total.Load()); got != want {
		t.Errorf("the proxy accepted %v connections, the clients opened %v", got, want)
	}
	if err := after.within(base); err != nil {
		t.Errorf("after the soak the proxy is not back to its idle baseline: %v", err)
	}
}

// soakReading is the proxy's resource use at one moment.
type soakReading struct {
	fds, goroutines, active int
	rss                     int64
	rssAnon, rssFile        int64          // RssAnon and RssFile of /proc/PID/status: the process's own memory, and mapped file pages (the binary's code)
	fdKinds                 map[string]int // "socket", "pipe", "anon_inode:[eventpoll]", ...
}

func (r soakReading) String() string {
	return fmt.Sprintf("fds %d, goroutines %d, RSS %.1f MiB (anon %.1f, file %.1f), active %d", r.fds, r.goroutines, mib(r.rss), mib(r.rssAnon), mib(r.rssFile), r.active)
}

func soakReadingOf(b *lab.Appliance) (soakReading, error) {
	var r soakReading
	pid := b.Proxy.PID()
	var err1, err2, err3 error
	r.fds, err1 = procFDs(pid)
	r.fdKinds = procFDKinds(pid)
	r.rss, err2 = procRSS(pid)
	// For the log only: 0 where the kernel lacks them.
	r.rssAnon, _ = procStatusBytes(pid, "RssAnon")
	r.rssFile, _ = procStatusBytes(pid, "RssFile")
	st, err3 := statsLine(b)
	if err := errors.Join(err1, err2, err3); err != nil {
		return r, err
	}
	r.goroutines = int(st["goroutines"].(float64))
	r.active = int(st["active"].(float64))
	return r, nil
}

func readSoak(t *testing.T, b *lab.Appliance) soakReading {
	t.Helper()
	r, err := soakReadingOf(b)
	if err != nil {
		t.Fatal(err)
	}
	return r
}

// within says whether r is back to base: each of fds, goroutines and RSS
// within 10%. For the small counts (fds and goroutines are in the tens) 10%
// is one or two, so an absolute slack of 2 applies when larger: a
// goroutine or fd of the runtime's own coming or going is not a leak,
// while one per connection (thousands here) still fails.
func (r soakReading) within(base soakReading) error {
	var errs []error
	check := func(name string, got, want int64, slack int64) {
		tol := max(want/10, slack)
		if got > want+tol || got < want-tol {
			errs = append(errs, fmt.Errorf("%s %d, baseline %d (tolerance ±%d)", name, got, want, tol))
		}
	}
	check("fds", int64(r.fds), int64(base.fds), 2)
	check("goroutines", int64(r.goroutines), int64(base.goroutines), 2)
	check("RSS", r.rss, base.rss, 0)
	return errors.Join(errs...)
}

// procFDKinds counts the process's fds by what they are.
func procFDKinds(pid int) map[string]int {
	dir := fmt.Sprintf("/proc/%d/fd", pid)
	ents, _ := os.ReadDir(dir)
	out := map[string]int{}
	for _, e := range ents {
		target, err := os.Readlink(dir + "/" + e.Name())
		if err != nil {
			continue
		}
		if i := strings.Index(target, ":["); i > 0 && !strings.HasPrefix(target, "anon_inode") {
			target = target[:i]
		}
		out[target]++
	}
	return out
}

// statsLine is proxyStats for goroutines that may not fail the test.
func statsLine(b *lab.Appliance) (lab.LogLine, error) {
	seen := len(b.ProxyLog("stats"))
	if err := b.Proxy.Signal(syscall.SIGUSR1); err != nil {
		return nil, err
	}
	var line lab.LogLine
	err := lab.WaitFor(10*time.Second, func() (bool, error) {
		ls := b.ProxyLog("stats")
		if len(ls) > seen {
			line = ls[len(ls)-1]
			return true, nil
		}
		return false, nil
	})
	return line, err
}

// soak is the client side: it runs the kinds of connection and records
// what each saw.
type soak struct {
	t   *testing.T
	b   *lab.Appliance
	srv *soakServer

	ids            atomic.Int64
	total          atomic.Int64 // connections opened through the proxy
	exchanges      atomic.Int64
	refusals       atomic.Int64
	slowestRefusal atomic.Int64
	lostResets     atomic.Int64 // srvreset connections whose reset never reached the client

	mu      sync.Mutex
	records []soakRecord
}

// soakRecord is one connection as its client saw it.
type soakRecord struct {
	kind, fam string
	id        int64
	bytes     int64  // moved, both ways
	serverHas bool   // the server checks what it received: see its verdict
	err       string // "" if as expected
}

func (s *soak) record(r soakRecord) {
	s.mu.Lock()
	s.records = append(s.records, r)
	s.mu.Unlock()
}

func (s *soak) failures() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []string
	for _, r := range s.records {
		if r.err != "" {
			out = append(out, fmt.Sprintf("%s %s #%d: %s", r.fam, r.kind, r.id, r.err))
		}
	}
	return out
}

// expectServer lists the connections whose server verdict must exist,
// with their kind.
func (s *soak) expectServer() map[int64]string {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := map[int64]string{}
	for _, r := range s.records {
		if r.serverHas {
			out[r.id] = r.fam + " " + r.kind
		}
	}
	return out
}

func (s *soak) summary() (counts map[string]int, bytes map[string]int64) {
	s.mu.Lock()
	defer s.mu.Unlock()
	counts, bytes = map[string]int{}, map[string]int64{}
	for _, r := range s.records {
		counts[r.kind]++
		bytes[r.kind] += r.bytes
	}
	return counts, bytes
}

// open dials the server's port 80 and sends the request header.
func (s *soak) open(f family, kind string, seed uint64, up, down int64) (*net.TCPConn, int64, error) {
	id := s.ids.Add(1)
	c, err := lab.Dial(s.b.Lab.Client, "tcp", net.JoinHostPort(f.server, "80"), 5*time.Second)
	if err != nil {
		return nil, id, fmt.Errorf("dial: %w", err)
	}
	s.total.Add(1)
	c.SetDeadline(time.Now().Add(60 * time.Second))
	if _, err := fmt.Fprintf(c, "%s %d %d %d %d\n", kind, id, seed, up, down); err != nil {
		c.Close()
		return nil, id, fmt.Errorf("header: %w", err)
	}
	return c, id, nil
}

func errText(format string, args ...any) string { return fmt.Sprintf(format, args...) }

// rr: a short request, a response, both close.
func (s *soak) rr(f family) {
	seed := rand.Uint64()
	up, down := 100+rand.Int64N(400), 1000+rand.Int64N(16000)
	c, id, err := s.open(f, "rr", seed, up, down)
	rec := soakRecord{kind: "request", fam: f.name, id: id, serverHas: true}
	if err != nil {
		rec.err, rec.serverHas = err.Error(), false
		s.record(rec)
		return
	}
	defer c.Close()
	if _, err := stream(c, up, seed); err != nil {
		rec.err = errText("request: %v", err)
	} else if err := c.CloseWrite(); err != nil {
		rec.err = errText("half-close: %v", err)
	} else {
		rec.err = checkStream(c, down, seed+1)
	}
	rec.bytes = up + down
	s.record(rec)
}

// checkStream drains r and checks it got exactly stream(n, seed).
func checkStream(r io.Reader, n int64, seed uint64) string {
	sha, got, err := drain(r)
	want, _ := stream(io.Discard, n, seed)
	if err != nil || got != n || sha != want {
		return errText("got %d of %d bytes, checksum match %v, err %v", got, n, sha == want, err)
	}
	return ""
}

// keepAlive: one long connection of small exchanges until end.
func (s *soak) keepAlive(f family, end time.Time) {
	c, id, err := s.open(f, "echo", 0, 0, 0)
	rec := soakRecord{kind: "keep-alive", fam: f.name, id: id}
	if err != nil {
		rec.err = err.Error()
		s.record(rec)
		return
	}
	defer c.Close()
	c.SetDeadline(end.Add(60 * time.Second))
	msg := make([]byte, 1024)
	back := make([]byte, 1024)
	n := 0
	for ; time.Now().Before(end); n++ {
		m := msg[:1+rand.IntN(len(msg))]
		for i := range m {
			m[i] = byte(rand.Uint32())
		}
		if _, err := c.Write(m); err != nil {
			rec.err = errText("exchange %d: write: %v", n, err)
			break
		}
		if _, err := io.ReadFull(c, back[:len(m)]); err != nil || string(back[:len(m)]) != string(m) {
			rec.err = errText("exchange %d: echo of %d bytes wrong (%v)", n, len(m), err)
			break
		}
		rec.bytes += 2 * int64(len(m))
		time.Sleep(2 * time.Millisecond) // pacing: a conversation, not a stream
	}
	s.exchanges.Add(int64(n))
	if rec.err == "" {
		c.CloseWrite()
		if rest, err := io.ReadAll(c); err != nil || len(rest) != 0 {
			rec.err = errText("after the exchanges: %d stray bytes, %v", len(rest), err)
		}
	}
	s.record(rec)
}

// bulk: several MiB each way at once.
func (s *soak) bulk(f family) {
	seed := rand.Uint64()
	const size = 8 << 20
	c, id, err := s.open(f, "bulk", seed, size, size)
	rec := soakRecord{kind: "bulk", fam: f.name, id: id, serverHas: true, bytes: 2 * size}
	if err != nil {
		rec.err, rec.serverHas = err.Error(), false
		s.record(rec)
		return
	}
	defer c.Close()
	got := make(chan string, 1)
	go func() { got <- checkStream(c, size, seed+1) }()
	if _, err := stream(c, size, seed); err != nil {
		rec.err = errText("upload: %v", err)
	}
	c.CloseWrite()
	if e := <-got; e != "" {
		rec.err += "download: " + e
	}
	s.record(rec)
}

// slowDownload: the client reads a large response in small reads with
// pauses.
func (s *soak) slowDownload(f family) {
	seed := rand.Uint64()
	const size = 2 << 20
	c, id, err := s.open(f, "slowdown", seed, 0, size)
	rec := soakRecord{kind: "slow-reader-c", fam: f.name, id: id, bytes: size}
	if err != nil {
		rec.err = err.Error()
		s.record(rec)
		return
	}
	defer c.Close()
	c.CloseWrite()
	rec.err = checkStream(&slowReader{r: c, chunk: 8 << 10, pause: 5 * time.Millisecond}, size, seed+1)
	s.record(rec)
}

// slowUpload: the server reads the upload slowly (see soakServer).
func (s *soak) slowUpload(f family) {
	seed := rand.Uint64()
	const size = 2 << 20
	c, id, err := s.open(f, "slowup", seed, size, 0)
	rec := soakRecord{kind: "slow-reader-s", fam: f.name, id: id, serverHas: true, bytes: size}
	if err != nil {
		rec.err, rec.serverHas = err.Error(), false
		s.record(rec)
		return
	}
	defer c.Close()
	if _, err := stream(c, size, seed); err != nil {
		rec.err = errText("upload: %v", err)
	} else {
		c.CloseWrite()
		if reply, err := io.ReadAll(c); err != nil || string(reply) != "ok\n" {
			rec.err = errText("reply %q, %v", reply, err)
		}
	}
	s.record(rec)
}

// clientReset: the client resets in the middle of an upload. The server
// must see a reset, never a clean end (see soakServer).
func (s *soak) clientReset(f family) {
	seed := rand.Uint64()
	const announced, cut = 8 << 20, 1 << 20
	c, id, err := s.open(f, "clireset", seed, announced, 0)
	rec := soakRecord{kind: "reset-client", fam: f.name, id: id}
	if err != nil {
		rec.err = err.Error()
		s.record(rec)
		return
	}
	if _, err := stream(c, cut, seed); err != nil {
		rec.err = errText("upload before the reset: %v", err)
	}
	rec.bytes = cut
	c.SetLinger(0)
	c.Close()
	s.record(rec)
}

// serverReset: the server resets in the middle of a download; the client
// must get the bytes before it intact and then a reset, not an EOF.
func (s *soak) serverReset(f family) {
	seed := rand.Uint64()
	const cut = 1 << 20
	c, id, err := s.open(f, "srvreset", seed, 0, cut)
	rec := soakRecord{kind: "reset-server", fam: f.name, id: id}
	if err != nil {
		rec.err = err.Error()
		s.record(rec)
		return
	}
	defer c.Close()
	sha, got, err := drain(c)
	want, _ := stream(io.Discard, got, seed+1)
	rec.bytes = got
	switch {
	case err == nil:
		rec.err = errText("the server's reset reached the client as a clean EOF after %d bytes", got)
	case errors.Is(err, os.ErrDeadlineExceeded) && sha == want:
		s.lostResets.Add(1) // counted against lostResetBudget
	case !errors.Is(err, syscall.ECONNRESET):
		rec.err = errText("after %d bytes: %v, want connection reset", got, err)
	case sha != want:
		rec.err = errText("the %d bytes before the reset are corrupt", got)
	}
	s.record(rec)
}

// refused: an intercepted port where nothing listens upstream. The client
// gets a reset (or a refusal) promptly.
func (s *soak) refused(f family) {
	id := s.ids.Add(1)
	rec := soakRecord{kind: "refused", fam: f.name, id: id}
	// Every attempt is a SYN diverted to the proxy, which accepts it and
	// fails to dial: the proxy's reset can even beat the client's dial
	// return (ECONNRESET from connect).
	s.total.Add(1)
	s.refusals.Add(1)
	start := time.Now()
	c, err := lab.Dial(s.b.Lab.Client, "tcp", net.JoinHostPort(f.server, "81"), 5*time.Second)
	if err == nil {
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		var n int
		n, err = c.Read(make([]byte, 1))
		if n > 0 {
			err = fmt.Errorf("read %d bytes from nowhere", n)
		}
		c.Close()
	}
	took := time.Since(start)
	for {
		old := s.slowestRefusal.Load()
		if int64(took) <= old || s.slowestRefusal.CompareAndSwap(old, int64(took)) {
			break
		}
	}
	switch {
	case !errors.Is(err, syscall.ECONNRESET) && !errors.Is(err, syscall.ECONNREFUSED):
		rec.err = errText("connection to a port nobody listens on: %v, want a reset", err)
	case took > time.Second:
		rec.err = errText("the reset took %s", took)
	}
	s.record(rec)
}

// slowReader reads at most chunk bytes at a time with a pause before each.
type slowReader struct {
	r     io.Reader
	chunk int
	pause time.Duration
}

func (s *slowReader) Read(p []byte) (int, error) {
	time.Sleep(s.pause) // pacing: this is the slow reader
	return s.r.Read(p[:min(len(p), s.chunk)])
}

// soakServer serves the soak's kinds on port 80 and keeps a verdict for
// each connection whose bytes it checks.
type soakServer struct {
	wg          sync.WaitGroup
	mu          sync.Mutex
	verdicts    map[int64]soakVerdict
	earlyResets atomic.Int64            // reset before a header arrived
	early       []string                // ended otherwise before a header: failures
	open        map[*net.TCPConn]string // handlers running: their peer and header, for a timeout's report
	lostResets  atomic.Int64            // clireset connections whose reset never reached the server
}

type soakVerdict struct {
	kind string
	err  string
}

func (s *soakServer) serve(t *testing.T, ln net.Listener) {
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			s.wg.Add(1)
			tc := c.(*net.TCPConn)
			s.mu.Lock()
			if s.open == nil {
				s.open = map[*net.TCPConn]string{}
			}
			s.open[tc] = tc.RemoteAddr().String()
			s.mu.Unlock()
			go func() {
				defer s.wg.Done()
				defer c.Close()
				s.handle(tc)
				s.mu.Lock()
				delete(s.open, tc)
				s.mu.Unlock()
			}()
		}
	}()
	t.Cleanup(func() { ln.Close() })
}

func (s *soakServer) wait(timeout time.Duration) error {
	done := make(chan struct{})
	go func() { s.wg.Wait(); close(done) }()
	select {
	case <-done:
		return nil
	case <-time.After(timeout):
	}
	// A reset the proxy sent can be lost for good (see lostResetBudget):
	// a clireset handler still reading gets its deadline now, ends with a
	// timeout, and is counted. Anything else still open is a failure.
	s.mu.Lock()
	for c, what := range s.open {
		if strings.Contains(what, " clireset ") {
			c.SetDeadline(time.Now())
		}
	}
	s.mu.Unlock()
	select {
	case <-done:
		return nil
	case <-time.After(5 * time.Second):
		s.mu.Lock()
		defer s.mu.Unlock()
		var open []string
		for _, what := range s.open {
			open = append(open, what)
		}
		return fmt.Errorf("still serving %s after the clients finished: %d connections open (peer, header): %v", timeout, len(open), open)
	}
}

func (s *soakServer) handle(c *net.TCPConn) {
	c.SetDeadline(time.Now().Add(90 * time.Second))
	br := bufio.NewReader(c)
	hdr, err := br.ReadString('\n')
	var (
		kind     string
		id       int64
		seed     uint64
		up, down int64
	)
	if err == nil {
		_, err = fmt.Sscanf(hdr, "%s %d %d %d %d\n", &kind, &id, &seed, &up, &down)
		s.mu.Lock()
		s.open[c] += " " + strings.TrimSpace(hdr)
		s.mu.Unlock()
	}
	if err != nil {
		if errors.Is(err, syscall.ECONNRESET) {
			s.earlyResets.Add(1) // a client reset overtook its header
			return
		}
		s.mu.Lock()
		s.early = append(s.early, fmt.Sprintf("server: connection from %s ended before a header: %q, %v", c.RemoteAddr(), hdr, err))
		s.mu.Unlock()
		return
	}
	verdict := func(e string) {
		s.mu.Lock()
		s.verdicts[id] = soakVerdict{kind, e}
		s.mu.Unlock()
	}
	switch kind {
	case "rr":
		verdict(checkStream(br, up, seed))
		stream(c, down, seed+1)
	case "echo":
		io.Copy(c, br)
		c.CloseWrite()
	case "bulk":
		got := make(chan string, 1)
		go func() { got <- checkStream(br, up, seed) }()
		stream(c, down, seed+1)
		c.CloseWrite()
		verdict(<-got)
	case "slowdown":
		stream(c, down, seed+1)
		c.CloseWrite()
		io.Copy(io.Discard, br)
	case "slowup":
		e := checkStream(&slowReader{r: br, chunk: 8 << 10, pause: 5 * time.Millisecond}, up, seed)
		verdict(e)
		io.WriteString(c, "ok\n")
		c.CloseWrite()
	case "clireset":
		sha, got, err := drain(br)
		want, _ := stream(io.Discard, got, seed)
		switch {
		case err == nil:
			verdict(errText("the client's reset reached the server as a clean EOF after %d bytes", got))
		case errors.Is(err, os.ErrDeadlineExceeded) && sha == want:
			s.lostResets.Add(1) // counted against lostResetBudget
			verdict("")
		case !errors.Is(err, syscall.ECONNRESET):
			verdict(errText("after %d bytes: %v, want connection reset", got, err))
		case sha != want:
			verdict(errText("the %d bytes before the reset are corrupt", got))
		default:
			verdict("")
		}
	case "srvreset":
		stream(c, down, seed+1)
		c.SetLinger(0) // the deferred Close resets
	default:
		verdict("unknown kind " + kind)
	}
}

// check returns the server-side failures: verdicts that failed, and
// connections whose server-side check should exist but does not.
func (s *soakServer) check(expect map[int64]string) []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := append([]string(nil), s.early...)
	for id, v := range s.verdicts {
		if v.err != "" {
			out = append(out, fmt.Sprintf("server %s #%d: %s", v.kind, id, v.err))
		}
	}
	for id, what := range expect {
		if _, ok := s.verdicts[id]; !ok {
			out = append(out, fmt.Sprintf("%s #%d: the server never checked it", what, id))
		}
	}
	return out
}

// traffic runs every kind of connection, both families, until end.
func (s *soak) traffic(end time.Time) {
	b := s.b
	var wg sync.WaitGroup
	worker := func(n int, pace time.Duration, f family, one func(family)) {
		for range n {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for time.Now().Before(end) {
					one(f)
					time.Sleep(pace) // pacing, not readiness
				}
			}()
		}
	}
	for _, f := range families(b) {
		worker(2, 10*time.Millisecond, f, s.rr)
		worker(2, 0, f, func(f family) { s.keepAlive(f, end) })
		worker(1, 100*time.Millisecond, f, s.bulk)
		worker(1, 0, f, s.slowDownload)
		worker(1, 0, f, s.slowUpload)
		worker(1, 100*time.Millisecond, f, s.clientReset)
		worker(1, 100*time.Millisecond, f, s.serverReset)
		worker(1, 500*time.Millisecond, f, s.refused)
	}
	wg.Wait()
}

// lostResetBudget is how many of n deliberate resets may never reach the
// far peer. TCP does not retransmit a reset, so one that is dropped or
// ignored is gone. Seen: 1 of about 1,100, in 3 of about 8 soaks (one with
// nothing else running); the proxy had logged the reset and closed both
// sockets each time. Not proven how: the likely path is that the proxy's
// RST, queued on the CPU that closes the socket, overtakes its last data
// segments in another CPU's veth backlog, so the peer answers with a
// challenge ACK instead of resetting; the box routes that to the client's
// address, where the client may be using the same port for another
// connection (the proxy's upstream port was chosen independently of the
// client's), so no exact reset comes back. The upstream leg now keeps the
// client's port, which should close that path; the budget stays until
// soaks have shown none lost. The proxy's side (the reset seen and
// logged) is checked for every one.
func lostResetBudget(n int64) int64 { return max(2, n/200) }
