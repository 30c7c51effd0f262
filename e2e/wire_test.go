package e2e

import (
	"io"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/ghostwire/ghostwire/lab"
)

// What crosses the two links during a proxied exchange: on the server-side
// link the flow carries the client's IP, and no packet of it on either link
// carries the box's management address.
func TestWireCheck(t *testing.T) {
	b := proxiedBox(t, 80)
	waitNoTentative(t, b.Lab.Box)
	for _, f := range families(b) {
		t.Run(f.name, func(t *testing.T) {
			client, server, box := netip.MustParseAddr(f.client), netip.MustParseAddr(f.server), netip.MustParseAddr(f.box)
			addr := listenServer(t, b, f.server, "80", echoServer)
			capClient, err := b.Lab.Client.Capture(b.Lab.ClientIf)
			if err != nil {
				t.Fatal(err)
			}
			capServer, err := b.Lab.Server.Capture(b.Lab.ServerIf)
			if err != nil {
				capClient.Stop()
				t.Fatal(err)
			}
			c, err := lab.Dial(b.Lab.Client, "tcp", addr, 5*time.Second)
			if err != nil {
				t.Fatal(err)
			}
			io.WriteString(c, "over the wire")
			c.CloseWrite()
			c.SetReadDeadline(time.Now().Add(5 * time.Second))
			if got, err := io.ReadAll(c); err != nil || string(got) != "over the wire" {
				t.Fatalf("echo = %q, %v", got, err)
			}
			c.Close()
			line := waitConnLog(t, b, c.LocalAddr()) // it was proxied, not bridged
			onClient, err := capClient.Stop()
			if err != nil {
				t.Fatal(err)
			}
			onServer, err := capServer.Stop()
			if err != nil {
				t.Fatal(err)
			}

			clientPort := uint16(c.LocalAddr().(*net.TCPAddr).Port)
			flowFrames := func(frames []lab.Frame) (toServer, fromServer []lab.Frame) {
				for _, fr := range frames {
					if fr.Proto != lab.ProtoTCP {
						continue
					}
					if fr.DstPort == 80 {
						toServer = append(toServer, fr)
					} else if fr.SrcPort == 80 {
						fromServer = append(fromServer, fr)
					}
				}
				return
			}
			cTo, cFrom := flowFrames(onClient)
			sTo, sFrom := flowFrames(onServer)
			if len(cTo) == 0 || len(cFrom) == 0 || len(sTo) == 0 || len(sFrom) == 0 {
				t.Fatalf("captured too little: client link %d/%d, server link %d/%d frames", len(cTo), len(cFrom), len(sTo), len(sFrom))
			}
			upstreamPorts := map[uint16]bool{}
			for _, fr := range sTo {
				if fr.Src != client || fr.Dst != server {
					t.Errorf("server-side link: %v, want %s -> %s", fr, client, server)
				}
				upstreamPorts[fr.SrcPort] = true
			}
			for _, fr := range sFrom {
				if fr.Src != server || fr.Dst != client {
					t.Errorf("server-side link: %v, want %s -> %s", fr, server, client)
				}
			}
			// The proxy connects onward from the client's own port (it
			// was proxied: the proxy logged it above).
			if !upstreamPorts[clientPort] || len(upstreamPorts) != 1 {
				t.Errorf("server-side flow used source ports %v; client port was %d (proxy log %v)", upstreamPorts, clientPort, line)
			}
			for _, fr := range append(cTo, cFrom...) {
				if fr.Src != client && fr.Src != server || fr.Dst != client && fr.Dst != server {
					t.Errorf("client-side link: %v is not between client and server", fr)
				}
			}
			for link, frames := range map[string][]lab.Frame{"client": append(cTo, cFrom...), "server": append(sTo, sFrom...)} {
				for _, fr := range frames {
					if fr.Src == box || fr.Dst == box {
						t.Errorf("%s-side link: proxied flow carries the box's address: %v", link, fr)
					}
				}
			}
		})
	}
}
