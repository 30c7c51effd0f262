package e2e

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/ghostwire/ghostwire/lab"
)

// The name policy (issue 13), end to end: real TLS and HTTP clients and
// servers in the lab, through the real binary. A denied connection is
// reset before any upstream SYN; an allowed one is relayed whole.

// policyYAML denies *.bad.example by SNI and by Host and allows the rest.
const policyYAML = `policy:
  sni:
    deny: ["*.bad.example"]
  http_host:
    deny: ["*.bad.example"]
  default: allow
  inspect_timeout: 2s
`

// policyBox is a provisioned box intercepting ports, with extraYAML
// (top-level sections) added to the harness config and `ghostwire run
// --json` owning the diversion.
func policyBox(t *testing.T, extraYAML string, ports ...int) *lab.Appliance {
	t.Helper()
	needRoot(t)
	b := newBox(t, ports...)
	if err := b.WriteConfig(ports, extraYAML); err != nil {
		t.Fatal(err)
	}
	applyAndRun(t, b)
	return b
}

// clientAddr is the client's address with a fixed port, as the proxy logs
// it (curl --local-port picks it, so a log line finds its connection).
func clientAddr(ip netip.Addr, port int) net.Addr {
	return net.TCPAddrFromAddrPort(netip.AddrPortFrom(ip, uint16(port)))
}

// upstreamSYNs counts the SYNs (without ACK) to server:port in frames.
func upstreamSYNs(frames []lab.Frame, server netip.Addr, port uint16) int {
	n := 0
	for _, f := range frames {
		if f.Proto == lab.ProtoTCP && f.Dst == server && f.DstPort == port &&
			f.TCPFlags&lab.TCPFlagSYN != 0 && f.TCPFlags&lab.TCPFlagACK == 0 {
			n++
		}
	}
	return n
}

// serverLinkSYNs runs fn while capturing on the server's link and returns
// the SYNs to server:port seen there. fn must only return once the proxy
// has decided (logged) the connections it made: the proxy dials before it
// logs, so a SYN it sent is on the link by then.
func serverLinkSYNs(t *testing.T, b *lab.Appliance, server netip.Addr, port uint16, fn func()) int {
	t.Helper()
	capt, err := b.Lab.Server.Capture(b.Lab.ServerIf)
	if err != nil {
		t.Fatal(err)
	}
	fn()
	frames, err := capt.Stop()
	if err != nil {
		t.Fatal(err)
	}
	return upstreamSYNs(frames, server, port)
}

// curlResult is one curl run.
type curlResult struct {
	stdout, stderr string
	exit           int // 0 on success, curl's exit status otherwise
}

// runCurl runs curl in the client namespace.
func runCurl(t *testing.T, b *lab.Appliance, args ...string) curlResult {
	t.Helper()
	needBinaries(t, "curl:curl")
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cmd := b.Lab.Client.Command(ctx, "curl", append([]string{"-sS", "--max-time", "10"}, args...)...)
	var out, errOut bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errOut
	err := cmd.Run()
	r := curlResult{stdout: out.String(), stderr: errOut.String()}
	var ee *exec.ExitError
	switch {
	case err == nil:
	case errors.As(err, &ee):
		r.exit = ee.ExitCode()
	default:
		t.Fatalf("curl %v: %v", args, err)
	}
	return r
}

// checkDenyLine checks a denied connection's log line: the policy's reason
// naming the entry, the name under key ("sni" or "host"), nothing relayed.
func checkDenyLine(t *testing.T, line lab.LogLine, key, name, entry, server string) {
	t.Helper()
	why := key + " deny " + entry
	if line["reason"] != "policy: "+why || line[key] != name || line["decision"] != "deny" || line["policy"] != why ||
		line["server"] != server || line["bytes_up"] != float64(0) || line["bytes_down"] != float64(0) {
		t.Errorf("denied connection's log line = %v\nwant reason %q, %s %q, decision deny, policy %q, server %s, no bytes", line, "policy: "+why, key, name, why, server)
	}
}

// selfSigned writes a self-signed certificate for cn and its key into dir.
func selfSigned(t *testing.T, dir, cn string) (cert, key string) {
	t.Helper()
	needBinaries(t, "openssl:openssl")
	cert, key = filepath.Join(dir, "cert.pem"), filepath.Join(dir, "key.pem")
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes",
		"-subj", "/CN="+cn, "-days", "1", "-keyout", key, "-out", cert).CombinedOutput()
	if err != nil {
		t.Fatalf("openssl req: %v\n%s", err, out)
	}
	return cert, key
}

