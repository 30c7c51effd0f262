package appliance

import (
	"errors"
	"io"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"context"

	"github.com/ghostwire/ghostwire/proxy"
	"github.com/ghostwire/ghostwire/rules"
)

// fakeKernel records the bypass list the controller puts in the kernel.
type fakeKernel struct {
	mu   sync.Mutex
	set  map[netip.Prefix]time.Duration
	fail error
}

func newFakeKernel() *fakeKernel { return &fakeKernel{set: map[netip.Prefix]time.Duration{}} }

func (k *fakeKernel) add(p netip.Prefix, d time.Duration) error {
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.fail != nil {
		return k.fail
	}
	k.set[p] = d
	return nil
}

func (k *fakeKernel) del(p netip.Prefix) error {
	k.mu.Lock()
	defer k.mu.Unlock()
	if _, ok := k.set[p]; !ok {
		return rules.ErrNotListed
	}
	delete(k.set, p)
	return nil
}

type clock struct{ t time.Time }

func (c *clock) now() time.Time { return c.t }

func newController(t *testing.T) (*controller, *fakeKernel, *clock) {
	k := newFakeKernel()
	clk := &clock{time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)}
	c := &controller{file: filepath.Join(t.TempDir(), "bypass.json"), kernel: k, now: clk.now,
		stats: func() proxy.Stats { return proxy.Stats{Active: 3, Accepted: 7} }}
	return c, k, clk
}

func TestControlHandle(t *testing.T) {
	c, k, clk := newController(t)
	ok := func(req ControlRequest) ControlResponse {
		t.Helper()
		r := c.handle(req)
		if !r.OK {
			t.Fatalf("%+v: %s", req, r.Error)
		}
		return r
	}
	bad := func(req ControlRequest, want string) {
		t.Helper()
		if r := c.handle(req); r.OK || !strings.Contains(r.Error, want) {
			t.Errorf("%+v = %+v, want error with %q", req, r, want)
		}
	}
	ok(ControlRequest{Cmd: "bypass-add", Prefix: "192.0.2.9"})
	r := ok(ControlRequest{Cmd: "bypass-add", Prefix: "10.1.2.3/16", For: "10m"})
	if len(r.Entries) != 1 || r.Entries[0].Prefix != "10.1.0.0/16" || r.Entries[0].Expires != "2026-01-02T03:14:05Z" {
		t.Errorf("add answered %+v", r.Entries)
	}
	ok(ControlRequest{Cmd: "bypass-add", Prefix: "2001:db8::1"})
	if k.set[netip.MustParsePrefix("10.1.0.0/16")] != 10*time.Minute || k.set[netip.MustParsePrefix("192.0.2.9/32")] != 0 || len(k.set) != 3 {
		t.Errorf("kernel = %v", k.set)
	}
	bad(ControlRequest{Cmd: "bypass-add", Prefix: "192.0.2.300"}, `bad prefix "192.0.2.300"`)
	bad(ControlRequest{Cmd: "bypass-add", Prefix: "10.1.9.9"}, "overlaps 10.1.0.0/16")
	bad(ControlRequest{Cmd: "bypass-add", Prefix: "192.0.2.10", For: "soon"}, `bad duration "soon"`)
	bad(ControlRequest{Cmd: "bypass-del", Prefix: "198.51.100.1"}, "198.51.100.1/32 is not in the bypass list")
	bad(ControlRequest{Cmd: "frob"}, `unknown command "frob"`)
	k.fail = errors.New("netlink says no")
	bad(ControlRequest{Cmd: "bypass-add", Prefix: "192.0.2.10"}, "netlink says no")
	k.fail = nil

	list := ok(ControlRequest{Cmd: "bypass-list"}).Entries
	want := []BypassEntry{{"10.1.0.0/16", "2026-01-02T03:14:05Z"}, {"192.0.2.9/32", ""}, {"2001:db8::1/128", ""}}
	if len(list) != len(want) {
		t.Fatalf("list = %+v, want %+v", list, want)
	}
	for i := range want {
		if list[i] != want[i] {
			t.Errorf("list = %+v, want %+v", list, want)
		}
	}
	// Expired entries leave the list (the kernel drops them itself).
	clk.t = clk.t.Add(11 * time.Minute)
	if list := ok(ControlRequest{Cmd: "bypass-list"}).Entries; len(list) != 2 {
		t.Errorf("after expiry: %+v", list)
	}
	ok(ControlRequest{Cmd: "bypass-del", Prefix: "192.0.2.9/32"})
	if _, in := k.set[netip.MustParsePrefix("192.0.2.9/32")]; in {
		t.Error("deleted entry still in the kernel")
	}
	if st := ok(ControlRequest{Cmd: "stats"}).Stats; st == nil || st.Active != 3 || st.Accepted != 7 {
		t.Errorf("stats = %+v", st)
	}
}

