package inspect

// Policy allows or denies a connection by the name Name found in it: SNI
// lists for TLS, Host lists for HTTP. The zero Policy denies everything;
// set DefaultAllow to allow whatever the lists do not decide.
type Policy struct {
	SNIAllow, SNIDeny   List
	HostAllow, HostDeny List
	// DefaultAllow decides connections with no name (not TLS or HTTP,
	// nameless, or malformed: pass name "" for those) and named ones that
	// no deny list matched when the applicable allow list is empty.
	DefaultAllow bool
}

// Enabled reports whether the policy can deny anything, that is whether
// the proxy needs to inspect connections at all.
func (p Policy) Enabled() bool {
	return p.SNIAllow.Len() > 0 || p.SNIDeny.Len() > 0 ||
		p.HostAllow.Len() > 0 || p.HostDeny.Len() > 0 || !p.DefaultAllow
}

// Decide allows or denies a connection of the given kind carrying name, and
// says why in a few words for the log ("sni deny *.bad.example", "host not
// in allow list", "no name: default deny"). A deny list wins over an allow
// list; a non-empty allow list must match.
func (p Policy) Decide(kind Kind, name string) (allow bool, why string) {
	var allowList, denyList List
	var label string
	switch kind {
	case TLS:
		allowList, denyList, label = p.SNIAllow, p.SNIDeny, "sni"
	case HTTP:
		allowList, denyList, label = p.HostAllow, p.HostDeny, "host"
	default:
		name = "" // no lists for unknown protocols
	}
	if name == "" {
		return p.DefaultAllow, "no name: " + p.defaultWord()
	}
	if e, ok := denyList.match(name); ok {
		return false, label + " deny " + e
	}
	if allowList.Len() > 0 {
		if e, ok := allowList.match(name); ok {
			return true, label + " allow " + e
		}
		return false, label + " not in allow list"
	}
	return p.DefaultAllow, label + ": " + p.defaultWord()
}

func (p Policy) defaultWord() string {
	if p.DefaultAllow {
		return "default allow"
	}
	return "default deny"
}
