package inspect

import (
	"bytes"
	"errors"
	"fmt"
	"testing"
)

func TestNameCapturedClientHello(t *testing.T) {
	f := captureClientHello(t, "WWW.Example.COM")
	if len(f) < 1200 {
		t.Fatalf("ClientHello is %d bytes; expected a post-quantum key share to make it ~1.5 KB", len(f))
	}
	check(t, "one record", f, result{TLS, "www.example.com", nil})
	check(t, "with bytes after it", append(bytes.Clone(f), 0x14, 3, 3, 0, 1, 1), result{TLS, "www.example.com", nil})
	check(t, "longer than MaxPeek", append(bytes.Clone(f), make([]byte, MaxPeek)...), result{TLS, "www.example.com", nil})
}

// awkwardCuts are offsets into the captured handshake stream: inside the
// handshake header, inside the server_name extension, next to each other.
func awkwardCuts(t *testing.T, f []byte) [][]int {
	hs := f[recordHeaderLen:]
	at := bytes.Index(hs, []byte("www.example.com"))
	if at < 0 {
		t.Fatal("no server name in the captured ClientHello")
	}
	return [][]int{
		{1}, {2}, {3}, {4}, {at - 5}, {at + 3}, {len(hs) - 1},
		{2, at + 3}, {1, 2}, {3, at - 2}, {at, at + 1}, {40, len(hs) - 1},
	}
}

func TestNameSplitClientHello(t *testing.T) {
	f := captureClientHello(t, "www.example.com")
	hs := f[recordHeaderLen:]
	for cut := 1; cut < len(hs); cut++ {
		check(t, fmt.Sprintf("two records cut at %d", cut), resplit(f, cut), result{TLS, "www.example.com", nil})
	}
	for _, cuts := range awkwardCuts(t, f) {
		check(t, fmt.Sprintf("records cut at %v", cuts), resplit(f, cuts...), result{TLS, "www.example.com", nil})
	}
	// One record per byte: 5x the size, still within MaxPeek.
	var every []int
	for i := 1; i < len(hs); i++ {
		every = append(every, i)
	}
	check(t, "one record per byte", resplit(f, every...), result{TLS, "www.example.com", nil})
}

func TestNameTruncatedClientHello(t *testing.T) {
	f := captureClientHello(t, "www.example.com")
	flights := map[string][]byte{"one record": f}
	for _, cuts := range awkwardCuts(t, f) {
		flights[fmt.Sprintf("cut at %v", cuts)] = resplit(f, cuts...)
	}
	for label, in := range flights {
		for n := 0; n < len(in); n++ {
			kind, name, err := Name(in[:n])
			if !errors.Is(err, ErrNeedMore) || name != "" || (n > 0 && kind != TLS) {
				t.Fatalf("%s, first %d of %d bytes: Name = %v, %q, %v; want tls, \"\", ErrNeedMore", label, n, len(in), kind, name, err)
			}
		}
	}
}

