package inspect

import (
	"strings"
	"testing"
)

func TestList(t *testing.T) {
	l, err := NewList([]string{"Exact.Example.", "*.wild.example", "192.0.2.1", "2001:DB8::1", "*.wild.example"})
	if err != nil {
		t.Fatal(err)
	}
	if l.Len() != 4 {
		t.Errorf("Len = %d, want 4 (a duplicate counts once)", l.Len())
	}
	for name, want := range map[string]bool{
		"exact.example":     true,
		"EXACT.example.":    true,
		"a.exact.example":   false,
		"a.wild.example":    true,
		"A.B.Wild.Example.": true,
		"wild.example":      false,
		"xwild.example":     false,
		"192.0.2.1":         true,
		"2001:db8:0::1":     true,
		"192.0.2.2":         false,
		"":                  false,
		"bad name":          false,
		".wild.example":     false,
	} {
		if got := l.Match(name); got != want {
			t.Errorf("Match(%q) = %v, want %v", name, got, want)
		}
	}
	var zero List
	if zero.Len() != 0 || zero.Match("example.com") {
		t.Error("the zero List is not empty")
	}
}

func TestNewListErrors(t *testing.T) {
	for entry, why := range map[string]string{
		"":                                   "empty",
		"*":                                  "wildcard",
		"*.":                                 "empty",
		"a.*.example":                        "wildcard",
		"*example.com":                       "wildcard",
		"**.example.com":                     "wildcard",
		"*.*.example.com":                    "wildcard",
		"a b.example":                        "byte",
		"-a.example":                         "hyphen",
		"a..example":                         "empty label",
		"10.1":                               "digits",
		"*.192.0.2.1":                        "IP address",
		"fe80::1%eth0":                       "zone",
		"[::1]":                              "byte",
		strings.Repeat("a", 64) + ".example": "longer than 63",
	} {
		_, err := NewList([]string{"ok.example", entry})
		if err == nil {
			t.Errorf("NewList(%q) accepted it", entry)
			continue
		}
		if !strings.Contains(err.Error(), "\""+entry+"\"") || !strings.Contains(err.Error(), why) {
			t.Errorf("NewList(%q) = %v; want the entry named and %q", entry, err, why)
		}
	}
}
