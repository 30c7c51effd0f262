package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/ghostwire/ghostwire/lab"
)

// Transparent UDP (issue 12), end to end: real DNS and iperf3 peers and Go
// echo peers, through the real binary.

const (
	udpOvlStarted = "overload started; new udp sessions are not proxied"
	udpOvlEnded   = "overload ended; proxying new udp sessions again"
	// udpEchoPort is where the tests' Go echo servers listen.
	udpEchoPort = 7007
	// udpBypassing is `ghostwire status`'s line while the tables bypass
	// new UDP flows.
	udpBypassing = "udp: at proxy.max_udp_sessions: new UDP flows cross the bridge untouched"
)

var udpFlowsRE = regexp.MustCompile(`(?m)^udp sessions \(seen within udp_idle_timeout\): (\d+)$`)

// udpStatus is `ghostwire status`'s output and its count of UDP flows
// (-1 without that line).
func udpStatus(t *testing.T, b *lab.Appliance) (string, int) {
	t.Helper()
	out, _, err := b.StatusOutput()
	if err != nil {
		t.Fatalf("status: %v", err)
	}
	m := udpFlowsRE.FindStringSubmatch(out)
	if m == nil {
		return out, -1
	}
	n, _ := strconv.Atoi(m[1])
	return out, n
}

// waitUDPBypass waits until `ghostwire status` says (on) or no longer says
// (!on) that new UDP flows cross the bridge untouched.
func waitUDPBypass(t *testing.T, b *lab.Appliance, on bool) {
	t.Helper()
	var out string
	err := lab.WaitFor(10*time.Second, func() (bool, error) {
		out, _ = udpStatus(t, b)
		return strings.Contains(out, udpBypassing) == on, nil
	})
	if err != nil {
		t.Fatalf("status never said bypassing=%v: %v\n%s\nproxy log tail:\n%s", on, err, out, tail(b.Proxy.Stderr(), 20))
	}
}

// needBinaries skips the test unless every command is installed; each
// argument is "command:debian-package".
func needBinaries(t *testing.T, cmds ...string) {
	t.Helper()
	for _, c := range cmds {
		name, pkg, _ := strings.Cut(c, ":")
		if _, err := exec.LookPath(name); err != nil {
			t.Skipf("needs %s (apt-get install %s, or make deps): %v", name, pkg, err)
		}
	}
}

// writeUDPConfig writes the harness config intercepting TCP port 80 and
// udpPorts, with proxyKeys added to the proxy: section (e.g.
// "udp_idle_timeout: 1s").
func writeUDPConfig(b *lab.Appliance, udpPorts []int, proxyKeys []string) error {
	if err := b.WriteConfig([]int{80}, ""); err != nil {
		return err
	}
	cfg, err := readFile(b.Config)
	if err != nil {
		return err
	}
	ps := make([]string, len(udpPorts))
	for i, p := range udpPorts {
		ps[i] = strconv.Itoa(p)
	}
	var keys strings.Builder
	for _, k := range proxyKeys {
		keys.WriteString("  " + k + "\n")
	}
	for _, ins := range []struct{ anchor, add string }{
		{"\n  tcp_ports: [80]\n", "  udp_ports: [" + strings.Join(ps, ", ") + "]\n"},
		{"\n  shutdown_grace: 10s\n", keys.String()},
	} {
		if !strings.Contains(cfg, ins.anchor) {
			return fmt.Errorf("harness config has no %q line to add %q after:\n%s", strings.TrimSpace(ins.anchor), ins.add, cfg)
		}
		cfg = strings.Replace(cfg, ins.anchor, ins.anchor+ins.add, 1)
	}
	return writeFile(b.Config, cfg)
}

// udpBox is proxiedBoxWith for UDP: a provisioned box intercepting TCP 80
// and udpPorts, `ghostwire run` owning the diversion, proxyKeys added to
// the proxy: section.
func udpBox(t *testing.T, udpPorts []int, proxyKeys ...string) *lab.Appliance {
	t.Helper()
	needRoot(t)
	b := newBox(t, 80)
	if err := writeUDPConfig(b, udpPorts, proxyKeys); err != nil {
		t.Fatal(err)
	}
	applyAndRun(t, b)
	// The proxy's replies leave from the box, which resolves IPv6
	// neighbours only once its new bridge's addresses passed duplicate
	// address detection; unlike TCP, nothing retransmits a datagram lost
	// to that.
	waitNoTentative(t, b.Lab.Box)
	return b
}

func udpNetwork(ip netip.Addr) string {
	if ip.Is4() {
		return "udp4"
	}
	return "udp6"
}

// udpEcho is a UDP echo server in the server namespace. Each reply is
// "peer=IP:PORT\n" (the client's address as the server saw it) followed by
// the datagram, sent back to where it came from.
type udpEcho struct {
	addr netip.AddrPort
	mu   sync.Mutex
	seen map[netip.AddrPort]int // datagrams per source address
	// crossed are datagrams whose payload starts "from=ADDR " with ADDR
	// not their source: "ADDR's datagram came from SOURCE".
	crossed []string
}

func udpEchoServer(t *testing.T, b *lab.Appliance, host string, port int) *udpEcho {
	t.Helper()
	ip := netip.MustParseAddr(host)
	e := &udpEcho{addr: netip.AddrPortFrom(ip, uint16(port)), seen: map[netip.AddrPort]int{}}
	c, err := lab.ListenUDP(b.Lab.Server, udpNetwork(ip), e.addr.String())
	if err != nil {
		t.Fatal(err)
	}
	c.SetReadBuffer(4 << 20) // as much as rmem_max allows: bursts of first datagrams
	t.Cleanup(func() { c.Close() })
	go func() {
		buf := make([]byte, 1<<16)
		for {
			n, src, err := c.ReadFromUDPAddrPort(buf)
			if errors.Is(err, net.ErrClosed) {
				return
			}
			if err != nil {
				continue
			}
			src = netip.AddrPortFrom(src.Addr().Unmap(), src.Port())
			e.mu.Lock()
			e.seen[src]++
			if from, ok := bytes.CutPrefix(buf[:n], []byte("from=")); ok {
				if claimed, _, _ := strings.Cut(string(from), " "); claimed != src.String() {
					e.crossed = append(e.crossed, fmt.Sprintf("%s's datagram came from %s", claimed, src))
				}
			}
			e.mu.Unlock()
			reply := append([]byte("peer="+src.String()+"\n"), buf[:n]...)
			c.WriteToUDPAddrPort(reply, src)
		}
	}()
	return e
}

// crossings returns the datagrams that came from another address than
// their payload says (see crossed).
func (e *udpEcho) crossings() []string {
	e.mu.Lock()
	defer e.mu.Unlock()
	return slices.Clone(e.crossed)
}

// sources returns the source addresses the server has seen.
func (e *udpEcho) sources() map[netip.AddrPort]int {
	e.mu.Lock()
	defer e.mu.Unlock()
	out := make(map[netip.AddrPort]int, len(e.seen))
	for a, n := range e.seen {
		out[a] = n
	}
	return out
}