// startSServer runs `openssl s_server -www` in the server namespace on
// addr (IPv4 host:port) and waits until it listens.
func startSServer(t *testing.T, b *lab.Appliance, addr string) {
	t.Helper()
	cert, key := selfSigned(t, t.TempDir(), "good.example")
	p, err := b.Lab.Start(b.Lab.Server, "openssl", "s_server", "-accept", addr, "-cert", cert, "-key", key, "-www")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Stop(syscall.SIGTERM, 3*time.Second) })
	waitListening(t, b.Lab.Server, p, "-Hltn", addr)
}

// A real TLS client (curl) to a real TLS server (openssl s_server): a name
// under *.bad.example is reset by the proxy without any upstream SYN and
// logged as an SNI deny; good.example gets the server's page.
func TestPolicySNIDenyCurl(t *testing.T) {
	needBinaries(t, "curl:curl", "openssl:openssl")
	b := policyBox(t, policyYAML, 443)
	client, server := b.Lab.ClientIP4, b.Lab.ServerIP4
	serverAddr := netip.AddrPortFrom(server, 443).String()
	startSServer(t, b, serverAddr)

	get := func(name string, localPort int) curlResult {
		return runCurl(t, b, "-k", "--local-port", fmt.Sprint(localPort),
			"--resolve", name+":443:"+server.String(), "https://"+name+"/")
	}

	const denyPort, allowPort = 41001, 41002
	var denied curlResult
	var line lab.LogLine
	syns := serverLinkSYNs(t, b, server, 443, func() {
		denied = get("www.bad.example", denyPort)
		line = waitConnLog(t, b, clientAddr(client, denyPort))
	})
	// 35: the TLS handshake failed (reset during it); 56: a receive failed.
	if denied.exit != 35 && denied.exit != 56 {
		t.Errorf("curl to the denied name: exit %d, want 35 or 56 (reset in the handshake)\nstdout: %s\nstderr: %s", denied.exit, denied.stdout, denied.stderr)
	}
	checkDenyLine(t, line, "sni", "www.bad.example", "*.bad.example", serverAddr)
	if syns != 0 {
		t.Errorf("the proxy sent %d SYNs upstream for a denied name", syns)
	}

	var allowed curlResult
	syns = serverLinkSYNs(t, b, server, 443, func() {
		allowed = get("good.example", allowPort)
		line = waitConnLog(t, b, clientAddr(client, allowPort))
	})
	if allowed.exit != 0 || !strings.Contains(allowed.stdout, "s_server") {
		t.Errorf("curl to the allowed name: exit %d, page %q\nstderr: %s", allowed.exit, allowed.stdout, allowed.stderr)
	}
	if syns != 1 {
		t.Errorf("the allowed connection made %d upstream SYNs, want 1", syns)
	}
	if line["sni"] != "good.example" || line["decision"] != "allow" || line["policy"] != "sni: default allow" ||
		line["server"] != serverAddr || line["bytes_down"].(float64) <= 0 {
		t.Errorf("allowed connection's log line = %v", line)
	}
}

// httpServer serves HTTP in the server namespace on addr: each response is
// "host=HOST\n". It counts accepted connections and the bytes it wrote.
type httpServer struct {
	accepts atomic.Int64
	sent    atomic.Int64
	mu      sync.Mutex
	hosts   []string
}

func startHTTPServer(t *testing.T, b *lab.Appliance, addr string) *httpServer {
	t.Helper()
	ln, err := lab.Listen(b.Lab.Server, "tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	s := &httpServer{}
	srv := &http.Server{
		Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			s.mu.Lock()
			s.hosts = append(s.hosts, r.Host)
			s.mu.Unlock()
			fmt.Fprintf(w, "host=%s\n", r.Host)
		}),
		ReadHeaderTimeout: 10 * time.Second,
	}
	go srv.Serve(&countingListener{Listener: ln, s: s})
	t.Cleanup(func() { srv.Close() })
	return s
}

func (s *httpServer) seenHosts() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]string(nil), s.hosts...)
}

type countingListener struct {
	net.Listener
	s *httpServer
}

