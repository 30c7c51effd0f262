package appliance

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/ghostwire/ghostwire/proxy"
	"github.com/ghostwire/ghostwire/rules"
)

// The control socket: `ghostwire run` listens on a unix socket
// (control_socket, mode 0600 in a directory it makes 0700) for one JSON
// request per connection, answered with one JSON response. It serves the
// live bypass list (`ghostwire bypass`) and the proxy's counters
// (`ghostwire status --json`). Only the daemon can change its owned
// tables, so the bypass commands are applied by it, over its lasting
// nftables connection; the list is also kept in a file next to
// state_file (bypassFile) and restored when the daemon starts.

// ControlRequest is one request on the control socket.
type ControlRequest struct {
	Cmd    string `json:"cmd"`              // bypass-add, bypass-del, bypass-list, stats
	Prefix string `json:"prefix,omitempty"` // ADDR or ADDR/LEN (bypass-add, bypass-del)
	For    string `json:"for,omitempty"`    // a Go duration (bypass-add); empty: permanent
}

// ControlResponse is the answer to one ControlRequest.
type ControlResponse struct {
	OK      bool          `json:"ok"`
	Error   string        `json:"error,omitempty"`
	Entries []BypassEntry `json:"entries,omitempty"` // bypass-list (and bypass-add: the entry added)
	Stats   *proxy.Stats  `json:"stats,omitempty"`   // stats
	// Restored (stats) counts what self-healing restored since the
	// daemon started, by item.
	Restored map[string]int `json:"restored,omitempty"`
}

// BypassEntry is one entry of the live bypass list.
type BypassEntry struct {
	Prefix string `json:"prefix"`
	// Expires is when the entry ends (RFC 3339), empty for a permanent one.
	Expires string `json:"expires"`
}

// bypassEntry is an entry as the daemon keeps it: zero until is permanent.
type bypassEntry struct {
	prefix netip.Prefix
	until  time.Time
}

// bypassFile is where the daemon keeps its bypass list: next to the state
// file.
func bypassFile(stateFile string) string {
	return filepath.Join(filepath.Dir(stateFile), "bypass.json")
}

// bypassKernel applies bypass list changes to the tables.
type bypassKernel interface {
	add(p netip.Prefix, timeout time.Duration) error
	del(p netip.Prefix) error
}

// controller answers control requests; its methods are safe for
// concurrent use.
type controller struct {
	file   string // the persisted list
	kernel bypassKernel
	stats  func() proxy.Stats
	// restored is self-healing's counts (nil: none to report).
	restored func() map[string]int
	now      func() time.Time

	mu      sync.Mutex
	entries []bypassEntry // sorted by prefix
}

// fileEntry is an entry in the bypass file.
type fileEntry struct {
	Prefix string    `json:"prefix"`
	Until  time.Time `json:"until,omitzero"`
}

// loadBypass reads the bypass file: its entries not expired at now. A
// missing file is an empty list.
func loadBypass(path string, now time.Time) ([]bypassEntry, error) {
	b, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("reading bypass list: %w", err)
	}
	var fes []fileEntry
	if err := json.Unmarshal(b, &fes); err != nil {
		return nil, fmt.Errorf("reading bypass list %s: %w", path, err)
	}
	var out []bypassEntry
	for _, fe := range fes {
		p, err := parseBypassPrefix(fe.Prefix)
		if err != nil {
			return nil, fmt.Errorf("reading bypass list %s: %w", path, err)
		}
		if !fe.Until.IsZero() && !fe.Until.After(now) {
			continue
		}
		out = append(out, bypassEntry{p, fe.Until})
	}
	return out, nil
}

// saveBypass writes the list atomically (a temporary file renamed over it).
func saveBypass(path string, entries []bypassEntry) error {
	fes := make([]fileEntry, 0, len(entries))
	for _, e := range entries {
		fes = append(fes, fileEntry{e.prefix.String(), e.until})
	}
	b, err := json.MarshalIndent(fes, "", "  ")
	if err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return fmt.Errorf("writing bypass list: %w", err)
	}
	tmp, err := os.CreateTemp(filepath.Dir(path), ".bypass-*.json")
	if err != nil {
		return fmt.Errorf("writing bypass list: %w", err)
	}
	defer os.Remove(tmp.Name())
	if _, err := tmp.Write(append(b, '\n')); err == nil {
		err = tmp.Sync()
	}
	if cerr := tmp.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp.Name(), path)
	}
	if err != nil {
		return fmt.Errorf("writing bypass list %s: %w", path, err)
	}
	return nil
}

// parseBypassPrefix reads ADDR or ADDR/LEN.
func parseBypassPrefix(s string) (netip.Prefix, error) {
	var p netip.Prefix
	var err error
	if strings.Contains(s, "/") {
		p, err = netip.ParsePrefix(s)
	} else {
		var a netip.Addr
		if a, err = netip.ParseAddr(s); err == nil {
			p = netip.PrefixFrom(a, a.BitLen())
		}
	}
	if err != nil {
		return p, fmt.Errorf("bad prefix %q: want ADDR or ADDR/LEN", s)
	}
	if p, err = rules.CheckHostPrefix(p); err != nil {
		return p, fmt.Errorf("bad prefix: %w", err)
	}
	return p, nil
}

