package proxy

import (
	"crypto/tls"
	"io"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/ghostwire/ghostwire/proxy/inspect"
)

// clientHello is what a Go TLS client sends first, naming sni.
func clientHello(t *testing.T, sni string) []byte {
	t.Helper()
	c, s := net.Pipe()
	go tls.Client(c, &tls.Config{ServerName: sni, InsecureSkipVerify: true}).Handshake()
	buf := make([]byte, inspect.MaxPeek)
	n, err := s.Read(buf)
	if err != nil {
		t.Fatal(err)
	}
	c.Close()
	s.Close()
	return buf[:n]
}

func policyOf(t *testing.T, deny []string, defaultAllow bool) *inspect.Policy {
	t.Helper()
	l, err := inspect.NewList(deny)
	if err != nil {
		t.Fatal(err)
	}
	return &inspect.Policy{SNIDeny: l, HostDeny: l, DefaultAllow: defaultAllow}
}

func echo(c *net.TCPConn) { io.Copy(c, c); c.CloseWrite() }

func TestPolicyByName(t *testing.T) {
	t.Run("denied SNI: reset, nothing dialed", func(t *testing.T) {
		checkGoroutines(t)
		h := startProxy(t, echo, func(c *Config) { c.Policy = policyOf(t, []string{"*.bad.example"}, true) })
		c := h.dial()
		hello := clientHello(t, "www.bad.example")
		// Split over two writes: the name is only whole after the second.
		c.Write(hello[:len(hello)/2])
		c.Write(hello[len(hello)/2:])
		_, err := c.Read(make([]byte, 1))
		wantReset(t, err)
		r := h.logs.closed(t, 1)[0]
		for k, want := range map[string]string{"reason": "policy: sni deny *.bad.example", "sni": "www.bad.example", "decision": "deny"} {
			if got := field(r, k); got != want {
				t.Errorf("log %s = %q, want %q", k, got, want)
			}
		}
		if n := h.dials.Load(); n != 0 {
			t.Errorf("%d upstream dials for a denied name", n)
		}
		if st := h.p.Stats(); st.PolicyDenied != 1 || st.Closed["policy denied"] != 1 {
			t.Errorf("stats: denied %d, closed %v", st.PolicyDenied, st.Closed)
		}
	})
	t.Run("allowed Host: relayed with the peeked bytes", func(t *testing.T) {
		checkGoroutines(t)
		h := startProxy(t, echo, func(c *Config) { c.Policy = policyOf(t, []string{"*.bad.example"}, true) })
		c := h.dial()
		req := "GET / HTTP/1.1\r\nHost: www.good.example:8080\r\n\r\n"
		c.Write([]byte(req))
		c.CloseWrite()
		got, err := io.ReadAll(c)
		if err != nil || string(got) != req {
			t.Fatalf("echo = %q, %v; want the request back whole", got, err)
		}
		r := h.logs.closed(t, 1)[0]
		if field(r, "host") != "www.good.example" || field(r, "decision") != "allow" || field(r, "reason") != "eof" {
			t.Errorf("log record = %v", r)
		}
	})
	t.Run("nothing sent: the default decides after the timeout", func(t *testing.T) {
		checkGoroutines(t)
		h := startProxy(t, echo, func(c *Config) {
			c.Policy = policyOf(t, nil, false)
			c.InspectTimeout = 150 * time.Millisecond
		})
		c := h.dial()
		start := time.Now()
		_, err := c.Read(make([]byte, 1))
		wantReset(t, err)
		if el := time.Since(start); el < 150*time.Millisecond {
			t.Errorf("decided after %v, before the inspect timeout", el)
		}
		if r := h.logs.closed(t, 1)[0]; !strings.HasPrefix(field(r, "reason"), "policy: nothing to go by within 150ms") {
			t.Errorf("reason = %q", field(r, "reason"))
		}
	})
	t.Run("no policy: nothing inspected, the name still logged", func(t *testing.T) {
		checkGoroutines(t)
		h := startProxy(t, echo, nil)
		c := h.dial()
		c.Write([]byte("GET / HTTP/1.1\r\nHost: named.example\r\n\r\n"))
		c.CloseWrite()
		io.ReadAll(c)
		r := h.logs.closed(t, 1)[0]
		if r["decision"] != nil || r["policy"] != nil {
			t.Errorf("log has policy fields without a policy: %v", r)
		}
		if field(r, "host") != "named.example" {
			t.Errorf("log names host %q, want named.example from the first read", field(r, "host"))
		}
	})
}