// TestBypassPersistence: every change is written; restore puts the
// unexpired entries back into the kernel and drops the expired ones.
func TestBypassPersistence(t *testing.T) {
	c, _, clk := newController(t)
	for _, req := range []ControlRequest{
		{Cmd: "bypass-add", Prefix: "192.0.2.9"},
		{Cmd: "bypass-add", Prefix: "198.51.100.0/24", For: "1h"},
		{Cmd: "bypass-add", Prefix: "203.0.113.5", For: "2s"},
	} {
		if r := c.handle(req); !r.OK {
			t.Fatal(r.Error)
		}
	}
	b, err := os.ReadFile(c.file)
	if err != nil || !strings.Contains(string(b), `"until": "2026-01-02T04:04:05Z"`) {
		t.Fatalf("file = %s, %v", b, err)
	}
	clk.t = clk.t.Add(30 * time.Minute)
	k2 := newFakeKernel()
	c2 := &controller{file: c.file, kernel: k2, now: clk.now}
	if err := c2.restore(slog.New(slog.NewTextHandler(io.Discard, nil)), k2); err != nil {
		t.Fatal(err)
	}
	if len(k2.set) != 2 || k2.set[netip.MustParsePrefix("192.0.2.9/32")] != 0 ||
		k2.set[netip.MustParsePrefix("198.51.100.0/24")] != 30*time.Minute {
		t.Errorf("restored kernel = %v", k2.set)
	}
	if b, _ := os.ReadFile(c.file); strings.Contains(string(b), "203.0.113.5") {
		t.Errorf("expired entry kept in file:\n%s", b)
	}
	// No file: an empty list; a broken one: an error.
	if es, err := loadBypass(filepath.Join(t.TempDir(), "none.json"), clk.t); err != nil || len(es) != 0 {
		t.Errorf("missing file: %v %v", es, err)
	}
	os.WriteFile(c.file, []byte("{"), 0o600)
	if _, err := loadBypass(c.file, clk.t); err == nil {
		t.Error("broken file read without error")
	}
}

// TestControlSocket: the socket is 0600 in a 0700 directory, answers one
// JSON request per connection, refuses a second daemon, and goes on stop.
func TestControlSocket(t *testing.T) {
	c, _, _ := newController(t)
	path := filepath.Join(t.TempDir(), "run", "ghostwire", "control.sock")
	l, err := listenControl(path)
	if err != nil {
		t.Fatal(err)
	}
	stop := serveControl(context.Background(), l, c, slog.New(slog.NewTextHandler(io.Discard, nil)))
	for p, mode := range map[string]os.FileMode{path: 0o600, filepath.Dir(path): 0o700} {
		if fi, err := os.Stat(p); err != nil || fi.Mode().Perm() != mode {
			t.Errorf("%s: %v %v, want mode %v", p, fi.Mode(), err, mode)
		}
	}
	if _, err := listenControl(path); err == nil || !strings.Contains(err.Error(), "another ghostwire run") {
		t.Errorf("second listen: %v", err)
	}
	r, err := Control(path, ControlRequest{Cmd: "bypass-add", Prefix: "192.0.2.9", For: "1m"})
	if err != nil || !r.OK {
		t.Fatalf("add: %+v %v", r, err)
	}
	r, err = Control(path, ControlRequest{Cmd: "bypass-add", Prefix: "nonsense"})
	if err != nil || r.OK || !strings.Contains(r.Error, "bad prefix") {
		t.Errorf("bad add: %+v %v", r, err)
	}
	r, err = Control(path, ControlRequest{Cmd: "stats"})
	if err != nil || r.Stats == nil || r.Stats.Active != 3 {
		t.Errorf("stats: %+v %v", r, err)
	}
	stop()
	if _, err := os.Stat(path); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("socket left after stop: %v", err)
	}
	if _, err := Control(path, ControlRequest{Cmd: "bypass-list"}); !errors.Is(err, ErrNotRunning) {
		t.Errorf("Control with no daemon: %v", err)
	}
	// A stale socket (a daemon that died) is replaced.
	os.WriteFile(path, nil, 0o600)
	l, err = listenControl(path)
	if err != nil {
		t.Fatalf("over a stale file: %v", err)
	}
	l.Close()
}
