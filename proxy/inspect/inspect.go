// Package inspect finds the server name in a connection's first bytes: TLS SNI or HTTP/1.x Host.
//
// The proxy peeks (MSG_PEEK, nothing consumed) at what a client sends before
// the proxy dials, and calls Name on everything seen so far; ErrNeedMore
// asks it to peek again once more bytes have arrived. Name never trusts a
// length it reads: each is checked against the bytes actually present, and
// nothing is allocated in proportion to a claimed length.
//
// A name is only what the client claims. With Encrypted ClientHello the
// name Name returns is the outer, public one (the client-facing server's);
// the real name is encrypted and cannot be seen here. And nothing stops a
// client from sending one name and then talking to another service at the
// same address: a policy built on names filters honest clients and
// careless software, not a determined one.
package inspect

import (
	"errors"
	"fmt"
)

// MaxPeek is the most bytes of a connection Name looks at. 16 KiB holds a
// post-quantum ClientHello (an X25519MLKEM768 key share alone is 1,216
// bytes) even split over several records, and the header block of any
// ordinary HTTP request.
const MaxPeek = 16 << 10

// Kind is the protocol a connection's first bytes speak.
type Kind uint8

const (
	Unknown Kind = iota // neither TLS nor HTTP/1.x (or not yet known)
	TLS
	HTTP
)

func (k Kind) String() string {
	switch k {
	case TLS:
		return "tls"
	case HTTP:
		return "http"
	case Unknown:
		return "unknown"
	}
	return fmt.Sprintf("kind(%d)", uint8(k))
}

var (
	// ErrNeedMore means the bytes so far are the start of something that
	// may still carry a name: peek again when more have arrived.
	ErrNeedMore = errors.New("need more bytes")
	// ErrMalformed is wrapped by every error for input that claims to be
	// TLS or HTTP but breaks the protocol. Callers treat it as "no name".
	ErrMalformed = errors.New("malformed")
)

// Name returns the protocol of b, the first bytes a client sent, and the
// server name it carries: a TLS ClientHello's server_name or an HTTP/1.x
// request's Host (or its target's host when there is no Host header).
// Names come back lowercased, without a trailing dot or a port; an IPv6
// Host comes back bare ("::1"). Only b[:MaxPeek] is looked at.
//
// The results are:
//   - ErrNeedMore: b is a prefix of something that may still carry a name;
//   - name "" and err nil: recognised but nameless (a ClientHello without
//     server_name, an HTTP/1.0 request without Host, the HTTP/2 preface),
//     or neither TLS nor HTTP (kind Unknown);
//   - an error wrapping ErrMalformed: broken TLS or HTTP, including a name
//     that is not a valid host name and a message that does not end within
//     MaxPeek bytes.
func Name(b []byte) (kind Kind, name string, err error) {
	full := len(b) >= MaxPeek
	if full {
		b = b[:MaxPeek]
	}
	if len(b) == 0 {
		return Unknown, "", ErrNeedMore
	}
	switch {
	case b[0] == recordTypeHandshake && (len(b) < 2 || b[1] == 3):
		// 0x16 0x03 is a TLS handshake record header (major version 3).
		kind = TLS
		name, err = clientHelloName(b)
	case isUpper(b[0]):
		// A request method is a token; in practice, uppercase letters.
		kind, name, err = requestName(b)
	default:
		return Unknown, "", nil
	}
	if full && err == ErrNeedMore {
		// The caller cannot peek further than MaxPeek: make it an answer.
		return kind, "", fmt.Errorf("reading %s: nothing conclusive in the first %d bytes: %w", kind, MaxPeek, ErrMalformed)
	}
	return kind, name, err
}

// malformed builds the error for broken input: what was being read, why.
func malformed(what, format string, args ...any) error {
	return fmt.Errorf("reading %s: %s: %w", what, fmt.Sprintf(format, args...), ErrMalformed)
}
