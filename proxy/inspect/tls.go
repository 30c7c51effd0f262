package inspect

const (
	recordTypeHandshake    = 22
	recordHeaderLen        = 5
	maxRecordLen           = 1 << 14 // RFC 8446 5.1: a longer plaintext fragment is a record_overflow
	handshakeTypeHello     = 1
	handshakeHeaderLen     = 4
	extensionServerName    = 0
	serverNameTypeHostName = 0
)

// clientHelloName reassembles the ClientHello from the handshake records at
// the start of b and returns its server_name.
func clientHelloName(b []byte) (string, error) {
	// msg is the handshake stream so far. While the message fits in the
	// first record it is a window on b; once it spans records the fragments
	// are copied together, into at most len(b) bytes: what is really there,
	// never what a length claims.
	var msg []byte
	spans := false
	for off := 0; ; {
		if len(b)-off < recordHeaderLen {
			return "", ErrNeedMore
		}
		h := b[off : off+recordHeaderLen]
		if h[0] != recordTypeHandshake {
			// Only handshake records may come before the ClientHello is
			// whole (RFC 8446 5.1: no interleaving with other types).
			return "", malformed("TLS record", "type %d before the ClientHello ended", h[0])
		}
		if h[1] != 3 || h[2] < 1 || h[2] > 4 {
			return "", malformed("TLS record", "version %#02x%02x is not 0x0301-0x0304", h[1], h[2])
		}
		n := int(h[3])<<8 | int(h[4])
		if n == 0 || n > maxRecordLen {
			// RFC 8446 5.1 forbids empty handshake fragments; refusing them
			// also bounds the loop by the bytes in b.
			return "", malformed("TLS record", "length %d is not 1-%d", n, maxRecordLen)
		}
		off += recordHeaderLen
		frag := b[off:min(off+n, len(b))]
		switch {
		case msg == nil:
			msg = frag
		case !spans:
			spans = true
			msg = append(append(make([]byte, 0, len(b)-off+len(msg)), msg...), frag...)
		default:
			msg = append(msg, frag...)
		}
		if len(msg) > 0 && msg[0] != handshakeTypeHello {
			return "", malformed("TLS handshake", "first message has type %d, not ClientHello", msg[0])
		}
		if len(msg) >= handshakeHeaderLen {
			size := int(msg[1])<<16 | int(msg[2])<<8 | int(msg[3])
			if size > MaxPeek-recordHeaderLen-handshakeHeaderLen {
				return "", malformed("TLS handshake", "ClientHello length %d does not fit in %d bytes", size, MaxPeek)
			}
			if len(msg) >= handshakeHeaderLen+size {
				// Anything after the ClientHello (another handshake message
				// in the same record) is none of our business.
				return parseClientHello(msg[handshakeHeaderLen : handshakeHeaderLen+size])
			}
		}
		if off+n > len(b) {
			return "", ErrNeedMore
		}
		off += n
	}
}

// parseClientHello returns the host_name in the server_name extension of a
// ClientHello body (RFC 8446 4.1.2, RFC 6066 3), "" if there is none.
func parseClientHello(body []byte) (string, error) {
	const what = "TLS ClientHello"
	r := reader(body)
	version, ok := r.u16()
	if !ok {
		return "", malformed(what, "too short for legacy_version")
	}
	if version>>8 != 3 {
		return "", malformed(what, "legacy_version %#04x is not TLS", version)
	}
	if _, ok := r.bytes(32); !ok {
		return "", malformed(what, "too short for random")
	}
	sid, ok := r.prefixed8()
	if !ok || len(sid) > 32 {
		return "", malformed(what, "bad legacy_session_id")
	}
	suites, ok := r.prefixed16()
	if !ok || len(suites) < 2 || len(suites)%2 != 0 {
		return "", malformed(what, "bad cipher_suites")
	}
	comp, ok := r.prefixed8()
	if !ok || len(comp) < 1 {
		return "", malformed(what, "bad legacy_compression_methods")
	}
	if r.empty() {
		return "", nil // no extensions at all: an SSL 3.0-era hello
	}
	exts, ok := r.prefixed16()
	if !ok || !r.empty() {
		return "", malformed(what, "extensions length does not match the message")
	}
	name, found := "", false
	for !exts.empty() {
		typ, ok := exts.u16()
		if !ok {
			return "", malformed(what, "truncated extension")
		}
		data, ok := exts.prefixed16()
		if !ok {
			return "", malformed(what, "extension %d overruns the extensions", typ)
		}
		if typ != extensionServerName {
			continue
		}
		if found {
			return "", malformed(what, "two server_name extensions")
		}
		found = true
		var err error
		if name, err = parseServerName(data); err != nil {
			return "", err
		}
	}
	return name, nil
}

// parseServerName returns the host_name in a server_name extension.
func parseServerName(data reader) (string, error) {
	const what = "TLS server_name"
	list, ok := data.prefixed16()
	if !ok || !data.empty() || list.empty() {
		return "", malformed(what, "bad server_name_list length")
	}
	name := ""
	for !list.empty() {
		typ, ok := list.u8()
		if !ok {
			return "", malformed(what, "truncated entry")
		}
		// Every name type defined or foreseen by RFC 6066 has a 2-byte
		// length; crypto/tls skips unknown types the same way.
		v, ok := list.prefixed16()
		if !ok || v.empty() {
			return "", malformed(what, "bad entry length")
		}
		if typ != serverNameTypeHostName {
			continue
		}
		if name != "" {
			return "", malformed(what, "two host_names") // RFC 6066 3
		}
		n, err := hostname(string(v))
		if err != nil {
			return "", malformed(what, "host_name %q: %v", v, err)
		}
		name = n
	}
	return name, nil
}