// udpClient is an unconnected UDP socket in the client namespace, so that
// it receives replies from any source and the tests can check which.
type udpClient struct {
	c     *net.UDPConn
	local netip.AddrPort
}

func newUDPClient(t *testing.T, b *lab.Appliance, ip netip.Addr) *udpClient {
	t.Helper()
	c, err := lab.ListenUDP(b.Lab.Client, udpNetwork(ip), netip.AddrPortFrom(ip, 0).String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	a := c.LocalAddr().(*net.UDPAddr).AddrPort()
	return &udpClient{c: c, local: netip.AddrPortFrom(a.Addr().Unmap(), a.Port())}
}

// udpReply is one datagram an echo server sent back.
type udpReply struct {
	from    netip.AddrPort // the reply's source address
	peer    string         // the client's address as the server saw it
	payload []byte
}

// recv reads one echo, waiting at most timeout.
func (u *udpClient) recv(buf []byte, timeout time.Duration) (udpReply, error) {
	u.c.SetReadDeadline(time.Now().Add(timeout))
	n, from, err := u.c.ReadFromUDPAddrPort(buf)
	if err != nil {
		return udpReply{}, err
	}
	from = netip.AddrPortFrom(from.Addr().Unmap(), from.Port())
	head, payload, ok := bytes.Cut(buf[:n], []byte("\n"))
	if !ok || !bytes.HasPrefix(head, []byte("peer=")) {
		return udpReply{from: from}, fmt.Errorf("%s: a %d-byte datagram from %s is not an echo: %.40q", u.local, n, from, buf[:n])
	}
	return udpReply{from: from, peer: string(head[len("peer="):]), payload: bytes.Clone(payload)}, nil
}

// exchange sends payload to server and reads its echo: it must come from
// server and carry payload back. Echoes of other payloads (a late echo of
// an earlier datagram) are skipped, but said in the error if the right one
// never comes.
func (u *udpClient) exchange(server netip.AddrPort, payload []byte, timeout time.Duration) (udpReply, error) {
	if _, err := u.c.WriteToUDPAddrPort(payload, server); err != nil {
		return udpReply{}, fmt.Errorf("%s: send to %s: %w", u.local, server, err)
	}
	deadline := time.Now().Add(timeout)
	buf := make([]byte, 1<<16)
	var others []string
	for {
		r, err := u.recv(buf, time.Until(deadline))
		if err != nil {
			if len(others) > 0 {
				err = fmt.Errorf("%w (other echoes came: %s)", err, strings.Join(others, "; "))
			}
			return r, fmt.Errorf("%s: echo of %d bytes from %s: %w", u.local, len(payload), server, err)
		}
		if !bytes.Equal(r.payload, payload) {
			others = append(others, fmt.Sprintf("%d bytes from %s: %.40q", len(r.payload), r.from, r.payload))
			continue
		}
		if r.from != server {
			return r, fmt.Errorf("%s: the echo came from %s, want the server's address %s", u.local, r.from, server)
		}
		return r, nil
	}
}

// echoLen is the size of the echo of n bytes to client.
func echoLen(client netip.AddrPort, n int) int { return len("peer="+client.String()+"\n") + n }

// num is a numeric field of a log line (JSON numbers are float64), -1 if
// absent.
func num(l lab.LogLine, k string) float64 {
	if f, ok := l[k].(float64); ok {
		return f
	}
	return -1
}

// waitUDPSessionLog waits for n "udp session closed" lines for client and
// returns them; more than n is an error.
func waitUDPSessionLog(t *testing.T, b *lab.Appliance, client netip.AddrPort, n int) []lab.LogLine {
	t.Helper()
	err := lab.WaitFor(10*time.Second, func() (bool, error) { return len(b.UDPSessionLogFor(client)) >= n, nil })
	ls := b.UDPSessionLogFor(client)
	if err != nil || len(ls) != n {
		t.Fatalf("%d %q lines for client %s, want %d (%v): %v\nproxy log tail:\n%s", len(ls), lab.UDPSessionClosed, client, n, err, ls, tail(b.Proxy.Stderr(), 30))
	}
	return ls
}

// boxUDPSockets returns the local addresses of every UDP socket in the
// box namespace (ss -uan), counted.
func boxUDPSockets(t *testing.T, b *lab.Appliance) map[string]int {
	t.Helper()
	out := map[string]int{}
	for _, line := range strings.Split(sh(t, b.Lab.Box, "ss", "-Hnua"), "\n") {
		// State Recv-Q Send-Q Local:Port Peer:Port
		if f := strings.Fields(line); len(f) >= 5 {
			out[f[3]]++
		}
	}
	return out
}

// boxHolds reports whether the box has a UDP socket bound to the client's
// own address: only the proxy's transparent upstream socket of a session
// that kept the client's port can be.
func boxHolds(t *testing.T, b *lab.Appliance, client netip.AddrPort) bool {
	t.Helper()
	return boxUDPSockets(t, b)[client.String()] > 0
}

// waitListening waits until ss in ns lists a socket bound to each of
// addrs (ss's form: "192.0.2.2:53", "[2001:db8:1::2]:53", "*:5201"), with
// ssFlags "-Hlun" or "-Hltn", failing at once if p exits.
func waitListening(t *testing.T, ns *lab.NS, p *lab.Process, ssFlags string, addrs ...string) {
	t.Helper()
	var last string
	err := lab.WaitFor(10*time.Second, func() (bool, error) {
		select {
		case <-p.Done():
			return false, fmt.Errorf("exited: %v\nstdout:\n%s\nstderr:\n%s", p.Wait(), p.Stdout(), p.Stderr())
		default:
		}
		last = sh(t, ns, "ss", ssFlags)
		local := map[string]bool{}
		for _, line := range strings.Split(last, "\n") {
			if f := strings.Fields(line); len(f) >= 5 {
				local[f[3]] = true
			}
		}
		for _, a := range addrs {
			if !local[a] {
				return false, nil
			}
		}
		return true, nil
	})
	if err != nil {
		t.Fatalf("waiting for %v to listen in %s: %v\nss %s:\n%s", addrs, ns.Name, err, ssFlags, last)
	}
}

// startDNSMasq runs dnsmasq in the server namespace answering names from
// hostsFile on the server's two addresses, port 53, logging every query
// with its source address and port to the returned file. It stays in the
// foreground (-k) so the test stops it by PID.
func startDNSMasq(t *testing.T, b *lab.Appliance, hostsFile string) (logFile string) {
	t.Helper()
	dir := filepath.Dir(hostsFile)
	logFile = filepath.Join(dir, "dnsmasq.log")
	s4, s6 := b.Lab.ServerIP4, b.Lab.ServerIP6
	p, err := b.Lab.Start(b.Lab.Server, "dnsmasq",
		"-k",                        // keep in the foreground: its PID is p's
		"--conf-file=/dev/null",     // nothing from /etc/dnsmasq.conf or /etc/dnsmasq.d
		"--no-resolv", "--no-hosts", // no upstream, no /etc/hosts: only the test's zone
		"--addn-hosts="+hostsFile,
		"--port=53",
		"--listen-address="+s4.String()+","+s6.String(),
		"--bind-interfaces",
		"--cache-size=0",
		"--log-queries=extra", // "N IP/PORT query[A] NAME from IP"
		"--log-facility="+logFile,
		"--pid-file="+filepath.Join(dir, "dnsmasq.pid"),
		"--user=root", // keep root: the log in the test's temp dir stays writable
	)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := p.Stop(syscall.SIGTERM, 3*time.Second); err != nil && !strings.Contains(err.Error(), "terminated") {
			t.Logf("dnsmasq: %v", err)
		}
	})
	waitListening(t, b.Lab.Server, p, "-Hlun",
		netip.AddrPortFrom(s4, 53).String(), netip.AddrPortFrom(s6, 53).String())
	return logFile
}