// restore loads the persisted list, puts its unexpired entries into the
// kernel and writes the file back without the expired ones. An entry the
// kernel refuses is logged and dropped.
// k applies them (the run loop does not run yet).
func (c *controller) restore(log *slog.Logger, k bypassKernel) error {
	entries, err := loadBypass(c.file, c.now())
	if err != nil {
		return err
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	c.entries = nil
	for _, e := range entries {
		var timeout time.Duration
		if !e.until.IsZero() {
			timeout = max(e.until.Sub(c.now()).Round(time.Millisecond), time.Millisecond)
		}
		if err := k.add(e.prefix, timeout); err != nil {
			log.Error("restoring bypass entry", "prefix", e.prefix, "err", err)
			continue
		}
		c.entries = append(c.entries, e)
	}
	if len(c.entries) > 0 {
		log.Info("bypass list restored", "entries", len(c.entries), "file", c.file)
	}
	return saveBypass(c.file, c.entries)
}

// live drops expired entries; c.mu is held.
func (c *controller) live() {
	now := c.now()
	c.entries = slices.DeleteFunc(c.entries, func(e bypassEntry) bool { return !e.until.IsZero() && !e.until.After(now) })
}

// handle answers one request.
func (c *controller) handle(req ControlRequest) ControlResponse {
	fail := func(format string, a ...any) ControlResponse {
		return ControlResponse{Error: fmt.Sprintf(format, a...)}
	}
	switch req.Cmd {
	case "stats":
		if c.stats == nil {
			return fail("no proxy stats")
		}
		st := c.stats()
		resp := ControlResponse{OK: true, Stats: &st}
		if c.restored != nil {
			resp.Restored = c.restored()
		}
		return resp
	case "bypass-list":
		c.mu.Lock()
		defer c.mu.Unlock()
		c.live()
		return ControlResponse{OK: true, Entries: c.list(c.entries)}
	case "bypass-add", "bypass-del":
	default:
		return fail("unknown command %q (want bypass-add, bypass-del, bypass-list or stats)", req.Cmd)
	}
	p, err := parseBypassPrefix(req.Prefix)
	if err != nil {
		return fail("%v", err)
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	c.live()
	i := slices.IndexFunc(c.entries, func(e bypassEntry) bool { return e.prefix == p })
	if req.Cmd == "bypass-del" {
		if req.For != "" {
			return fail("bypass-del takes no \"for\"")
		}
		if i < 0 {
			return fail("%s is not in the bypass list", p)
		}
		if err := c.kernel.del(p); err != nil && !errors.Is(err, rules.ErrNotListed) {
			return fail("%v", err)
		}
		c.entries = slices.Delete(c.entries, i, i+1)
		if err := saveBypass(c.file, c.entries); err != nil {
			return fail("deleted, but %v", err)
		}
		return ControlResponse{OK: true}
	}
	var timeout time.Duration
	if req.For != "" {
		d, err := time.ParseDuration(req.For)
		if err != nil || d < time.Second || d%time.Millisecond != 0 {
			return fail("bad duration %q: want a Go duration of at least 1s, such as 10m or 2h", req.For)
		}
		timeout = d
	}
	for _, e := range c.entries {
		if e.prefix != p && e.prefix.Overlaps(p) {
			return fail("%s overlaps %s, already in the bypass list: delete that first", p, e.prefix)
		}
	}
	if err := c.kernel.add(p, timeout); err != nil {
		return fail("%v", err)
	}
	e := bypassEntry{prefix: p}
	if timeout > 0 {
		e.until = c.now().Add(timeout)
	}
	if i >= 0 {
		c.entries[i] = e
	} else {
		c.entries = append(c.entries, e)
		slices.SortFunc(c.entries, func(a, b bypassEntry) int {
			if x := a.prefix.Addr().Compare(b.prefix.Addr()); x != 0 {
				return x
			}
			return a.prefix.Bits() - b.prefix.Bits()
		})
	}
	if err := saveBypass(c.file, c.entries); err != nil {
		return fail("added, but %v", err)
	}
	return ControlResponse{OK: true, Entries: c.list([]bypassEntry{e})}
}

// list is entries as the protocol has them.
func (c *controller) list(entries []bypassEntry) []BypassEntry {
	out := make([]BypassEntry, 0, len(entries))
	for _, e := range entries {
		be := BypassEntry{Prefix: e.prefix.String()}
		if !e.until.IsZero() {
			be.Expires = e.until.UTC().Format(time.RFC3339)
		}
		out = append(out, be)
	}
	return out
}

// listenControl makes path's directory (0700) if missing and listens on
// path (mode 0600). A socket left by a daemon that died is replaced; one
// that answers is another daemon's, and refused.
func listenControl(path string) (*net.UnixListener, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, fmt.Errorf("control socket: %w", err)
	}
	if c, err := net.DialTimeout("unix", path, time.Second); err == nil {
		c.Close()
		return nil, fmt.Errorf("control socket %s: another ghostwire run is serving it", path)
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("control socket: %w", err)
	}
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		return nil, fmt.Errorf("control socket: %w", err)
	}
	if err := os.Chmod(path, 0o600); err != nil {
		l.Close()
		return nil, fmt.Errorf("control socket: %w", err)
	}
	return l, nil
}