func TestNameTLS(t *testing.T) {
	good := helloBody(sniExt("a.example"))
	twoMsgs := record(22, 0x0301, append(handshake(1, good), handshake(99, []byte("next"))...))
	nameAt := bytes.Index(flight(good), []byte("a.example"))
	tests := []struct {
		label string
		in    []byte
		want  result
	}{
		{"minimal", flight(good), result{TLS, "a.example", nil}},
		{"two messages in a record", twoMsgs, result{TLS, "a.example", nil}},
		{"record version 0x0303", record(22, 0x0303, handshake(1, good)), result{TLS, "a.example", nil}},
		{"record version 0x0304", record(22, 0x0304, handshake(1, good)), result{TLS, "a.example", nil}},
		{"trailing dot, upper case", flight(helloBody(sniExt("A.Example."))), result{TLS, "a.example", nil}},
		{"underscore", flight(helloBody(sniExt("my_host.example"))), result{TLS, "my_host.example", nil}},
		{"no extensions", flight(helloBody()), result{TLS, "", nil}},
		{"no server_name", flight(helloBody(ext(43, []byte{2, 3, 4}))), result{TLS, "", nil}},
		{"other name type skipped", flight(helloBody(ext(0, prefix16([]byte{7, 0, 1, 'x'}, []byte{0, 0, 1, 'y'})))), result{TLS, "y", nil}},
		{"server_name among others", flight(helloBody(ext(10, []byte{0, 2, 0, 29}), sniExt("b.example"), ext(0xfe0d, []byte{1}))), result{TLS, "b.example", nil}},

		{"one byte", []byte{22}, result{TLS, "", ErrNeedMore}},
		{"record header only", flight(good)[:5], result{TLS, "", ErrNeedMore}},
		{"cut in the name", flight(good)[:nameAt+2], result{TLS, "", ErrNeedMore}},
		{"not TLS after 0x16", []byte{22, 1, 0}, result{Unknown, "", nil}},

		{"alert record", record(21, 0x0301, []byte{2, 40}), result{Unknown, "", nil}},
		{"alert after a partial hello", append(record(22, 0x0301, handshake(1, good)[:10]), record(21, 0x0301, []byte{2, 40})...), result{TLS, "", ErrMalformed}},
		{"record version 0x0300", record(22, 0x0300, handshake(1, good)), result{TLS, "", ErrMalformed}},
		{"record version 0x0305", record(22, 0x0305, handshake(1, good)), result{TLS, "", ErrMalformed}},
		{"empty record", append(record(22, 0x0301, nil), flight(good)...), result{TLS, "", ErrMalformed}},
		{"record too long", []byte{22, 3, 1, 0x40, 1}, result{TLS, "", ErrMalformed}},
		{"ServerHello", record(22, 0x0303, handshake(2, good)), result{TLS, "", ErrMalformed}},
		{"handshake type first byte only", record(22, 0x0303, []byte{2}), result{TLS, "", ErrMalformed}},
		{"hello longer than MaxPeek", record(22, 0x0301, []byte{1, 0, 0x40, 0}), result{TLS, "", ErrMalformed}},
		{"hello longer than its record stream at MaxPeek", append(record(22, 0x0301, []byte{1, 0, 0x3f, 0xf0}), make([]byte, MaxPeek)...), result{TLS, "", ErrMalformed}},
		{"empty body", flight(nil), result{TLS, "", ErrMalformed}},
		{"legacy_version 2.0", flight(append([]byte{2, 0}, good[2:]...)), result{TLS, "", ErrMalformed}},
		{"no random", flight(good[:20]), result{TLS, "", ErrMalformed}},
		{"session_id 33", flight(append(append(bytes.Clone(good[:34]), 33), make([]byte, 40)...)), result{TLS, "", ErrMalformed}},
		{"session_id overruns", flight(append(bytes.Clone(good[:34]), 5, 1)), result{TLS, "", ErrMalformed}},
		{"odd cipher_suites", flight(append(bytes.Clone(good[:35]), 0, 3, 1, 2, 3, 1, 0)), result{TLS, "", ErrMalformed}},
		{"no cipher_suites", flight(append(bytes.Clone(good[:35]), 0, 0, 1, 0)), result{TLS, "", ErrMalformed}},
		{"no compression", flight(append(bytes.Clone(good[:35]), 0, 2, 0x13, 1, 0)), result{TLS, "", ErrMalformed}},
		{"extensions overrun", flight(append(helloBody(), 0, 9, 0)), result{TLS, "", ErrMalformed}},
		{"bytes after extensions", flight(append(helloBody(sniExt("a.example")), 0)), result{TLS, "", ErrMalformed}},
		{"truncated extension header", flight(append(helloBody(), 0, 1, 0)), result{TLS, "", ErrMalformed}},
		{"extension overruns", flight(append(helloBody(), 0, 4, 0, 0, 0, 9)), result{TLS, "", ErrMalformed}},
		{"two server_name extensions", flight(helloBody(sniExt("a.example"), sniExt("b.example"))), result{TLS, "", ErrMalformed}},
		{"two host_names", flight(helloBody(sniExt("a.example", "b.example"))), result{TLS, "", ErrMalformed}},
		{"empty server_name_list", flight(helloBody(ext(0, u16(0)))), result{TLS, "", ErrMalformed}},
		{"empty server_name data", flight(helloBody(ext(0, nil))), result{TLS, "", ErrMalformed}},
		{"list shorter than data", flight(helloBody(ext(0, append(prefix16([]byte{0, 0, 1, 'x'}), 0)))), result{TLS, "", ErrMalformed}},
		{"truncated entry", flight(helloBody(ext(0, prefix16([]byte{0, 0})))), result{TLS, "", ErrMalformed}},
		{"empty host_name", flight(helloBody(ext(0, prefix16([]byte{0, 0, 0})))), result{TLS, "", ErrMalformed}},
		{"IPv4 literal", flight(helloBody(sniExt("192.0.2.1"))), result{TLS, "", ErrMalformed}},
		{"IPv6 literal", flight(helloBody(sniExt("2001:db8::1"))), result{TLS, "", ErrMalformed}},
		{"numeric last label", flight(helloBody(sniExt("10.1"))), result{TLS, "", ErrMalformed}},
		{"space in name", flight(helloBody(sniExt("a b.example"))), result{TLS, "", ErrMalformed}},
		{"NUL in name", flight(helloBody(sniExt("a.example\x00.evil"))), result{TLS, "", ErrMalformed}},
		{"empty label", flight(helloBody(sniExt("a..example"))), result{TLS, "", ErrMalformed}},
		{"just a dot", flight(helloBody(sniExt("."))), result{TLS, "", ErrMalformed}},
		{"leading hyphen", flight(helloBody(sniExt("-a.example"))), result{TLS, "", ErrMalformed}},
		{"label of 64", flight(helloBody(sniExt(string(bytes.Repeat([]byte("a"), 64)) + ".example"))), result{TLS, "", ErrMalformed}},
		{"name of 254", flight(helloBody(sniExt(string(bytes.Repeat([]byte("a.b."), 63)) + "ab"))), result{TLS, "", ErrMalformed}},
	}
	for _, tt := range tests {
		check(t, tt.label, tt.in, tt.want)
	}
}

func TestKindString(t *testing.T) {
	for k, want := range map[Kind]string{TLS: "tls", HTTP: "http", Unknown: "unknown", 9: "kind(9)"} {
		if k.String() != want {
			t.Errorf("Kind(%d).String() = %q, want %q", uint8(k), k.String(), want)
		}
	}
}
