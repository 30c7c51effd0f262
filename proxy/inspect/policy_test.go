package inspect

import "testing"

func mustList(t *testing.T, names ...string) List {
	t.Helper()
	l, err := NewList(names)
	if err != nil {
		t.Fatal(err)
	}
	return l
}

func TestPolicyDecide(t *testing.T) {
	p := Policy{
		SNIAllow:  mustList(t, "*.good.example", "bad.good.example"),
		SNIDeny:   mustList(t, "*.bad.example", "bad.good.example"),
		HostDeny:  mustList(t, "evil.example"),
		HostAllow: List{},
	}
	tests := []struct {
		p     Policy
		kind  Kind
		name  string
		allow bool
		why   string
	}{
		{p, TLS, "a.good.example", true, "sni allow *.good.example"},
		{p, TLS, "bad.good.example", false, "sni deny bad.good.example"},
		{p, TLS, "x.bad.example", false, "sni deny *.bad.example"},
		{p, TLS, "other.example", false, "sni not in allow list"},
		{p, TLS, "", false, "no name: default deny"},
		{p, HTTP, "evil.example", false, "host deny evil.example"},
		{p, HTTP, "a.good.example", false, "host: default deny"},
		{p, Unknown, "a.good.example", false, "no name: default deny"},
		{withDefault(p), HTTP, "a.good.example", true, "host: default allow"},
		{withDefault(p), HTTP, "", true, "no name: default allow"},
		{withDefault(p), TLS, "", true, "no name: default allow"},
		{withDefault(p), TLS, "other.example", false, "sni not in allow list"},
		{Policy{}, TLS, "a.example", false, "sni: default deny"},
	}
	for _, tt := range tests {
		allow, why := tt.p.Decide(tt.kind, tt.name)
		if allow != tt.allow || why != tt.why {
			t.Errorf("Decide(%v, %q) = %v, %q; want %v, %q", tt.kind, tt.name, allow, why, tt.allow, tt.why)
		}
	}
}

func withDefault(p Policy) Policy {
	p.DefaultAllow = true
	return p
}

func TestPolicyEnabled(t *testing.T) {
	l := mustList(t, "a.example")
	for _, tt := range []struct {
		p    Policy
		want bool
	}{
		{Policy{DefaultAllow: true}, false},
		{Policy{}, true},
		{Policy{DefaultAllow: true, SNIAllow: l}, true},
		{Policy{DefaultAllow: true, SNIDeny: l}, true},
		{Policy{DefaultAllow: true, HostAllow: l}, true},
		{Policy{DefaultAllow: true, HostDeny: l}, true},
	} {
		if got := tt.p.Enabled(); got != tt.want {
			t.Errorf("%+v.Enabled() = %v, want %v", tt.p, got, tt.want)
		}
	}
}