var (
	digAnswerRE = regexp.MustCompile(`(?m)^host-(\d+)\.example\.test\.\s+\d+\s+IN\s+A\s+(\S+)$`)
	digServerRE = regexp.MustCompile(`(?m)^;; SERVER: (.*)$`)
	dnsmasqRE   = regexp.MustCompile(`(?m)dnsmasq\[\d+\]: \d+ (\S+)/(\d+) query\[A\] host-(\d+)\.example\.test from (\S+)$`)
)

// DNS through the proxy with real peers: dig in the client namespace asks
// dnsmasq in the server namespace 100 names over IPv4 and 100 over IPv6.
// Every answer is right and comes from the server's address; dnsmasq saw
// the client's own address and port for every query; the proxy relayed
// every query and answer (its session lines add up to 100 each way per
// family, from exactly the client sockets dnsmasq saw).
func TestUDPDNS(t *testing.T) {
	needBinaries(t, "dnsmasq:dnsmasq-base", "dig:bind9-dnsutils")
	b := udpBox(t, []int{53}, "udp_idle_timeout: 1s")
	const perFamily = 100
	fams := families(b)

	dir := t.TempDir()
	hostsFile := filepath.Join(dir, "hosts")
	var hosts strings.Builder
	for i := 1; i <= perFamily*len(fams); i++ {
		fmt.Fprintf(&hosts, "198.51.100.%d host-%d.example.test\n", i, i)
	}
	if err := writeFile(hostsFile, hosts.String()); err != nil {
		t.Fatal(err)
	}
	logFile := startDNSMasq(t, b, hostsFile)

	for fi, f := range fams {
		var batch strings.Builder
		for i := fi*perFamily + 1; i <= (fi+1)*perFamily; i++ {
			fmt.Fprintf(&batch, "@%s +tries=1 +time=2 +noall +answer +stats host-%d.example.test A\n", f.server, i)
		}
		batchFile := filepath.Join(dir, "batch-"+f.name)
		if err := writeFile(batchFile, batch.String()); err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
		outb, err := b.Lab.Client.Command(ctx, "dig", "-f", batchFile).CombinedOutput()
		cancel()
		out := string(outb)
		if err != nil {
			t.Errorf("%s: dig -f: %v", f.name, err)
		}
		answers := map[int][]string{}
		for _, m := range digAnswerRE.FindAllStringSubmatch(out, -1) {
			n, _ := strconv.Atoi(m[1])
			answers[n] = append(answers[n], m[2])
		}
		bad := 0
		for i := fi*perFamily + 1; i <= (fi+1)*perFamily; i++ {
			if want := fmt.Sprintf("198.51.100.%d", i); len(answers[i]) != 1 || answers[i][0] != want {
				if bad++; bad <= 5 {
					t.Errorf("%s: host-%d.example.test answered %v, want [%s]", f.name, i, answers[i], want)
				}
			}
		}
		want := fmt.Sprintf("%s#53(%s) (UDP)", f.server, f.server)
		servers := digServerRE.FindAllStringSubmatch(out, -1)
		wrong := 0
		for _, m := range servers {
			if m[1] != want {
				wrong++
			}
		}
		if len(servers) != perFamily || wrong > 0 {
			t.Errorf("%s: dig printed %d SERVER lines, %d of them not %q", f.name, len(servers), wrong, want)
		}
		if strings.Contains(strings.ToLower(out), "unexpected source") {
			t.Errorf("%s: dig got replies from an unexpected source", f.name)
		}
		if bad > 0 || wrong > 0 || t.Failed() {
			t.Logf("%s: dig output:\n%s", f.name, out)
		}
		t.Logf("%s: %d/%d names answered right, every answer from %s", f.name, perFamily-bad, perFamily, want)
	}

	// dnsmasq's query log: one line per query, from the client's own address.
	var log string
	err := lab.WaitFor(10*time.Second, func() (bool, error) {
		s, err := readFile(logFile)
		log = s
		return len(dnsmasqRE.FindAllString(s, -1)) >= perFamily*len(fams), err
	})
	if err != nil {
		t.Fatalf("dnsmasq logged %d queries, want %d: %v\n%s", len(dnsmasqRE.FindAllString(log, -1)), perFamily*len(fams), err, log)
	}
	seenBy := make([]map[netip.AddrPort]bool, len(fams)) // client sockets dnsmasq saw, per family
	for fi := range fams {
		seenBy[fi] = map[netip.AddrPort]bool{}
	}
	perName := map[int]int{}
	for _, m := range dnsmasqRE.FindAllStringSubmatch(log, -1) {
		n, _ := strconv.Atoi(m[3])
		perName[n]++
		fi := (n - 1) / perFamily
		if fi < 0 || fi >= len(fams) {
			t.Errorf("dnsmasq logged a query for host-%d", n)
			continue
		}
		f := fams[fi]
		src, from := m[1], m[4]
		if src == f.box || from == f.box {
			t.Errorf("%s: dnsmasq saw the query for host-%d from the box's own address %s: the box's address leaked", f.name, n, f.box)
		}
		if src != f.client || from != f.client {
			t.Errorf("%s: dnsmasq saw the query for host-%d from %s/%s (from %s), want the client %s", f.name, n, src, m[2], from, f.client)
			continue
		}
		port, _ := strconv.Atoi(m[2])
		seenBy[fi][netip.AddrPortFrom(netip.MustParseAddr(src), uint16(port))] = true
	}
	for i := 1; i <= perFamily*len(fams); i++ {
		if perName[i] != 1 {
			t.Errorf("dnsmasq logged %d queries for host-%d, want 1", perName[i], i)
		}
	}

	// The proxy relayed every query and every answer: its sessions to
	// SERVER:53 add up to 100 datagrams each way per family, and their
	// clients are exactly the sockets dnsmasq saw (the proxy kept their
	// ports). Sessions end 1 s after their answer.
	for fi, f := range fams {
		server := netip.AddrPortFrom(netip.MustParseAddr(f.server), 53).String()
		var sessions []lab.LogLine
		sum := func(k string) (n float64) {
			for _, l := range sessions {
				n += num(l, k)
			}
			return n
		}
		lab.WaitFor(10*time.Second, func() (bool, error) {
			sessions = sessions[:0]
			for _, l := range b.ProxyLog(lab.UDPSessionClosed) {
				if l["server"] == server {
					sessions = append(sessions, l)
				}
			}
			return sum("datagrams_up") >= perFamily && sum("datagrams_down") >= perFamily, nil
		})
		if up, down := sum("datagrams_up"), sum("datagrams_down"); up != perFamily || down != perFamily {
			t.Errorf("%s: the proxy's %d sessions to %s relayed %v datagrams up and %v down, want %d each way\n%s",
				f.name, len(sessions), server, up, down, perFamily, b.Proxy.Stderr())
		}
		proxied := map[netip.AddrPort]bool{}
		for _, l := range sessions {
			c, err := netip.ParseAddrPort(fmt.Sprint(l["client"]))
			if err != nil || c.Addr().String() != f.client {
				t.Errorf("%s: proxy session from %v, want the client %s: %v", f.name, l["client"], f.client, l)
				continue
			}
			proxied[c] = true
			if l["reason"] != "idle timeout" {
				t.Errorf("%s: session %v ended for %v, want idle timeout", f.name, l["client"], l["reason"])
			}
		}
		for c := range seenBy[fi] {
			if !proxied[c] {
				t.Errorf("%s: dnsmasq saw a query from %s, but the proxy had no session from that client address (port not kept, or not proxied)", f.name, c)
			}
		}
		for c := range proxied {
			if !seenBy[fi][c] {
				t.Errorf("%s: the proxy had a session from %s, but dnsmasq never saw that address (the server did not see the client's port)", f.name, c)
			}
		}
		t.Logf("%s: %d proxy sessions to %s, %v datagrams up, %v down; dnsmasq saw %d client sockets, all %s",
			f.name, len(sessions), server, sum("datagrams_up"), sum("datagrams_down"), len(seenBy[fi]), f.client)
	}
}

