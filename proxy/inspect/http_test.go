package inspect

import (
	"errors"
	"strings"
	"testing"
)

func TestNameHTTP(t *testing.T) {
	long := strings.Repeat("a", MaxPeek)
	tests := []struct {
		in   string
		want result
	}{
		{"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n", result{HTTP, "example.com", nil}},
		{"GET / HTTP/1.1\r\nHost: Example.COM.:8080\r\nAccept: */*\r\n\r\nbody", result{HTTP, "example.com", nil}},
		{"POST /x HTTP/1.1\r\nhOsT:example.com \r\n\r\n", result{HTTP, "example.com", nil}},
		{"PUT /x HTTP/1.1\r\nHost:\t example.com\t\r\n\r\n", result{HTTP, "example.com", nil}},
		{"GET / HTTP/1.1\nHost: example.com\n\n", result{HTTP, "example.com", nil}},
		{"GET / HTTP/1.1\r\nHost: example.com\n\r\n", result{HTTP, "example.com", nil}},
		{"GET / HTTP/1.1\r\nHost: [::1]:8080\r\n\r\n", result{HTTP, "::1", nil}},
		{"GET / HTTP/1.1\r\nHost: [2001:DB8::1]\r\n\r\n", result{HTTP, "2001:db8::1", nil}},
		{"GET / HTTP/1.1\r\nHost: 192.0.2.1:80\r\n\r\n", result{HTTP, "192.0.2.1", nil}},
		{"GET / HTTP/1.1\r\nHost: example.com:\r\n\r\n", result{HTTP, "example.com", nil}},
		{"HEAD / HTTP/1.0\r\nX-Host: other\r\nHost: example.com\r\n\r\n", result{HTTP, "example.com", nil}},
		{"M-SEARCH * HTTP/1.1\r\nHost: example.com\r\n\r\n", result{HTTP, "example.com", nil}},
		{"CONNECT example.com:443 HTTP/1.1\r\n\r\n", result{HTTP, "example.com", nil}},
		{"CONNECT [::1]:443 HTTP/1.1\r\n\r\n", result{HTTP, "::1", nil}},
		{"CONNECT example.com:443 HTTP/1.1\r\nHost: EXAMPLE.com:443\r\n\r\n", result{HTTP, "example.com", nil}},
		{"GET http://Example.com/x HTTP/1.1\r\n\r\n", result{HTTP, "example.com", nil}},
		{"GET HTTPS://example.com:8443?q HTTP/1.1\r\n\r\n", result{HTTP, "example.com", nil}},
		{"GET http://example.com/ HTTP/1.1\r\nHost:\r\n\r\n", result{HTTP, "example.com", nil}},
		{"GET http://example.com/ HTTP/1.1\r\nHost: example.com\r\n\r\n", result{HTTP, "example.com", nil}},
		{"OPTIONS * HTTP/1.1\r\nHost: example.com\r\n\r\n", result{HTTP, "example.com", nil}},

		{"GET / HTTP/1.0\r\n\r\n", result{HTTP, "", nil}},
		{"GET / HTTP/1.1\r\nHost:\r\n\r\n", result{HTTP, "", nil}},
		{"GET ftp://example.com/ HTTP/1.1\r\n\r\n", result{HTTP, "", nil}},
		{"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", result{HTTP, "", nil}},

		{"", result{Unknown, "", ErrNeedMore}},
		{"G", result{HTTP, "", ErrNeedMore}},
		{"GET /index.html", result{HTTP, "", ErrNeedMore}},
		{"GET / HTTP/1.", result{HTTP, "", ErrNeedMore}},
		{"GET / HTTP/1.1\r", result{HTTP, "", ErrNeedMore}},
		{"GET / HTTP/1.1\r\nHost: example.com\r\n", result{HTTP, "", ErrNeedMore}},
		{"GET / HTTP/1.1\r\nHost: example.com\r\n\r", result{HTTP, "", ErrNeedMore}},

		{"SSH-2.0-OpenSSH_9.6\r\n", result{Unknown, "", nil}},
		{"HELO mail.example.com\r\n", result{Unknown, "", nil}},
		{"get / HTTP/1.1\r\n\r\n", result{Unknown, "", nil}},
		{"GET  / HTTP/1.1\r\n\r\n", result{Unknown, "", nil}},
		{"GET / HTTX/1.1\r\n\r\n", result{Unknown, "", nil}},
		{"GET /\r\n", result{Unknown, "", nil}},
		{"GET /\x80 HTTP/1.1\r\n\r\n", result{Unknown, "", nil}},
		{strings.Repeat("A", maxMethod+1), result{Unknown, "", nil}},
		{"\x00\x01", result{Unknown, "", nil}},
		{"\x80\x2e\x01\x03\x01", result{Unknown, "", nil}}, // SSLv2-style hello

		{"GET / HTTP/x.1\r\n\r\n", result{HTTP, "", ErrMalformed}},
		{"GET / HTTP/1.1 \r\n\r\n", result{HTTP, "", ErrMalformed}},
		{"GET / HTTP/1.1\rX\r\n\r\n", result{HTTP, "", ErrMalformed}},
		{"GET / HTTP/2.0\r\n\r\n", result{HTTP, "", ErrMalformed}},
		{"GET / HTTP/3.0\r\nHost: example.com\r\n\r\n", result{HTTP, "", ErrMalformed}},
		{"GET / HTTP/1.1\r\nHost: a.example\r\nHost: b.example\r\n\r\n", result{HTTP, "", ErrMalformed}},
		{"GET / HTTP/1.1\r\nHost: a.example\r\nhost: a.example\r\n\r\n", result{HTTP, "", ErrMalformed}},
		{"GET / HTTP/1.1\r\nHost : example.com\r\n\r\n", result{HTTP, "", ErrMalformed}},
		{"GET / HTTP/1.1\r\nX: y\r\n folded\r\n\r\n", result{HTTP, "", ErrMalformed}},
		{"GET / HTTP/1.1\r\nno colon\r\n\r\n", result{HTTP, "", ErrMalformed}},
		{"GET / HTTP/1.1\r\n: empty name\r\n\r\n", result{HTTP, "", ErrMalformed}},
		{"GET / HTTP/1.1\r\nX: a\rb\r\n\r\n", result{HTTP, "", ErrMalformed}},
		{"GET / HTTP/1.1\r\nX: a\x00\r\n\r\n", result{HTTP, "", ErrMalformed}},
		{"GET / HTTP/1.1\r\nHost: exa mple.com\r\n\r\n", result{HTTP, "", ErrMalformed}},
		{"GET / HTTP/1.1\r\nHost: example.com:http\r\n\r\n", result{HTTP, "", ErrMalformed}},
		{"GET / HTTP/1.1\r\nHost: ::1\r\n\r\n", result{HTTP, "", ErrMalformed}},
		{"GET / HTTP/1.1\r\nHost: [::1\r\n\r\n", result{HTTP, "", ErrMalformed}},
		{"GET / HTTP/1.1\r\nHost: [::1]x\r\n\r\n", result{HTTP, "", ErrMalformed}},
		{"GET / HTTP/1.1\r\nHost: [192.0.2.1]\r\n\r\n", result{HTTP, "", ErrMalformed}},
		{"GET / HTTP/1.1\r\nHost: [fe80::1%eth0]\r\n\r\n", result{HTTP, "", ErrMalformed}},
		{"GET / HTTP/1.1\r\nHost: a@example.com\r\n\r\n", result{HTTP, "", ErrMalformed}},
		{"GET http://a.example/ HTTP/1.1\r\nHost: b.example\r\n\r\n", result{HTTP, "", ErrMalformed}},
		{"GET http://user@a.example/ HTTP/1.1\r\n\r\n", result{HTTP, "", ErrMalformed}},
		{"GET http:///x HTTP/1.1\r\n\r\n", result{HTTP, "", ErrMalformed}},
		{"CONNECT a.example:443 HTTP/1.1\r\nHost: b.example\r\n\r\n", result{HTTP, "", ErrMalformed}},
		{"CONNECT /x HTTP/1.1\r\n\r\n", result{HTTP, "", ErrMalformed}},
		{"GET /" + long, result{HTTP, "", ErrMalformed}},
		{"GET / HTTP/1.1\r\nX: " + long, result{HTTP, "", ErrMalformed}},
	}
	for _, tt := range tests {
		label := tt.in
		if len(label) > 60 {
			label = label[:60] + "..."
		}
		check(t, label, []byte(tt.in), tt.want)
	}
}

// TestNameHTTPInPieces feeds requests one byte more at a time, as a peek
// loop would see them: every prefix must ask for more.
func TestNameHTTPInPieces(t *testing.T) {
	for _, req := range []string{
		"GET /index.html HTTP/1.1\r\nUser-Agent: x\r\nHost: www.example.com:80\r\nAccept: */*\r\n\r\n",
		"GET / HTTP/1.1\nHost: www.example.com\n\n",
		"CONNECT www.example.com:443 HTTP/1.1\r\nProxy-Authorization: x\r\n\r\n",
		"GET http://www.example.com/a?b HTTP/1.1\r\n\r\n",
	} {
		for n := 0; n < len(req); n++ {
			kind, name, err := Name([]byte(req[:n]))
			if !errors.Is(err, ErrNeedMore) || name != "" || (n > 0 && kind != HTTP) {
				t.Fatalf("%q: Name = %v, %q, %v; want http, \"\", ErrNeedMore", req[:n], kind, name, err)
			}
		}
		check(t, req, []byte(req), result{HTTP, "www.example.com", nil})
	}
}
