package inspect

import (
	"bytes"
	"errors"
	"strings"
)

// maxMethod bounds the method token. The longest registered method
// (UPDATEREDIRECTREF) has 17 letters; an uppercase run much longer than
// that is some other protocol.
const maxMethod = 24

// requestName reads an HTTP/1.x request head (RFC 9112 3, 5) and returns
// its Host. Until "HTTP/" is seen in the request line, anything out of
// shape means "not HTTP" (Unknown, no error); after it, it means a broken
// request. A line is judged only once its LF has arrived, so a prefix of a
// good request never looks broken.
func requestName(b []byte) (Kind, string, error) {
	i := 0
	for i < len(b) && (isUpper(b[i]) || i > 0 && (b[i] == '-' || b[i] == '_')) {
		i++
	}
	if i > maxMethod {
		return Unknown, "", nil
	}
	if i == len(b) {
		return HTTP, "", ErrNeedMore
	}
	if b[i] != ' ' {
		return Unknown, "", nil
	}
	method := string(b[:i])
	i++
	start := i
	for i < len(b) && b[i] > ' ' && b[i] < 0x7f {
		i++
	}
	if i == len(b) {
		return HTTP, "", ErrNeedMore
	}
	if i == start || b[i] != ' ' {
		return Unknown, "", nil
	}
	target := string(b[start:i])
	i++
	for _, c := range []byte("HTTP/") {
		if i == len(b) {
			return HTTP, "", ErrNeedMore
		}
		if b[i] != c {
			return Unknown, "", nil
		}
		i++
	}

	const line = "HTTP request line"
	if len(b)-i < 3 {
		return HTTP, "", ErrNeedMore
	}
	major, dot, minor := b[i], b[i+1], b[i+2]
	if !isDigit(major) || dot != '.' || !isDigit(minor) {
		return HTTP, "", malformed(line, "version %q is not DIGIT.DIGIT", b[i:i+3])
	}
	i += 3
	switch {
	case i == len(b) || b[i] == '\r' && i+1 == len(b):
		return HTTP, "", ErrNeedMore
	case b[i] == '\n':
		i++
	case b[i] == '\r' && b[i+1] == '\n':
		i += 2
	default:
		return HTTP, "", malformed(line, "%q after the version", b[i])
	}
	if major == '2' && minor == '0' && method == "PRI" && target == "*" {
		return HTTP, "", nil // the HTTP/2 prior-knowledge preface: no Host here
	}
	if major != '1' {
		return HTTP, "", malformed(line, "version HTTP/%c.%c is not 1.x", major, minor)
	}

	host, found, err := hostHeader(b[i:])
	if err != nil || !found {
		return HTTP, "", err
	}
	th, err := targetHost(method, target)
	if err != nil {
		return HTTP, "", malformed(line, "target %q: %v", target, err)
	}
	switch {
	case host == "":
		return HTTP, th, nil
	case th != "" && th != host:
		// Servers take an absolute target's host over Host (RFC 9112 3.2.2)
		// and proxies do the opposite; a name that depends on who reads it
		// cannot be allowed or denied.
		return HTTP, "", malformed(line, "target host %q is not the Host header's %q", th, host)
	}
	return HTTP, host, nil
}

// hostHeader reads header lines up to the empty one and returns the Host
// header's host ("" if absent or empty). found is false until the header
// block has ended.
func hostHeader(b []byte) (host string, found bool, err error) {
	const what = "HTTP header"
	seen := false
	for {
		nl := bytes.IndexByte(b, '\n')
		if nl < 0 {
			return "", false, ErrNeedMore
		}
		line := bytes.TrimSuffix(b[:nl], []byte("\r"))
		b = b[nl+1:]
		if len(line) == 0 {
			return host, true, nil
		}
		if line[0] == ' ' || line[0] == '\t' {
			// Folding (RFC 9112 5.2) could hide a second line inside Host.
			return "", false, malformed(what, "folded line")
		}
		colon := bytes.IndexByte(line, ':')
		if colon <= 0 {
			return "", false, malformed(what, "line without a name and a colon")
		}
		name := line[:colon]
		for _, c := range name {
			if !isTchar(c) {
				return "", false, malformed(what, "name %q has byte %q", name, c)
			}
		}
		value := bytes.Trim(line[colon+1:], " \t")
		for _, c := range value {
			if c < ' ' && c != '\t' || c == 0x7f {
				return "", false, malformed(what, "%s value has control byte %q", name, c)
			}
		}
		if !strings.EqualFold(string(name), "host") {
			continue
		}
		if seen {
			return "", false, malformed(what, "two Host headers") // RFC 9112 3.2: a 400
		}
		seen = true
		if len(value) == 0 {
			continue
		}
		if host, err = splitHostPort(string(value)); err != nil {
			return "", false, malformed(what, "Host %q: %v", value, err)
		}
	}
}

// targetHost returns the host in a CONNECT target or an absolute-form
// http(s) target; "" for other targets ("/path", "*").
func targetHost(method, target string) (string, error) {
	if method == "CONNECT" {
		return splitHostPort(target)
	}
	lower := strings.ToLower(target)
	var rest string
	switch {
	case strings.HasPrefix(lower, "http://"):
		rest = target[len("http://"):]
	case strings.HasPrefix(lower, "https://"):
		rest = target[len("https://"):]
	default:
		return "", nil
	}
	if i := strings.IndexAny(rest, "/?#"); i >= 0 {
		rest = rest[:i]
	}
	if strings.Contains(rest, "@") {
		// Userinfo is a classic way to make one URL read as two hosts.
		return "", errors.New("userinfo before the host")
	}
	return splitHostPort(rest)
}

func isDigit(c byte) bool { return '0' <= c && c <= '9' }

// isTchar reports whether c may be in a header name (RFC 9110 5.6.2).
func isTchar(c byte) bool {
	return isAlnum(c) || strings.IndexByte("!#$%&'*+-.^_`|~", c) >= 0
}