// 1,000 sessions at once, each from a client socket of its own, all
// sending their first datagram together: every one is echoed with its own
// payload, from the server's address, at the first try; the server saw each
// client's IP and (all but at most 1%) its port; the box holds the 1,000
// sessions together (sockets, status, stats); a second datagram on each
// goes through its existing session; at shutdown every session logs its
// line, its counts matching what the server got.
func TestUDP1000Sessions(t *testing.T) {
	b := udpBox(t, []int{udpEchoPort})
	srv := udpEchoServer(t, b, b.Lab.ServerIP4.String(), udpEchoPort)
	const n = 1000
	clients := make([]*udpClient, n)
	for i := range clients {
		clients[i] = newUDPClient(t, b, b.Lab.ClientIP4)
	}

	// round has every client send a datagram at once and read its echo.
	// A client retransmits after 3 s without one, as a real one would, up
	// to twice: a first datagram lost is an error, but the test goes on
	// with every session up to check the rest.
	round := func(r int) {
		t.Helper()
		errs := make([]error, n)
		peers := make([]string, n)
		tries := make([]int, n)
		start := make(chan struct{})
		var wg sync.WaitGroup
		for i, c := range clients {
			wg.Go(func() {
				<-start
				payload := fmt.Appendf(nil, "from=%s round %d client %d", c.local, r, i)
				for tries[i] = 1; ; tries[i]++ {
					rep, err := c.exchange(srv.addr, payload, 3*time.Second)
					errs[i], peers[i] = err, rep.peer
					if !errors.Is(err, os.ErrDeadlineExceeded) || tries[i] == 3 {
						return
					}
				}
			})
		}
		counters, crossed0 := labCounters(t, b), len(srv.crossings())
		t0 := time.Now()
		close(start)
		wg.Wait()
		failed, retried, wrongIP, kept := 0, 0, 0, 0
		for i, c := range clients {
			if errs[i] != nil {
				if failed++; failed <= 5 {
					t.Errorf("round %d: %v", r, errs[i])
				}
				continue
			}
			if tries[i] > 1 {
				retried++
			}
			p, err := netip.ParseAddrPort(peers[i])
			switch {
			case err != nil || p.Addr() != c.local.Addr():
				if wrongIP++; wrongIP <= 5 {
					t.Errorf("round %d: the server saw %q for client %s: not the client's IP", r, peers[i], c.local)
				}
			case p == c.local:
				kept++
			}
		}
		hist := map[int]int{}
		for i := range clients {
			if errs[i] == nil {
				hist[tries[i]]++
			}
		}
		t.Logf("round %d: %d/%d answered in %s (by tries: %v), %d with the client's IP, %d with its port too",
			r, n-failed, n, time.Since(t0).Round(time.Millisecond), hist, n-failed-wrongIP, kept)
		if failed > 0 || retried > 0 {
			t.Errorf("round %d: %d of %d first datagrams went unanswered (%d answered on a retransmission, %d never)\nwhere datagrams were dropped:\n%s",
				r, failed+retried, n, retried, failed, udpLosses(t, b, counters))
		}
		// Each datagram reached the server from its own client's address,
		// never through another client's session.
		if crossed := srv.crossings()[crossed0:]; len(crossed) > 0 {
			t.Errorf("round %d: %d datagrams reached the server from another client's address (relayed through another client's session; its echo went to that client), e.g. %s",
				r, len(crossed), strings.Join(crossed[:min(5, len(crossed))], "; "))
		}
		if failed > 0 || wrongIP > 0 {
			t.FailNow()
		}
		if kept < n*99/100 {
			t.Errorf("round %d: the server saw the client's own port for %d of %d sessions, want at least 99%%", r, kept, n)
		}
	}
	// One exchange first, from a socket of its own: the box resolves the
	// client's and the server's MAC addresses, so that the burst does not
	// overflow the neighbour tables' queues of packets waiting for ARP (a
	// lab artifact: a real box has them cached). Its session is the one
	// more than n below.
	warm := newUDPClient(t, b, b.Lab.ClientIP4)
	if _, err := warm.exchange(srv.addr, []byte("warm-up"), 5*time.Second); err != nil {
		t.Fatalf("warm-up: %v", err)
	}
	round(1)

	// The box holds all of them at once: an upstream socket bound to each
	// client's address.
	socks := boxUDPSockets(t, b)
	held := 0
	for _, c := range clients {
		if socks[c.local.String()] > 0 {
			held++
		}
	}
	if held < n*99/100 {
		t.Errorf("the box holds upstream sockets for %d of the %d clients, want all 1,000 sessions at once", held, n)
	}
	if out, flows := udpStatus(t, b); flows != n+1 {
		t.Errorf("status counts %d UDP flows with %d sessions open, want %d:\n%s", flows, n+1, n+1, out)
	}
	if st, err := statsLine(b); err != nil {
		t.Errorf("stats: %v", err)
	} else if num(st, "udp_sessions") != n+1 {
		t.Errorf("stats with %d sessions open: udp_sessions %v: %v", n+1, st["udp_sessions"], st)
	} else {
		t.Logf("stats with %d sessions open: %v", n+1, st)
	}

	round(2) // through the sessions round 1 opened

	// At shutdown each session logs its line: one per client, up what the
	// server got from its address, down as many echoes.
	if err := b.StopProxy(syscall.SIGTERM); err != nil {
		t.Errorf("SIGTERM: %v", err)
	}
	got := srv.sources()
	bad := 0
	for _, c := range clients {
		ls := b.UDPSessionLogFor(c.local)
		if len(ls) != 1 || num(ls[0], "datagrams_up") != float64(got[c.local]) || num(ls[0], "datagrams_down") != float64(got[c.local]) || ls[0]["reason"] != "shutdown" {
			if bad++; bad <= 5 {
				t.Errorf("client %s: session lines %v, want one with %d datagrams each way (as the server got and echoed), reason shutdown", c.local, ls, got[c.local])
			}
		}
	}
	t.Logf("%d session lines at shutdown, %d not as expected", len(b.ProxyLog(lab.UDPSessionClosed)), bad)
}

