package inspect

import (
	"crypto/tls"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"testing"
	"time"
)

// captureClientHello returns the first flight crypto/tls writes as a
// client for serverName: one TLS record holding the ClientHello.
func captureClientHello(t testing.TB, serverName string) []byte {
	t.Helper()
	client, server := net.Pipe()
	defer server.Close()
	done := make(chan error, 1)
	go func() {
		c := tls.Client(client, &tls.Config{ServerName: serverName})
		done <- c.Handshake() // fails once server is closed below
		client.Close()
	}()
	server.SetDeadline(time.Now().Add(10 * time.Second))
	hdr := make([]byte, recordHeaderLen)
	if _, err := io.ReadFull(server, hdr); err != nil {
		t.Fatalf("reading the ClientHello record header: %v", err)
	}
	body := make([]byte, binary.BigEndian.Uint16(hdr[3:]))
	if _, err := io.ReadFull(server, body); err != nil {
		t.Fatalf("reading the ClientHello record: %v", err)
	}
	server.Close()
	<-done
	return append(hdr, body...)
}

// resplit puts the handshake bytes of a one-record flight into several
// records, cut at the given offsets into the handshake stream.
func resplit(flight []byte, cuts ...int) []byte {
	hs := flight[recordHeaderLen:]
	var out []byte
	prev := 0
	for _, c := range append(cuts, len(hs)) {
		out = append(out, record(recordTypeHandshake, 0x0301, hs[prev:c])...)
		prev = c
	}
	return out
}

func record(typ byte, version uint16, frag []byte) []byte {
	out := []byte{typ, byte(version >> 8), byte(version), 0, 0}
	binary.BigEndian.PutUint16(out[3:], uint16(len(frag)))
	return append(out, frag...)
}

func handshake(typ byte, body []byte) []byte {
	n := len(body)
	return append([]byte{typ, byte(n >> 16), byte(n >> 8), byte(n)}, body...)
}

func u16(n int) []byte { return []byte{byte(n >> 8), byte(n)} }

func prefix16(b ...[]byte) []byte {
	var all []byte
	for _, x := range b {
		all = append(all, x...)
	}
	return append(u16(len(all)), all...)
}

func ext(typ int, data []byte) []byte { return append(u16(typ), prefix16(data)...) }

// sniExt is a server_name extension with one host_name entry per name.
func sniExt(names ...string) []byte {
	var entries [][]byte
	for _, n := range names {
		entries = append(entries, append([]byte{0}, prefix16([]byte(n))...))
	}
	return ext(extensionServerName, prefix16(entries...))
}

// helloBody is a minimal ClientHello body (TLS 1.2 layout) with exts; no
// extensions block at all when exts is nil.
func helloBody(exts ...[]byte) []byte {
	b := []byte{3, 3}
	b = append(b, make([]byte, 32)...) // random
	b = append(b, 0)                   // session_id
	b = append(b, 0, 2, 0x13, 0x01)    // cipher_suites
	b = append(b, 1, 0)                // compression_methods
	if exts != nil {
		b = append(b, prefix16(exts...)...)
	}
	return b
}

// flight wraps a ClientHello body in a handshake header and one record.
func flight(body []byte) []byte {
	return record(recordTypeHandshake, 0x0301, handshake(handshakeTypeHello, body))
}

type result struct {
	kind Kind
	name string
	err  error // nil, ErrNeedMore or ErrMalformed
}

func check(t *testing.T, label string, in []byte, want result) {
	t.Helper()
	kind, name, err := Name(in)
	if kind != want.kind || name != want.name || !errors.Is(err, want.err) || (want.err == nil) != (err == nil) {
		t.Errorf("%s: Name = %v, %q, %v; want %v, %q, %v", label, kind, name, err, want.kind, want.name, want.err)
	}
}
