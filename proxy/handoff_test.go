package proxy

import (
	"bytes"
	"fmt"
	"io"
	"net"
	"os"
	"strconv"
	"testing"
	"time"
)

func needOffload(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("kernel offload needs root (CAP_BPF and CAP_NET_ADMIN)")
	}
}

// echo returns each byte it reads, and half-closes after the client's FIN.
func echo(c *net.TCPConn) {
	io.Copy(c, c)
	c.CloseWrite()
}

// pingPong does n round trips of a 100-byte message on c.
func pingPong(t *testing.T, c *net.TCPConn, n int) {
	t.Helper()
	msg := bytes.Repeat([]byte("m"), 100)
	got := make([]byte, len(msg))
	for i := range n {
		if _, err := c.Write(msg); err != nil {
			t.Fatalf("round trip %d: %v", i, err)
		}
		if _, err := io.ReadFull(c, got); err != nil {
			t.Fatalf("round trip %d: %v", i, err)
		}
	}
}

// echoBulk streams size bytes through an echo and checks they come back.
func echoBulk(t *testing.T, c *net.TCPConn, size int) {
	t.Helper()
	sent := make(chan [32]byte, 1)
	go func() {
		sum, err := writeStream(c, 7, size)
		if err != nil {
			t.Errorf("writing: %v", err)
		}
		c.CloseWrite()
		sent <- sum
	}()
	got, n, err := readSum(c)
	if err != nil || n != int64(size) {
		t.Fatalf("read %d bytes (%v), want %d then EOF", n, err, size)
	}
	if got != <-sent {
		t.Fatal("the echo came back different")
	}
}

// TestChattyConnectionIsHandedOff: after OffloadAfter small messages the
// kernel carries the connection, and what follows (here 8 MiB each way)
// arrives whole, with the counts the relay would log.
func TestChattyConnectionIsHandedOff(t *testing.T) {
	needOffload(t)
	checkGoroutines(t)
	h := startProxy(t, echo, func(c *Config) { c.Offload = true })
	c := h.dial()
	pingPong(t, c, 10)
	waitFor(t, "the connection offloaded", func() bool { return h.p.Stats().Offloaded == 1 })
	pingPong(t, c, 10)
	const size = 8 << 20
	echoBulk(t, c, size)
	r := h.logs.closed(t, 1)[0]
	want := strconv.Itoa(20*100 + size)
	if field(r, "reason") != "eof" || r["offloaded"] != true || field(r, "bytes_up") != want || field(r, "bytes_down") != want {
		t.Errorf("log record = %v, want eof, offloaded, %s bytes each way", r, want)
	}
	if st := h.p.Stats(); st.BytesUp != uint64(20*100+size) || st.Offloaded != 0 {
		t.Errorf("stats = %+v", st)
	}
}

// TestBulkConnectionStaysOnSplice: a connection that opened with bulk is
// never handed off, however chatty it gets later.
func TestBulkConnectionStaysOnSplice(t *testing.T) {
	needOffload(t)
	checkGoroutines(t)
	h := startProxy(t, echo, func(c *Config) { c.Offload = true })
	c := h.dial()
	go c.Write(make([]byte, 1<<20))
	if _, err := io.ReadFull(c, make([]byte, 1<<20)); err != nil {
		t.Fatal(err)
	}
	pingPong(t, c, 20)
	c.CloseWrite()
	io.Copy(io.Discard, c)
	r := h.logs.closed(t, 1)[0]
	if field(r, "reason") != "eof" || r["offloaded"] != false {
		t.Errorf("log record = %v, want eof, not offloaded", r)
	}
}

// TestHandoffTakesParkedDirection: the server is silent long enough for its
// direction to park; the client's messages then trigger the handoff, which
// must take the parked direction back from the sleeper.
func TestHandoffTakesParkedDirection(t *testing.T) {
	needOffload(t)
	checkGoroutines(t)
	const park = 20 * time.Millisecond
	got := make(chan string, 1)
	h := startProxy(t, func(c *net.TCPConn) {
		b, _ := io.ReadAll(c) // silent until the client's FIN
		got <- string(b)
		c.Write([]byte("bye"))
	}, func(c *Config) { c.Offload = true; c.ParkAfter = park })
	c := h.dial()
	var want bytes.Buffer
	for i := range 10 {
		if i == 1 {
			waitFor(t, "the server's direction parked", func() bool { return h.p.Stats().Parked >= 1 })
		}
		msg := fmt.Sprintf("message %d;", i)
		want.WriteString(msg)
		if _, err := c.Write([]byte(msg)); err != nil {
			t.Fatal(err)
		}
		// One read per message: wait until the relay has carried it.
		waitFor(t, "message relayed", func() bool {
			st := h.p.Stats()
			return st.BytesUp == uint64(want.Len()) || st.Offloaded == 1 // the kernel does not count as it goes
		})
	}
	waitFor(t, "the connection offloaded", func() bool { return h.p.Stats().Offloaded == 1 })
	c.CloseWrite()
	if s := <-got; s != want.String() {
		t.Errorf("server got %q, want %q", s, want.String())
	}
	if b, err := io.ReadAll(c); err != nil || string(b) != "bye" {
		t.Errorf("client got %q (%v), want bye", b, err)
	}
	if r := h.logs.closed(t, 1)[0]; r["offloaded"] != true || field(r, "reason") != "eof" {
		t.Errorf("log record = %v", r)
	}
}