func (l *countingListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err == nil {
		l.s.accepts.Add(1)
		c = &countingConn{Conn: c, sent: &l.s.sent}
	}
	return c, err
}

type countingConn struct {
	net.Conn
	sent *atomic.Int64
}

func (c *countingConn) Write(p []byte) (int, error) {
	n, err := c.Conn.Write(p)
	c.sent.Add(int64(n))
	return n, err
}

// Plain HTTP with curl: a Host under *.bad.example is reset before any
// upstream SYN and logged as a host deny; good.example is served.
func TestPolicyHTTPHostDenyCurl(t *testing.T) {
	needBinaries(t, "curl:curl")
	b := policyBox(t, policyYAML, 80)
	client, server := b.Lab.ClientIP4, b.Lab.ServerIP4
	serverAddr := netip.AddrPortFrom(server, 80).String()
	srv := startHTTPServer(t, b, serverAddr)

	get := func(name string, localPort int) curlResult {
		return runCurl(t, b, "--local-port", fmt.Sprint(localPort),
			"--resolve", name+":80:"+server.String(), "http://"+name+"/")
	}
	const denyPort, allowPort = 41011, 41012
	var denied curlResult
	var line lab.LogLine
	syns := serverLinkSYNs(t, b, server, 80, func() {
		denied = get("api.bad.example", denyPort)
		line = waitConnLog(t, b, clientAddr(client, denyPort))
	})
	// 56: "Recv failure: Connection reset by peer".
	if denied.exit != 56 || !strings.Contains(denied.stderr, "reset") {
		t.Errorf("curl to the denied Host: exit %d, stderr %q; want 56, connection reset", denied.exit, denied.stderr)
	}
	checkDenyLine(t, line, "host", "api.bad.example", "*.bad.example", serverAddr)
	if syns != 0 || srv.accepts.Load() != 0 {
		t.Errorf("denied Host: %d upstream SYNs, server accepted %d connections; want none", syns, srv.accepts.Load())
	}

	var allowed curlResult
	syns = serverLinkSYNs(t, b, server, 80, func() {
		allowed = get("good.example", allowPort)
		line = waitConnLog(t, b, clientAddr(client, allowPort))
	})
	if allowed.exit != 0 || allowed.stdout != "host=good.example\n" {
		t.Errorf("curl to the allowed Host: exit %d, body %q\nstderr: %s", allowed.exit, allowed.stdout, allowed.stderr)
	}
	if syns != 1 || srv.accepts.Load() != 1 {
		t.Errorf("allowed Host: %d upstream SYNs, %d accepts; want 1 each", syns, srv.accepts.Load())
	}
	if h := srv.seenHosts(); len(h) != 1 || h[0] != "good.example" {
		t.Errorf("server saw requests for %v, want only good.example", h)
	}
	if line["host"] != "good.example" || line["decision"] != "allow" || line["reason"] != "eof" ||
		line["bytes_down"] != float64(srv.sent.Load()) {
		t.Errorf("allowed connection's log line = %v (server sent %d bytes)", line, srv.sent.Load())
	}
}

// clientHello returns the first TLS record crypto/tls sends for name.
func clientHello(t *testing.T, name string) []byte {
	t.Helper()
	a, z := net.Pipe()
	defer z.Close()
	c := tls.Client(a, &tls.Config{ServerName: name, InsecureSkipVerify: true})
	go func() { c.Handshake(); a.Close() }()
	z.SetReadDeadline(time.Now().Add(5 * time.Second))
	hdr := make([]byte, 5)
	if _, err := io.ReadFull(z, hdr); err != nil {
		t.Fatal(err)
	}
	rec := make([]byte, 5+int(binary.BigEndian.Uint16(hdr[3:])))
	copy(rec, hdr)
	if _, err := io.ReadFull(z, rec[5:]); err != nil {
		t.Fatal(err)
	}
	if rec[0] != 0x16 || rec[5] != 0x01 {
		t.Fatalf("crypto/tls's first record is not a ClientHello: % x", rec[:6])
	}
	return rec
}

// splitHello re-frames a ClientHello record as two handshake records,
// the split falling in the middle of the server name.
func splitHello(t *testing.T, rec []byte, name string) (first, second []byte) {
	t.Helper()
	body := rec[5:]
	i := bytes.Index(body, []byte(name))
	if i < 0 {
		t.Fatalf("ClientHello does not carry %q", name)
	}
	k := i + len(name)/2
	frame := func(p []byte) []byte {
		return append([]byte{0x16, 0x03, 0x01, byte(len(p) >> 8), byte(len(p))}, p...)
	}
	return frame(body[:k]), frame(body[k:])
}

