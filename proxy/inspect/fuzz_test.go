package inspect

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func FuzzName(f *testing.F) {
	// The seeds in testdata/fuzz/FuzzName come first; these few keep the
	// target useful if that directory is ever lost.
	f.Add(flight(helloBody(sniExt("a.example"))))
	f.Add([]byte("GET / HTTP/1.1\r\nHost: a.example\r\n\r\n"))
	f.Fuzz(func(t *testing.T, b []byte) {
		kind, name, err := Name(b)
		checkResult(t, kind, name, err)
		if errors.Is(err, ErrNeedMore) {
			return
		}
		// An answer is final: more bytes must not change it.
		k2, n2, err2 := Name(append(bytes.Clone(b), b...))
		if k2 != kind || n2 != name || errors.Is(err2, ErrMalformed) != errors.Is(err, ErrMalformed) {
			t.Fatalf("Name = %v, %q, %v; with more bytes after = %v, %q, %v", kind, name, err, k2, n2, err2)
		}
		if name == "" {
			return
		}
		if l, lerr := NewList([]string{name}); lerr != nil || !l.Match(name) {
			t.Fatalf("name %q does not make a list that matches it: %v", name, lerr)
		}
		// Every prefix must wait, give no name, or give the same name. Long
		// inputs are sampled: the fuzzer minimises each new input by running
		// it many times, and every prefix of a 1.5 KB ClientHello stalls that.
		n := min(len(b), MaxPeek)
		step := max(1, n/64)
		for i := 0; i < n; i += step {
			pk, pn, perr := Name(b[:i])
			checkResult(t, pk, pn, perr)
			if !errors.Is(perr, ErrNeedMore) && pn != name && (pn != "" || perr != nil) {
				t.Fatalf("first %d bytes: Name = %v, %q, %v; the whole gives %v, %q", i, pk, pn, perr, kind, name)
			}
		}
	})
}

// checkResult holds for every Name result.
func checkResult(t *testing.T, kind Kind, name string, err error) {
	t.Helper()
	if err != nil && !errors.Is(err, ErrNeedMore) && !errors.Is(err, ErrMalformed) {
		t.Fatalf("Name error %v is neither ErrNeedMore nor ErrMalformed", err)
	}
	if name != "" && (err != nil || kind == Unknown) {
		t.Fatalf("Name = %v, %q, %v: a name with an error or no kind", kind, name, err)
	}
	if name != strings.ToLower(name) || strings.HasSuffix(name, ".") {
		t.Fatalf("Name returned %q: not lowercase or has a trailing dot", name)
	}
}

func FuzzList(f *testing.F) {
	f.Add("a.example\n*.b.example\n192.0.2.1", "x.b.example")
	f.Add("*.example", "EXAMPLE")
	f.Fuzz(func(t *testing.T, entries, name string) {
		es := strings.Split(entries, "\n")
		l, err := NewList(es)
		if err != nil {
			if l.Len() != 0 {
				t.Fatalf("NewList failed (%v) but returned a list of %d", err, l.Len())
			}
			return
		}
		if l.Len() > len(es) {
			t.Fatalf("Len = %d from %d entries", l.Len(), len(es))
		}
		m := l.Match(name)
		if up := asciiUpper(name); l.Match(up) != m {
			t.Fatalf("Match(%q) = %v but Match(%q) = %v", name, m, up, !m)
		}
		if !strings.HasSuffix(name, ".") && l.Match(name+".") != m {
			t.Fatalf("Match(%q) = %v but with a trailing dot %v", name, m, !m)
		}
		for _, e := range es {
			if s, ok := strings.CutPrefix(e, "*."); ok {
				if !l.Match("x." + s) {
					t.Fatalf("entry %q does not match %q", e, "x."+s)
				}
			} else if !l.Match(e) {
				t.Fatalf("entry %q does not match itself", e)
			}
		}
	})
}

func asciiUpper(s string) string {
	b := []byte(s)
	for i, c := range b {
		if 'a' <= c && c <= 'z' {
			b[i] = c - 'a' + 'A'
		}
	}
	return string(b)
}

// TestWriteCorpus rewrites the FuzzName seed files from a fresh capture
// when GHOSTWIRE_WRITE_CORPUS=1. Without it, it checks they are there.
func TestWriteCorpus(t *testing.T) {
	dir := filepath.Join("testdata", "fuzz", "FuzzName")
	if os.Getenv("GHOSTWIRE_WRITE_CORPUS") != "1" {
		if m, _ := filepath.Glob(filepath.Join(dir, "*")); len(m) < 10 {
			t.Errorf("%s has %d seed files; regenerate with GHOSTWIRE_WRITE_CORPUS=1", dir, len(m))
		}
		return
	}
	f := captureClientHello(t, "www.example.com")
	seeds := map[string][]byte{
		"tls-clienthello":        f,
		"tls-clienthello-prefix": f[:len(f)/2],
		"tls-no-sni":             flight(helloBody(ext(43, []byte{2, 3, 4}))),
		"tls-two-messages":       record(22, 0x0301, append(handshake(1, helloBody(sniExt("a.example"))), handshake(99, []byte("x"))...)),
		"http-get":               []byte("GET /index.html HTTP/1.1\r\nUser-Agent: x\r\nHost: www.example.com:80\r\nAccept: */*\r\n\r\n"),
		"http-lf":                []byte("GET / HTTP/1.1\nHost: [::1]:8080\n\n"),
		"http-connect":           []byte("CONNECT www.example.com:443 HTTP/1.1\r\n\r\n"),
		"http-absolute":          []byte("GET http://www.example.com/a?b HTTP/1.1\r\n\r\n"),
		"http-10-no-host":        []byte("GET / HTTP/1.0\r\n\r\n"),
		"http2-preface":          []byte("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"),
		"http-two-hosts":         []byte("GET / HTTP/1.1\r\nHost: a.example\r\nHost: b.example\r\n\r\n"),
	}
	for i, cuts := range awkwardCuts(t, f) {
		seeds[fmt.Sprintf("tls-split-%02d", i)] = resplit(f, cuts...)
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	for name, b := range seeds {
		data := fmt.Sprintf("go test fuzz v1\n[]byte(%q)\n", b)
		if err := os.WriteFile(filepath.Join(dir, name), []byte(data), 0o644); err != nil {
			t.Fatalf("writing seed %s: %v", name, err)
		}
	}
}
