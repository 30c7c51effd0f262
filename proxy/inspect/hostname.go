package inspect

import (
	"errors"
	"fmt"
	"net/netip"
	"strings"
)

// hostname normalises a DNS host name (lowercase, no trailing dot) and
// checks it: what SNI may carry (RFC 6066 3: a host name, never an address).
func hostname(s string) (string, error) {
	s = strings.TrimSuffix(s, ".")
	if s == "" {
		return "", errors.New("empty")
	}
	if len(s) > 253 {
		return "", fmt.Errorf("%d bytes long, more than 253", len(s))
	}
	if _, err := netip.ParseAddr(s); err == nil {
		return "", errors.New("an IP address, not a host name")
	}
	last := ""
	for label := range strings.SplitSeq(s, ".") {
		if err := checkLabel(label); err != nil {
			return "", err
		}
		last = label
	}
	if strings.Trim(last, "0123456789") == "" {
		// No top-level domain is numeric; "10.1" is a shorthand address.
		return "", fmt.Errorf("last label %q is all digits", last)
	}
	return strings.ToLower(s), nil
}

// checkLabel allows letters, digits and hyphens (RFC 1123), and also
// underscores: real hosts have them and TLS clients send them.
func checkLabel(l string) error {
	if l == "" {
		return errors.New("empty label")
	}
	if len(l) > 63 {
		return fmt.Errorf("label %.16q... longer than 63 bytes", l)
	}
	if l[0] == '-' || l[len(l)-1] == '-' {
		return fmt.Errorf("label %q starts or ends with a hyphen", l)
	}
	for i := 0; i < len(l); i++ {
		c := l[i]
		if !isAlnum(c) && c != '-' && c != '_' {
			return fmt.Errorf("label %q has byte %q", l, c)
		}
	}
	return nil
}

// hostOrAddr is hostname, but an IP address is fine too, in its canonical
// form: an HTTP Host may be an address and an allow list may name one.
func hostOrAddr(s string) (string, error) {
	if a, err := netip.ParseAddr(s); err == nil {
		if a.Zone() != "" {
			return "", errors.New("an address with a zone")
		}
		return a.String(), nil
	}
	return hostname(s)
}

// splitHostPort takes the host from an HTTP authority (RFC 3986 3.2.2,
// without userinfo): "name", "name:port", "1.2.3.4:80", "[::1]:8080".
// The port may be empty but must be digits.
func splitHostPort(s string) (string, error) {
	host, port := s, ""
	if strings.HasPrefix(s, "[") {
		end := strings.IndexByte(s, ']')
		if end < 0 {
			return "", errors.New("no ] after [")
		}
		host, port = s[1:end], s[end+1:]
		if port != "" && port[0] != ':' {
			return "", fmt.Errorf("%q after ]", port)
		}
		a, err := netip.ParseAddr(host)
		if err != nil || !a.Is6() || a.Zone() != "" {
			return "", fmt.Errorf("%q is not an IPv6 address", host)
		}
		host = a.String()
	} else {
		if i := strings.IndexByte(s, ':'); i >= 0 {
			host, port = s[:i], s[i:]
		}
		if strings.Contains(port[min(1, len(port)):], ":") {
			return "", errors.New("more than one colon (an IPv6 address needs brackets)")
		}
		var err error
		if host, err = hostOrAddr(host); err != nil {
			return "", err
		}
	}
	if port != "" {
		if len(port) > 6 || strings.Trim(port[1:], "0123456789") != "" {
			return "", fmt.Errorf("port %q is not a number", port[1:])
		}
	}
	return host, nil
}

func isUpper(c byte) bool { return 'A' <= c && c <= 'Z' }

func isAlnum(c byte) bool {
	return 'a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9'
}