// tail is the last n lines of a log.
func tail(b []byte, n int) string {
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	return strings.Join(lines[max(0, len(lines)-n):], "\n")
}

// snmpCounters reads a namespace's IP and UDP statistics, both families:
// /proc/net/snmp's tables as "Ip:ReasmOKs", "Udp:RcvbufErrors"..., and
// /proc/net/snmp6's counters as they are named there ("Ip6FragOKs").
func snmpCounters(t *testing.T, ns *lab.NS) map[string]int64 {
	t.Helper()
	out := map[string]int64{}
	for _, line := range strings.Split(sh(t, ns, "cat", "/proc/net/snmp6"), "\n") {
		if f := strings.Fields(line); len(f) == 2 {
			out[f[0]], _ = strconv.ParseInt(f[1], 10, 64)
		}
	}
	names := map[string][]string{}
	for _, line := range strings.Split(sh(t, ns, "cat", "/proc/net/snmp"), "\n") {
		f := strings.Fields(line)
		if len(f) == 0 {
			continue
		}
		if names[f[0]] == nil {
			names[f[0]] = f[1:]
			continue
		}
		for i, v := range f[1:] {
			if i < len(names[f[0]]) {
				out[f[0]+names[f[0]][i]], _ = strconv.ParseInt(v, 10, 64)
			}
		}
	}
	return out
}

// udpLosses is where datagrams were dropped in the lab since before (from
// snmpCounters of the three namespaces, in order client, box, server), for
// failure messages.
func udpLosses(t *testing.T, b *lab.Appliance, before [3]map[string]int64) string {
	t.Helper()
	var s strings.Builder
	for i, ns := range []*lab.NS{b.Lab.Client, b.Lab.Box, b.Lab.Server} {
		now := snmpCounters(t, ns)
		fmt.Fprintf(&s, "%s:", ns.Name)
		var keys []string
		for k := range now {
			if strings.Contains(k, "Err") || strings.Contains(k, "Discard") || strings.Contains(k, "Fail") || strings.Contains(k, "Drop") {
				keys = append(keys, k)
			}
		}
		slices.Sort(keys)
		for _, k := range keys {
			if d := now[k] - before[i][k]; d != 0 {
				fmt.Fprintf(&s, " %s +%d", k, d)
			}
		}
		s.WriteString("\n")
	}
	if st, err := statsLine(b); err == nil {
		fmt.Fprintf(&s, "proxy stats: udp_dropped %v, udp_sessions %v, udp_port_fallbacks %v\n", st["udp_dropped"], st["udp_sessions"], st["udp_port_fallbacks"])
	}
	return s.String()
}

// labCounters is snmpCounters of the client, box and server namespaces.
func labCounters(t *testing.T, b *lab.Appliance) [3]map[string]int64 {
	t.Helper()
	return [3]map[string]int64{snmpCounters(t, b.Lab.Client), snmpCounters(t, b.Lab.Box), snmpCounters(t, b.Lab.Server)}
}

// A 60,000-byte datagram, 41 fragments on the 1500-byte veths, echoed
// intact both ways, IPv4 and IPv6: the box reassembles it for the proxy
// and fragments it again on the way out, both ways; the proxy counts one
// datagram and every byte each way.
func TestUDPLargeDatagram(t *testing.T) {
	b := udpBox(t, []int{udpEchoPort}, "udp_idle_timeout: 1s")
	for _, f := range families(b) {
		t.Run(f.name, func(t *testing.T) {
			v6 := f.name == "IPv6"
			srv := udpEchoServer(t, b, f.server, udpEchoPort)
			c := newUDPClient(t, b, netip.MustParseAddr(f.client))
			payload := make([]byte, 60000)
			rand.NewChaCha8([32]byte{6, 0}).Read(payload)
			reasm, frag := "Ip:ReasmOKs", "Ip:FragOKs"
			if v6 {
				reasm, frag = "Ip6ReasmOKs", "Ip6FragOKs"
			}
			before := snmpCounters(t, b.Lab.Box)
			rep, err := c.exchange(srv.addr, payload, 5*time.Second)
			if err != nil {
				t.Fatalf("%v\nproxy log tail:\n%s", err, tail(b.Proxy.Stderr(), 10))
			}
			if rep.peer != c.local.String() {
				t.Errorf("the server saw %s for client %s", rep.peer, c.local)
			}
			after := snmpCounters(t, b.Lab.Box)
			dr, df := after[reasm]-before[reasm], after[frag]-before[frag]
			t.Logf("box: %s +%d, %s +%d", reasm, dr, frag, df)
			// Both datagrams left the box fragmented again. IPv4
			// reassembly (ip_defrag) counts in ReasmOKs; IPv6's, done by
			// netfilter's own defrag for the inet hooks, counts nowhere:
			// there the session line below, one datagram of every byte
			// each way, is the proof.
			if df < 2 || (!v6 && dr < 2) {
				t.Errorf("box %s +%d, %s +%d: want the box to reassemble and fragment both datagrams (at least +2 each)", reasm, dr, frag, df)
			}
			l := waitUDPSessionLog(t, b, c.local, 1)[0]
			wantFields(t, l, map[string]any{
				"server":       srv.addr.String(),
				"datagrams_up": 1.0, "bytes_up": float64(len(payload)),
				"datagrams_down": 1.0, "bytes_down": float64(echoLen(c.local, len(payload))),
				"reason": "idle timeout",
			})
		})
	}
}

