// Command ghostwire-lab runs ghostwire's demo in a client–box–server lab of network namespaces.
package main

import (
	"bufio"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/ghostwire/ghostwire/lab"
)

func main() {
	fs := flag.NewFlagSet("ghostwire-lab demo", flag.ExitOnError)
	bin := fs.String("ghostwire", "bin/ghostwire", "ghostwire binary to provision and run the box with")
	if len(os.Args) < 2 || os.Args[1] != "demo" {
		fmt.Fprintln(os.Stderr, "usage: ghostwire-lab demo [-ghostwire bin/ghostwire]")
		os.Exit(2)
	}
	fs.Parse(os.Args[2:])
	if os.Geteuid() != 0 {
		fmt.Fprintln(os.Stderr, "ghostwire-lab: the demo builds network namespaces: run it as root (sudo make demo)")
		os.Exit(1)
	}
	if err := demo(*bin); err != nil {
		fmt.Fprintf(os.Stderr, "\nDEMO FAILED: %v\n", err)
		os.Exit(1)
	}
	fmt.Println("\nDEMO OK: the server saw the client, the client saw the server, the box proxied both.")
}

func step(format string, a ...any) { fmt.Printf("\n==> "+format+"\n", a...) }

func demo(bin string) (err error) {
	abs, err := filepath.Abs(bin)
	if err != nil {
		return err
	}
	l, err := lab.New(lab.UniquePrefix())
	if err != nil {
		return fmt.Errorf("building the lab: %w", err)
	}
	defer l.Close()
	// Ctrl-C must not leave namespaces behind.
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, os.Interrupt, syscall.SIGTERM)
	go func() { <-sigs; l.Close(); os.Exit(130) }()

	dir, err := os.MkdirTemp("", "ghostwire-demo-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	b, err := lab.NewAppliance(l, abs, dir, []int{80}, "")
	if err != nil {
		return err
	}
	step("lab: client %s / %s ── [box: %s + %s] ── server %s / %s (namespaces %s-*)",
		l.ClientIP4, l.ClientIP6, l.ClientNIC, l.ServerNIC, l.ServerIP4, l.ServerIP6, l.Prefix)

	step("ghostwire apply -c %s", b.Config)
	out, err := b.Ghostwire("apply")
	fmt.Print(out)
	if err != nil {
		return err
	}
	defer func() {
		step("teardown")
		if b.Proxy != nil {
			b.StopProxy(syscall.SIGTERM)
		}
		out, terr := b.Ghostwire("teardown")
		fmt.Print(out)
		if err == nil {
			err = terr
		}
	}()

	step("ghostwire run (in the box namespace)")
	if err := b.StartProxy(); err != nil {
		return err
	}
	st, _ := b.Ghostwire("status")
	fmt.Print(st)

	step("server: HTTP on port 80 in the server namespace, answering with the peer address it sees")
	srv, err := startWhoAmI(l)
	if err != nil {
		return err
	}
	defer srv.Close()

	for _, server := range []string{l.ServerIP4.String(), "[" + l.ServerIP6.String() + "]"} {
		want := l.ClientIP4.String()
		if strings.HasPrefix(server, "[") {
			want = l.ClientIP6.String()
		}
		if err := request(b, server, want); err != nil {
			return err
		}
	}
	return nil
}

// request makes one HTTP request from the client namespace and shows what
// each party saw.
func request(b *lab.Appliance, server, wantPeer string) error {
	l := b.Lab
	step("client: GET http://%s/", server)
	c, err := lab.Dial(l.Client, "tcp", server+":80", 5*time.Second)
	if err != nil {
		return fmt.Errorf("client connect to %s: %w", server, err)
	}
	defer c.Close()
	req := fmt.Sprintf("GET / HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n", server)
	fmt.Printf("client sent:     %q\n", req)
	fmt.Printf("client socket:   %s -> %s (the client talks to the server's address)\n", c.LocalAddr(), c.RemoteAddr())
	if _, err := io.WriteString(c, req); err != nil {
		return err
	}
	c.SetDeadline(time.Now().Add(10 * time.Second))
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		return fmt.Errorf("reading response from %s: %w", server, err)
	}
	body, _ := io.ReadAll(resp.Body)
	fmt.Printf("client received: %s %q\n", resp.Status, body)
	peer := strings.TrimSpace(strings.TrimPrefix(string(body), "you are "))
	host, _, _ := net.SplitHostPort(peer)
	fmt.Printf("server saw peer: %s (client is %s)\n", peer, wantPeer)
	if host != wantPeer {
		return fmt.Errorf("server saw %s, not the client's address %s", peer, wantPeer)
	}
	c.Close()
	var line lab.LogLine
	err = lab.WaitFor(5*time.Second, func() (bool, error) {
		ls := b.ConnLogFor(c.LocalAddr())
		if len(ls) > 0 {
			line = ls[0]
		}
		return len(ls) > 0, nil
	})
	if err != nil {
		return fmt.Errorf("no proxy log line for %s: %w\nproxy stderr:\n%s", c.LocalAddr(), err, b.Proxy.Stderr())
	}
	dur, _ := line["duration"].(float64) // slog's JSON writes durations in nanoseconds
	fmt.Printf("proxy log:       client=%v server=%v bytes_up=%v bytes_down=%v duration=%v reason=%v\n",
		line["client"], line["server"], line["bytes_up"], line["bytes_down"], time.Duration(dur).Round(time.Microsecond), line["reason"])
	return nil
}

type whoAmI struct{ lns []net.Listener }

func startWhoAmI(l *lab.Lab) (*whoAmI, error) {
	w := &whoAmI{}
	h := http.HandlerFunc(func(rw http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(rw, "you are %s\n", r.RemoteAddr)
	})
	for _, addr := range []string{l.ServerIP4.String() + ":80", "[" + l.ServerIP6.String() + "]:80"} {
		ln, err := lab.Listen(l.Server, "tcp", addr)
		if err != nil {
			w.Close()
			return nil, fmt.Errorf("server listen %s: %w", addr, err)
		}
		w.lns = append(w.lns, ln)
		go http.Serve(ln, h)
	}
	return w, nil
}

func (w *whoAmI) Close() {
	for _, ln := range w.lns {
		ln.Close()
	}
}