// closeWrite half-closes c. If a reset came first, shutdown fails with
// ENOTCONN and the reset is still pending on the socket: it returns that.
func closeWrite(c *net.TCPConn) error {
	err := c.CloseWrite()
	if err == nil {
		return nil
	}
	if _, rerr := c.Read(make([]byte, 1)); rerr != nil && rerr != io.EOF {
		return rerr
	}
	return err
}

// A ClientHello split over two TLS records, the server name itself cut in
// two, sent as two writes: a denied name is reset (after the second record:
// the first alone names nothing) without an upstream connection; an allowed
// one is relayed byte for byte.
func TestPolicySplitClientHello(t *testing.T) {
	b := policyBox(t, policyYAML, 443)
	waitNoTentative(t, b.Lab.Box)
	for _, f := range families(b) {
		t.Run(f.name, func(t *testing.T) {
			client, server := netip.MustParseAddr(f.client), netip.MustParseAddr(f.server)
			got := make(chan []byte, 4)
			var accepts atomic.Int64
			addr := listenServer(t, b, f.server, "443", func(t *testing.T, ln net.Listener) {
				serveConns(t, ln, func(c *net.TCPConn) {
					accepts.Add(1)
					c.SetDeadline(time.Now().Add(15 * time.Second))
					data, _ := io.ReadAll(c)
					io.WriteString(c, "ok")
					c.CloseWrite()
					got <- data
				})
			})
			// send sends the two records with a pause between them and
			// returns what came back, or the error that ended it.
			send := func(name string) (sent, reply []byte, local net.Addr, err error) {
				r1, r2 := splitHello(t, clientHello(t, name), name)
				c, err := lab.Dial(b.Lab.Client, "tcp", addr, 5*time.Second)
				if err != nil {
					t.Fatal(err)
				}
				defer c.Close()
				local = c.LocalAddr()
				c.SetDeadline(time.Now().Add(15 * time.Second))
				if _, err = c.Write(r1); err != nil {
					return nil, nil, local, err
				}
				time.Sleep(100 * time.Millisecond) // the scenario: a second record that comes later
				if _, err = c.Write(r2); err != nil {
					return nil, nil, local, err
				}
				if err = closeWrite(c); err != nil {
					return nil, nil, local, err
				}
				reply, err = io.ReadAll(c)
				return append(r1, r2...), reply, local, err
			}

			var err error
			var reply []byte
			var local net.Addr
			var line lab.LogLine
			syns := serverLinkSYNs(t, b, server, 443, func() {
				_, reply, local, err = send("split.bad.example")
				line = waitConnLog(t, b, local)
			})
			if !errors.Is(err, syscall.ECONNRESET) {
				t.Errorf("denied split ClientHello: reply %q, err %v; want a connection reset", reply, err)
			}
			checkDenyLine(t, line, "sni", "split.bad.example", "*.bad.example", addr)
			if syns != 0 || accepts.Load() != 0 {
				t.Errorf("denied split ClientHello: %d upstream SYNs, server accepted %d; want none", syns, accepts.Load())
			}
			if host, _, _ := net.SplitHostPort(local.String()); host != client.String() {
				t.Errorf("client address %s, want %s", local, client)
			}

			sent, reply, local, err := send("split.good.example")
			if err != nil || string(reply) != "ok" {
				t.Fatalf("allowed split ClientHello: reply %q, err %v", reply, err)
			}
			select {
			case data := <-got:
				if !bytes.Equal(data, sent) {
					t.Errorf("server received %d bytes, not the %d the client sent (equal prefix: %v)", len(data), len(sent), bytes.HasPrefix(sent, data))
				}
			case <-time.After(10 * time.Second):
				t.Fatal("the server never finished reading the allowed connection")
			}
			line = waitConnLog(t, b, local)
			if line["sni"] != "split.good.example" || line["decision"] != "allow" || line["bytes_up"] != float64(len(sent)) || line["reason"] != "eof" {
				t.Errorf("allowed split ClientHello's log line = %v (sent %d bytes)", line, len(sent))
			}
		})
	}
}
