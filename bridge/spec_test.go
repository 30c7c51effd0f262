package bridge

import (
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestParseRoute(t *testing.T) {
	for _, tc := range []struct{ in, want, err string }{
		{in: "192.0.2.0/24", want: "192.0.2.0/24"},
		{in: "default via 192.0.2.1", want: "default via 192.0.2.1"},
		{in: "default via 2001:db8::1", want: "default via 2001:db8::1"},
		{in: "198.51.100.0/24 via 192.0.2.1", want: "198.51.100.0/24 via 192.0.2.1"},
		{in: "2001:db8:1::/64", want: "2001:db8:1::/64"},
		{in: "default", err: "needs \"via GATEWAY\""},
		{in: "192.0.2.1/24", err: "host bits"},
		{in: "192.0.2.0/33", err: "bad destination"},
		{in: "10.0.0.0/8 via nothere", err: "bad gateway"},
		{in: "10.0.0.0/8 via 2001:db8::1", err: "different IP families"},
		{in: "10.0.0.0/8 dev eth0", err: "want"},
		{in: "", err: "want"},
	} {
		r, err := ParseRoute(tc.in)
		if tc.err != "" {
			if err == nil || !strings.Contains(err.Error(), tc.err) {
				t.Errorf("ParseRoute(%q) error = %v, want containing %q", tc.in, err, tc.err)
			}
			continue
		}
		if err != nil || r.String() != tc.want {
			t.Errorf("ParseRoute(%q) = %q, %v; want %q", tc.in, r, err, tc.want)
		}
	}
}

func TestValidate(t *testing.T) {
	good := Spec{Name: "br0", Ports: []string{"lan0", "wan0"}}
	if err := good.Validate(); err != nil {
		t.Fatalf("good spec refused: %v", err)
	}
	for _, tc := range []struct {
		name string
		mod  func(*Spec)
		err  string
	}{
		{"empty name", func(s *Spec) { s.Name = "" }, "bridge name: interface name is empty"},
		{"long name", func(s *Spec) { s.Name = "abcdefghijklmnop" }, "longer than 15"},
		{"same NIC twice", func(s *Spec) { s.Ports = []string{"lan0", "lan0"} }, "same interface \"lan0\""},
		{"one NIC", func(s *Spec) { s.Ports = []string{"lan0"} }, "exactly two NICs"},
		{"NIC is bridge", func(s *Spec) { s.Ports = []string{"br0", "wan0"} }, "bridge's own name"},
		{"bad NIC name", func(s *Spec) { s.Ports = []string{"la n0", "wan0"} }, "contains '/', ':', '*', a quote"},
		// The kernel would take these, but the nftables rules could not
		// name them: one rule (ValidIfName) for both.
		{"quote in NIC name", func(s *Spec) { s.Ports = []string{`la"n0`, "wan0"} }, "a quote"},
		{"wildcard in bridge name", func(s *Spec) { s.Name = "br*" }, "'*'"},
		{"multicast address", func(s *Spec) { s.Addresses = []netip.Prefix{netip.MustParsePrefix("224.0.0.1/4")} }, "not a usable unicast"},
	} {
		s := good
		s.Ports = append([]string(nil), good.Ports...)
		tc.mod(&s)
		if err := s.Validate(); err == nil || !strings.Contains(err.Error(), tc.err) {
			t.Errorf("%s: Validate() = %v, want containing %q", tc.name, err, tc.err)
		}
	}
}

func TestSortedRoutesOnLinkFirst(t *testing.T) {
	s := Spec{Routes: []Route{
		{Dst: netip.MustParsePrefix("0.0.0.0/0"), Via: netip.MustParseAddr("192.0.2.1")},
		{Dst: netip.MustParsePrefix("192.0.2.0/24")},
	}}
	got := s.sortedRoutes()
	if got[0].Via.IsValid() || !got[1].Via.IsValid() {
		t.Fatalf("sortedRoutes = %v, want the on-link route first", got)
	}
}

func TestSysctlFS(t *testing.T) {
	root := t.TempDir()
	f := SysctlFS{Root: root}
	dir := filepath.Join(root, "net", "ipv4", "conf", "br.10")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "send_redirects"), []byte("1\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	key := "net.ipv4.conf.br.10.send_redirects"
	if v, err := f.Get(key); err != nil || v != "1" {
		t.Fatalf("Get(%s) = %q, %v; want 1", key, v, err)
	}
	if err := f.Set(key, "0"); err != nil {
		t.Fatal(err)
	}
	if v, _ := f.Get(key); v != "0" {
		t.Fatalf("after Set, Get = %q, want 0", v)
	}
	if _, err := f.Get("net.ipv4.ip_forward"); !IsNotExist(err) {
		t.Fatalf("Get of a missing key: %v, want not-exist", err)
	}
}