// controlTimeout bounds one control connection.
const controlTimeout = 10 * time.Second

// serveControl answers requests on l with c until ctx is done or l
// closes; it then removes the socket. The returned stop closes l and
// waits for serveControl to end.
func serveControl(ctx context.Context, l *net.UnixListener, c *controller, log *slog.Logger) (stop func()) {
	l.SetUnlinkOnClose(true)
	done := make(chan struct{})
	var wg sync.WaitGroup
	go func() {
		defer close(done)
		for {
			conn, err := l.Accept()
			if err != nil {
				if ctx.Err() == nil && !errors.Is(err, net.ErrClosed) {
					log.Error("control socket", "err", err)
				}
				wg.Wait()
				return
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				serveControlConn(conn, c, log)
			}()
		}
	}()
	ctxStop := context.AfterFunc(ctx, func() { l.Close() })
	return func() {
		ctxStop()
		l.Close()
		<-done
	}
}

// serveControlConn answers the one request of conn.
func serveControlConn(conn net.Conn, c *controller, log *slog.Logger) {
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(controlTimeout))
	var req ControlRequest
	var resp ControlResponse
	line, err := bufio.NewReader(conn).ReadBytes('\n')
	if err != nil && len(line) == 0 {
		resp = ControlResponse{Error: fmt.Sprintf("reading request: %v", err)}
	} else if err := json.Unmarshal(line, &req); err != nil {
		resp = ControlResponse{Error: fmt.Sprintf("bad request: %v", err)}
	} else {
		resp = c.handle(req)
		if strings.HasPrefix(req.Cmd, "bypass-") && req.Cmd != "bypass-list" {
			if resp.OK {
				log.Info("bypass list changed", "cmd", req.Cmd, "prefix", req.Prefix, "for", req.For)
			} else {
				log.Warn("bypass request refused", "cmd", req.Cmd, "prefix", req.Prefix, "err", resp.Error)
			}
		}
	}
	b, _ := json.Marshal(resp)
	conn.Write(append(b, '\n'))
}

// Control sends one request to the control socket at path and returns
// the response. An error wrapping ErrNotRunning means nothing listens
// there.
func Control(path string, req ControlRequest) (ControlResponse, error) {
	var resp ControlResponse
	conn, err := net.DialTimeout("unix", path, 2*time.Second)
	if err != nil {
		return resp, fmt.Errorf("%w (no control socket at %s): %v", ErrNotRunning, path, err)
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(controlTimeout + 5*time.Second))
	b, _ := json.Marshal(req)
	if _, err := conn.Write(append(b, '\n')); err != nil {
		return resp, fmt.Errorf("control socket %s: %w", path, err)
	}
	line, err := bufio.NewReader(conn).ReadBytes('\n')
	if err != nil && len(line) == 0 {
		return resp, fmt.Errorf("control socket %s: reading response: %w", path, err)
	}
	if err := json.Unmarshal(line, &resp); err != nil {
		return resp, fmt.Errorf("control socket %s: bad response: %w", path, err)
	}
	return resp, nil
}

// ErrNotRunning says no ghostwire run answers on the control socket.
var ErrNotRunning = errors.New("ghostwire run is not running")

// loopKernel applies bypass changes through the run loop, which owns the
// lasting nftables connection (and applies plans through it).
type loopKernel struct {
	s *session
}

// nftTimeout bounds a wait for the run loop (busy draining, say).
const nftTimeout = 5 * time.Second

func (k loopKernel) do(f func() error) error {
	errc := make(chan error, 1)
	select {
	case k.s.nftc <- func() { errc <- f() }:
	case <-time.After(nftTimeout):
		return errors.New("the daemon is busy (stopping?): nothing changed")
	}
	return <-errc
}

func (k loopKernel) add(p netip.Prefix, timeout time.Duration) error {
	return k.do(func() error { return rules.AddHostBypass(k.s.nft, k.s.plan.Config().Name, p, timeout) })
}

func (k loopKernel) del(p netip.Prefix) error {
	return k.do(func() error { return rules.DelHostBypass(k.s.nft, k.s.plan.Config().Name, p) })
}

// directKernel applies bypass changes on the session's connection
// directly: before the run loop starts (restore).
type directKernel struct{ s *session }

func (k directKernel) add(p netip.Prefix, timeout time.Duration) error {
	return rules.AddHostBypass(k.s.nft, k.s.plan.Config().Name, p, timeout)
}

func (k directKernel) del(p netip.Prefix) error {
	return rules.DelHostBypass(k.s.nft, k.s.plan.Config().Name, p)
}