// With udp_idle_timeout 1s, a session idle that long ends with one line
// (reason "idle timeout", the counts of what was sent each way, a duration
// of its activity plus the timeout); a later datagram from the same
// client socket still gets through, as a new session.
func TestUDPIdleExpiry(t *testing.T) {
	b := udpBox(t, []int{udpEchoPort}, "udp_idle_timeout: 1s")
	srv := udpEchoServer(t, b, b.Lab.ServerIP4.String(), udpEchoPort)
	c := newUDPClient(t, b, b.Lab.ClientIP4)

	var up, down int
	first := time.Now()
	for i, size := range []int{1, 200, 1400, 3000} {
		payload := bytes.Repeat([]byte{byte('a' + i)}, size)
		rep, err := c.exchange(srv.addr, payload, 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		if rep.peer != c.local.String() {
			t.Errorf("the server saw %s for client %s", rep.peer, c.local)
		}
		up += size
		down += echoLen(c.local, size)
	}
	last := time.Now()
	if !boxHolds(t, b, c.local) {
		t.Errorf("while active, the box holds no socket bound to the client's address %s: not proxied, or the port was not kept", c.local)
	}

	l := waitUDPSessionLog(t, b, c.local, 1)[0]
	ended := time.Now()
	wantFields(t, l, map[string]any{
		"server": srv.addr.String(), "reason": "idle timeout",
		"datagrams_up": 4.0, "bytes_up": float64(up), "datagrams_down": 4.0, "bytes_down": float64(down),
	})
	active := last.Sub(first)
	dur := time.Duration(num(l, "duration"))
	t.Logf("session: active %s, lasted %s by its line, logged %s after the last echo", active.Round(time.Millisecond), dur.Round(time.Millisecond), ended.Sub(last).Round(time.Millisecond))
	if dur < active+time.Second-100*time.Millisecond || dur > active+3*time.Second {
		t.Errorf("session lasted %s by its line, want its %s of activity plus the 1s idle timeout", dur, active)
	}
	if ended.Sub(last) < 900*time.Millisecond {
		t.Errorf("the session ended %s after its last datagram, before the 1s idle timeout", ended.Sub(last))
	}
	if boxHolds(t, b, c.local) {
		t.Errorf("after the session's end the box still holds a socket bound to %s", c.local)
	}

	// The same client socket again: a new session.
	rep, err := c.exchange(srv.addr, []byte("again"), 5*time.Second)
	if err != nil {
		t.Fatalf("after the expiry: %v", err)
	}
	if rep.peer != c.local.String() {
		t.Errorf("after the expiry the server saw %s for client %s", rep.peer, c.local)
	}
	l2 := waitUDPSessionLog(t, b, c.local, 2)[1]
	wantFields(t, l2, map[string]any{
		"reason": "idle timeout", "datagrams_up": 1.0, "bytes_up": 5.0,
		"datagrams_down": 1.0, "bytes_down": float64(echoLen(c.local, 5)),
	})
}

// At max_udp_sessions 3 an overload starts (one line): new sessions cross
// the bridge untouched and are answered, never proxied (bar about a tenth
// of the limit, at least one, that raced the switch), while the 3 keep
// being proxied (their lines count every datagram); once sessions expired
// the overload ends (one line) and a new session is proxied again.
func TestUDPOverloadBypass(t *testing.T) {
	const limit = 3
	b := udpBox(t, []int{udpEchoPort}, "udp_idle_timeout: 2s", fmt.Sprintf("max_udp_sessions: %d", limit))
	srv := udpEchoServer(t, b, b.Lab.ServerIP4.String(), udpEchoPort)
	echo := func(c *udpClient, tag string) {
		t.Helper()
		rep, err := c.exchange(srv.addr, []byte(tag), 5*time.Second)
		if err != nil {
			t.Fatalf("%s: %v", tag, err)
		}
		if rep.peer != c.local.String() {
			t.Errorf("%s: the server saw %s for client %s", tag, rep.peer, c.local)
		}
	}

	held := make([]*udpClient, limit)
	sent := make([]int, limit)
	for i := range held {
		held[i] = newUDPClient(t, b, b.Lab.ClientIP4)
		echo(held[i], fmt.Sprintf("held %d", i))
		sent[i]++
	}
	start := waitLogCount(t, b, udpOvlStarted, 1)[0]
	wantFields(t, start, map[string]any{"reason": "connection limit", "max_udp_sessions": float64(limit)})
	// The proxy drops first datagrams over the limit (plus its overshoot)
	// until the runner switched the tables: wait for the switch.
	waitUDPBypass(t, b, true)
	for i, c := range held {
		if !boxHolds(t, b, c.local) {
			t.Errorf("held session %d (%s) below the limit: the box holds no socket for it", i, c.local)
		}
	}

	fresh := make([]*udpClient, 10)
	for i := range fresh {
		fresh[i] = newUDPClient(t, b, b.Lab.ClientIP4)
		echo(fresh[i], fmt.Sprintf("new %d during the overload", i))
		for j, c := range held {
			echo(c, fmt.Sprintf("held %d during the overload", j))
			sent[j]++
		}
	}
	socks := boxUDPSockets(t, b)
	proxiedNow := 0
	for _, c := range fresh {
		if socks[c.local.String()] > 0 {
			proxiedNow++
		}
	}
	t.Logf("during the overload the box holds sockets for %d of %d new clients", proxiedNow, len(fresh))
	wantLogCount(t, b, udpOvlStarted, 1, "after 10 new clients during the overload")
	wantLogCount(t, b, udpOvlEnded, 0, "during the overload")
	if st, err := statsLine(b); err != nil {
		t.Errorf("stats: %v", err)
	} else if n := num(st, "udp_sessions"); st["udp_overloaded"] != true || n < limit || n > limit+max(1, limit/10) {
		t.Errorf("stats during the overload: udp_overloaded %v, udp_sessions %v, want true and the %d held (plus at most a racer): %v", st["udp_overloaded"], n, limit, st)
	}

	// Quiet: the sessions expire, the overload ends.
	end := waitLogCount(t, b, udpOvlEnded, 1)[0]
	t.Logf("overload ended: %v", end)
	waitUDPBypass(t, b, false)
	for i, c := range held {
		l := waitUDPSessionLog(t, b, c.local, 1)[0]
		wantFields(t, l, map[string]any{"datagrams_up": float64(sent[i]), "datagrams_down": float64(sent[i]), "reason": "idle timeout"})
	}

	after := newUDPClient(t, b, b.Lab.ClientIP4)
	echo(after, "after the overload")
	if !boxHolds(t, b, after.local) {
		t.Errorf("new client %s after the overload: the box holds no socket for it, want proxied again", after.local)
	}

	// Stopped, the proxy has logged every session it ever had.
	if err := b.StopProxy(syscall.SIGTERM); err != nil {
		t.Errorf("SIGTERM: %v", err)
	}
	if ls := b.UDPSessionLogFor(after.local); len(ls) != 1 {
		t.Errorf("new client after the overload: %d session lines, want 1 (proxied)", len(ls))
	}
	raced := 0
	for i, c := range fresh {
		if ls := b.UDPSessionLogFor(c.local); len(ls) > 0 {
			raced++
			t.Logf("new client %d (%s) during the overload was proxied: %v", i, c.local, ls)
		}
	}
	if allowed := max(1, limit/10); raced > allowed {
		t.Errorf("%d of %d new clients during the overload were proxied, want at most %d (racing the switch); the rest bridged", raced, len(fresh), allowed)
	}
	wantLogCount(t, b, udpOvlStarted, 1, "at the end")
	wantLogCount(t, b, udpOvlEnded, 1, "at the end")
}

// udpPinger sends a numbered datagram from one client socket every
// interval and records the echoes.
type udpPinger struct {
	c        *udpClient
	server   netip.AddrPort
	stopSend chan struct{}
	stopRecv chan struct{}
	sendDone chan struct{}
	recvDone chan struct{}

	mu     sync.Mutex
	sent   []time.Time // by sequence number
	echoes []udpPing
}

// udpPing is one echo the pinger received.
type udpPing struct {
	seq  int
	got  time.Time
	from netip.AddrPort
	peer string
}

func startPinger(t *testing.T, c *udpClient, server netip.AddrPort, interval time.Duration) *udpPinger {
	p := &udpPinger{c: c, server: server,
		stopSend: make(chan struct{}), stopRecv: make(chan struct{}),
		sendDone: make(chan struct{}), recvDone: make(chan struct{})}
	go func() {
		defer close(p.sendDone)
		tick := time.NewTicker(interval)
		defer tick.Stop()
		for seq := 0; ; seq++ {
			p.mu.Lock()
			p.sent = append(p.sent, time.Now())
			p.mu.Unlock()
			c.c.WriteToUDPAddrPort(fmt.Appendf(nil, "seq=%d", seq), server)
			select {
			case <-p.stopSend:
				return
			case <-tick.C:
			}
		}
	}()
	go func() {
		defer close(p.recvDone)
		buf := make([]byte, 1<<16)
		for {
			select {
			case <-p.stopRecv:
				return
			default:
			}
			r, err := c.recv(buf, 100*time.Millisecond)
			if err != nil {
				continue
			}
			seq, err := strconv.Atoi(strings.TrimPrefix(string(r.payload), "seq="))
			if err != nil {
				continue
			}
			p.mu.Lock()
			p.echoes = append(p.echoes, udpPing{seq: seq, got: time.Now(), from: r.from, peer: r.peer})
			p.mu.Unlock()
		}
	}()
	t.Cleanup(func() { p.stop(0) })
	return p
}

// stop stops sending, waits up to grace for the last echoes, then stops
// receiving. Calling it again does nothing.
func (p *udpPinger) stop(grace time.Duration) {
	select {
	case <-p.stopSend:
		return
	default:
	}
	close(p.stopSend)
	<-p.sendDone
	lab.WaitFor(grace, func() (bool, error) {
		p.mu.Lock()
		defer p.mu.Unlock()
		return len(p.echoes) >= len(p.sent), nil
	})
	close(p.stopRecv)
	<-p.recvDone
}

// waitEchoes waits until n more echoes arrived than when it was called.
func (p *udpPinger) waitEchoes(t *testing.T, b *lab.Appliance, n int, what string) {
	t.Helper()
	have := len(p.snapshotEchoes())
	if err := lab.WaitFor(5*time.Second, func() (bool, error) { return len(p.snapshotEchoes()) >= have+n, nil }); err != nil {
		t.Fatalf("%s: %d echoes, want %d more than %d: %v\nproxy log:\n%s", what, len(p.snapshotEchoes()), n, have, err, tail(b.Proxy.Stderr(), 20))
	}
}

func (p *udpPinger) snapshotEchoes() []udpPing {
	p.mu.Lock()
	defer p.mu.Unlock()
	return append([]udpPing(nil), p.echoes...)
}

func (p *udpPinger) snapshotSent() []time.Time {
	p.mu.Lock()
	defer p.mu.Unlock()
	return append([]time.Time(nil), p.sent...)
}

// kill -9 of the proxy while a UDP session is running (a datagram every
// 50 ms): the exchange resumes bridged (echoes from the server's address,
// the server seeing the client's own address) within 1 s of the kill.
func TestUDPKill9FailsOpenWithin1s(t *testing.T) {
	b := udpBox(t, []int{udpEchoPort})
	srv := udpEchoServer(t, b, b.Lab.ServerIP4.String(), udpEchoPort)
	c := newUDPClient(t, b, b.Lab.ClientIP4)
	p := startPinger(t, c, srv.addr, 50*time.Millisecond)
	p.waitEchoes(t, b, 5, "before the kill")
	if !boxHolds(t, b, c.local) {
		t.Fatalf("before the kill the box holds no socket bound to the client's address %s: not proxied", c.local)
	}

	if err := b.Proxy.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	killed := time.Now()
	<-b.Proxy.Done()

	// The first echo of a datagram sent after the kill.
	var first *udpPing
	lab.WaitFor(3*time.Second, func() (bool, error) {
		sent := p.snapshotSent()
		for _, e := range p.snapshotEchoes() {
			if e.seq < len(sent) && sent[e.seq].After(killed) {
				first = &e
				return true, nil
			}
		}
		return false, nil
	})
	if first == nil {
		t.Fatalf("no echo within 3s of kill -9 (%d sent, %d echoed in all)", len(p.snapshotSent()), len(p.snapshotEchoes()))
	}
	gap := first.got.Sub(killed)
	t.Logf("first echo of a datagram sent after kill -9: %s after the kill (seq %d)", gap.Round(time.Millisecond), first.seq)
	if gap > time.Second {
		t.Errorf("UDP came back %s after kill -9, want within 1s", gap)
	}
	p.waitEchoes(t, b, 5, "after the kill")
	p.stop(time.Second)
	for _, e := range p.snapshotEchoes() {
		if e.from != srv.addr || e.peer != c.local.String() {
			t.Errorf("echo %d came from %s, the server saw %s: want from %s, seen as the client %s", e.seq, e.from, e.peer, srv.addr, c.local)
		}
	}
	if boxHolds(t, b, c.local) {
		t.Error("after kill -9 the box still holds a socket bound to the client's address")
	}
	b.Proxy = nil
	if st, _ := b.Status(); !strings.HasPrefix(st, "ghostwire: bypassing") {
		t.Errorf("status after kill -9 = %q, want bypassing", st)
	}
}

// SIGHUP adds a UDP port while a bridged exchange on it runs (a datagram
// every 50 ms), then removes it: the exchange goes on throughout, losing at
// most two datagrams at each switch; with the port added the proxy takes
// the flow over (a session, the client's port kept), with it removed the
// flow is bridged again (the proxy's session idles out while the exchange
// goes on); the server sees the same client address and port all along.
func TestUDPSIGHUPAddsRemovesPort(t *testing.T) {
	b := udpBox(t, nil, "udp_idle_timeout: 1s")
	srv := udpEchoServer(t, b, b.Lab.ServerIP4.String(), udpEchoPort)
	c := newUDPClient(t, b, b.Lab.ClientIP4)
	p := startPinger(t, c, srv.addr, 50*time.Millisecond)
	p.waitEchoes(t, b, 10, "before any reload")
	if boxHolds(t, b, c.local) {
		t.Errorf("port %d not intercepted, yet the box holds a socket for %s", udpEchoPort, c.local)
	}

	reload := func(ports []int, n int) time.Time {
		t.Helper()
		if err := writeUDPConfig(b, ports, []string{"udp_idle_timeout: 1s"}); err != nil {
			t.Fatal(err)
		}
		at := time.Now()
		if err := b.Proxy.Signal(syscall.SIGHUP); err != nil {
			t.Fatal(err)
		}
		waitLogCount(t, b, "reloaded", n)
		return at
	}

	added := reload([]int{udpEchoPort}, 1)
	if err := lab.WaitFor(5*time.Second, func() (bool, error) { return boxHolds(t, b, c.local), nil }); err != nil {
		t.Fatalf("port %d added: the box never took the running exchange over (no socket bound to %s): %v", udpEchoPort, c.local, err)
	}
	p.waitEchoes(t, b, 10, "with the port added")
	if st, err := statsLine(b); err != nil || num(st, "udp_sessions") != 1 {
		t.Errorf("stats with the port added: %v (%v), want udp_sessions 1", st, err)
	}
	if ls := b.UDPSessionLogFor(c.local); len(ls) != 0 {
		t.Errorf("the session ended while the exchange ran: %v", ls)
	}

	removed := reload(nil, 2)
	// The proxy no longer sees the flow: its session idles out although
	// the exchange goes on.
	l := waitUDPSessionLog(t, b, c.local, 1)[0]
	if l["reason"] != "idle timeout" || num(l, "datagrams_up") < 10 {
		t.Errorf("the proxy's session: %v, want at least 10 datagrams up, ended by idle timeout", l)
	}
	p.waitEchoes(t, b, 10, "with the port removed")
	if boxHolds(t, b, c.local) {
		t.Error("port removed: the box still holds a socket for the client")
	}
	p.stop(time.Second)

	sent, echoes := p.snapshotSent(), p.snapshotEchoes()
	got := map[int]bool{}
	for _, e := range echoes {
		got[e.seq] = true
		if e.from != srv.addr {
			t.Errorf("echo %d came from %s, want the server %s", e.seq, e.from, srv.addr)
		}
	}
	var lost [3][]int // before, port added, port removed
	for seq, at := range sent {
		if got[seq] {
			continue
		}
		phase := 0
		if at.After(removed) {
			phase = 2
		} else if at.After(added) {
			phase = 1
		}
		lost[phase] = append(lost[phase], seq)
	}
	t.Logf("%d datagrams sent, %d echoed; lost before: %v, after adding: %v, after removing: %v; proxy session: %v up, %v down",
		len(sent), len(got), lost[0], lost[1], lost[2], l["datagrams_up"], l["datagrams_down"])
	if len(lost[0]) > 0 || len(lost[1]) > 2 || len(lost[2]) > 2 {
		t.Errorf("lost datagrams: %v before any reload (want none), %v after adding the port, %v after removing it (want at most 2 each)", lost[0], lost[1], lost[2])
	}
	srcs := srv.sources()
	if len(srcs) != 1 || srcs[c.local] == 0 {
		t.Errorf("the server saw %v, want only the client %s all along", srcs, c.local)
	}
}

// iperf3Sum is one of the totals of `iperf3 -u -J`.
type iperf3Sum struct {
	Bytes       int64   `json:"bytes"`
	Packets     int64   `json:"packets"`
	LostPackets int64   `json:"lost_packets"`
	LostPercent float64 `json:"lost_percent"`
	BitsPerSec  float64 `json:"bits_per_second"`
}

// iperf3Result is what the tests read of `iperf3 -u -J`: the data
// socket, the sender's totals and the receiver's (as the server reported
// them back).
type iperf3Result struct {
	Start struct {
		Connected []struct {
			LocalHost string `json:"local_host"`
			LocalPort int    `json:"local_port"`
		} `json:"connected"`
	} `json:"start"`
	End struct {
		SumSent     iperf3Sum `json:"sum_sent"`
		SumReceived iperf3Sum `json:"sum_received"`
	} `json:"end"`
	Error string `json:"error"`
}

// iperf3 UDP at 200 Mbit/s through the proxy, IPv4 and IPv6 (its TCP
// control connection crosses untouched): the receiver loses under 5%, and
// the proxy's session for iperf3's data socket relayed at least what the
// receiver got.
func TestUDPIperf3(t *testing.T) {
	needBinaries(t, "iperf3:iperf3")
	b := udpBox(t, []int{5201}, "udp_idle_timeout: 1s")
	srv, err := b.Lab.Start(b.Lab.Server, "iperf3", "-s")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { srv.Stop(syscall.SIGTERM, 3*time.Second) })
	waitListening(t, b.Lab.Server, srv, "-Hltn", "*:5201")

	for _, f := range families(b) {
		t.Run(f.name, func(t *testing.T) {
			fam := "-4"
			if f.name == "IPv6" {
				fam = "-6"
			}
			ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
			defer cancel()
			out, err := b.Lab.Client.Command(ctx, "iperf3", fam, "-u", "-c", f.server, "-b", "200M", "-l", "1400", "-t", "3", "-J").Output()
			var r iperf3Result
			if jerr := json.Unmarshal(out, &r); err != nil || jerr != nil || r.Error != "" {
				t.Fatalf("iperf3: %v %v %s\n%s\niperf3 server:\n%s", err, jerr, r.Error, out, srv.Stdout())
			}
			rcv := r.End.SumReceived
			got := rcv.Packets - rcv.LostPackets
			t.Logf("iperf3 %s: sent %d datagrams, receiver counted %d, lost %d (%.2f%%), %.0f Mbit/s received",
				f.name, r.End.SumSent.Packets, rcv.Packets, rcv.LostPackets, rcv.LostPercent, rcv.BitsPerSec/1e6)
			if got <= 0 || rcv.LostPercent >= 5 {
				t.Errorf("iperf3 %s: receiver got %d of %d datagrams (%.2f%% lost), want under 5%% lost", f.name, got, rcv.Packets, rcv.LostPercent)
			}
			if len(r.Start.Connected) != 1 {
				t.Fatalf("iperf3 reports %d data sockets, want 1", len(r.Start.Connected))
			}
			cs := r.Start.Connected[0]
			client := netip.AddrPortFrom(netip.MustParseAddr(cs.LocalHost).Unmap(), uint16(cs.LocalPort))
			l := waitUDPSessionLog(t, b, client, 1)[0]
			t.Logf("proxy session: %v", l)
			if l["server"] != netip.AddrPortFrom(netip.MustParseAddr(f.server), 5201).String() {
				t.Errorf("the proxy's session from %s went to %v, want %s port 5201", client, l["server"], f.server)
			}
			if up := num(l, "datagrams_up"); up < float64(got) {
				t.Errorf("the proxy relayed %v datagrams up, but the receiver got %d", up, got)
			}
		})
	}
}
