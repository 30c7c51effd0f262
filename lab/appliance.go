package lab

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"time"
)

// Appliance is a lab's box namespace provisioned and run by the ghostwire
// binary: the harness of the end-to-end tests and of `make demo`.
type Appliance struct {
	Lab    *Lab
	Bin    string // ghostwire binary
	Dir    string // config and state live here
	Config string
	Bridge string
	Proxy  *Process // `ghostwire run`, while started
}

// ProxyPort is the TPROXY port the harness configures.
const ProxyPort = 9876

// BuildBinary builds cmd/ghostwire into dir.
func BuildBinary(dir string) (string, error) {
	bin := filepath.Join(dir, "ghostwire")
	cmd := exec.Command("go", "build", "-o", bin, "github.com/ghostwire/ghostwire/cmd/ghostwire")
	if out, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("building ghostwire: %v\n%s", err, out)
	}
	return bin, nil
}

// NewAppliance writes a config for l into dir: the bridge over the lab's two box
// ports with the suggested management addresses, intercepting ports.
func NewAppliance(l *Lab, bin, dir string, ports []int, extraYAML string) (*Appliance, error) {
	b := &Appliance{Lab: l, Bin: bin, Dir: dir, Bridge: l.Prefix + "br"}
	b.Config = filepath.Join(dir, "ghostwire.yaml")
	return b, b.WriteConfig(ports, extraYAML)
}

// WriteConfig (re)writes the config file, e.g. before a SIGHUP.
func (b *Appliance) WriteConfig(ports []int, extraYAML string) error {
	var ps []string
	for _, p := range ports {
		ps = append(ps, fmt.Sprint(p))
	}
	cfg := fmt.Sprintf(`bridge:
  name: %s
  client_nic: %s
  server_nic: %s
  addresses: [%s, "%s"]
intercept:
  tcp_ports: [%s]
proxy:
  tcp_port: %d
  connect_timeout: 2s
  idle_timeout: 1m
  shutdown_grace: 10s
state_file: %s
control_socket: %s
%s`, b.Bridge, b.Lab.ClientNIC, b.Lab.ServerNIC, b.Lab.BoxIP4, b.Lab.BoxIP6,
		strings.Join(ps, ", "), ProxyPort, filepath.Join(b.Dir, "state.json"), b.ControlSocket(), extraYAML)
	return os.WriteFile(b.Config, []byte(cfg), 0o644)
}

// bridgeAddresses is WriteConfig's bridge.addresses line.
var bridgeAddresses = regexp.MustCompile(`(?m)^  addresses: .*$`)

// MakeInvisible rewrites the config WriteConfig wrote into an invisible
// box's: bridge.invisible on, and, as an invisible box should have, no
// address on the wire but routes to the lab's subnets; bridgeKeys are
// more keys for the bridge section ("neighbour_timeout: 2s").
func (b *Appliance) MakeInvisible(bridgeKeys ...string) error {
	cfg, err := os.ReadFile(b.Config)
	if err != nil {
		return fmt.Errorf("reading the config to make it invisible: %w", err)
	}
	if !bridgeAddresses.Match(cfg) {
		return fmt.Errorf("making %s invisible: it has no bridge addresses line", b.Config)
	}
	keys := fmt.Sprintf("  addresses: []\n  routes: [%q, %q]\n  invisible: true", b.Lab.Subnet4, b.Lab.Subnet6)
	for _, k := range bridgeKeys {
		keys += "\n  " + k
	}
	if err := os.WriteFile(b.Config, bridgeAddresses.ReplaceAllLiteral(cfg, []byte(keys)), 0o644); err != nil {
		return fmt.Errorf("writing the invisible config: %w", err)
	}
	return nil
}

// ControlSocket is the control socket of the box's `ghostwire run`: in
// Dir, so labs running at once do not share one.
func (b *Appliance) ControlSocket() string { return filepath.Join(b.Dir, "control.sock") }

// Ghostwire runs `ghostwire ARGS -c CONFIG` in the box namespace and returns
// its combined output.
func (b *Appliance) Ghostwire(args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	args = append(args, "-c", b.Config)
	out, err := b.Lab.Box.Command(ctx, b.Bin, args...).CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("ghostwire %s: %w: %s", strings.Join(args, " "), err, out)
	}
	return string(out), nil
}

// Status returns `ghostwire status`'s first line, e.g. "ghostwire: intercepting".
func (b *Appliance) Status() (string, error) {
	out, _, err := b.StatusOutput()
	line, _, _ := strings.Cut(out, "\n")
	return line, err
}

// StatusOutput runs `ghostwire status ARGS` and returns its output and
// exit status; the statuses that name a state (0 intercepting, 3 not
// intercepting, 4 not provisioned) are not errors.
func (b *Appliance) StatusOutput(args ...string) (out string, code int, err error) {
	out, err = b.Ghostwire(append([]string{"status"}, args...)...)
	var exit *exec.ExitError
	if errors.As(err, &exit) && (exit.ExitCode() == 3 || exit.ExitCode() == 4) {
		return out, exit.ExitCode(), nil
	}
	return out, 0, err
}

// StartProxy starts `ghostwire run --json` in the box and waits until it
// owns the diversion (status says intercepting), or fails if the process
// exits.
func (b *Appliance) StartProxy() error { return b.StartProxyWith("--json") }

// StartProxyWith is StartProxy with these flags for `ghostwire run`
// instead of --json.
func (b *Appliance) StartProxyWith(flags ...string) error {
	p, err := b.Lab.Start(b.Lab.Box, b.Bin, append([]string{"run", "-c", b.Config}, flags...)...)
	if err != nil {
		return err
	}
	b.Proxy = p
	return WaitFor(10*time.Second, func() (bool, error) {
		select {
		case <-p.Done():
			return false, fmt.Errorf("ghostwire run exited: %v\n%s", p.Wait(), p.Stderr())
		default:
		}
		st, err := b.Status()
		return err == nil && st == "ghostwire: intercepting", nil
	})
}

// StopProxy signals the proxy and waits for it to exit.
func (b *Appliance) StopProxy(sig syscall.Signal) error {
	if b.Proxy == nil {
		return errors.New("proxy not started")
	}
	return b.Proxy.Stop(sig, 20*time.Second)
}

// LogLine is one JSON log record of `ghostwire run --json`.
type LogLine map[string]any

// ProxyLog parses the proxy's JSON log lines so far, keeping those with msg.
func (b *Appliance) ProxyLog(msg string) []LogLine {
	var out []LogLine
	if b.Proxy == nil {
		return nil
	}
	sc := bufio.NewScanner(bytes.NewReader(b.Proxy.Stderr()))
	for sc.Scan() {
		var l LogLine
		if json.Unmarshal(sc.Bytes(), &l) == nil && (msg == "" || l["msg"] == msg) {
			out = append(out, l)
		}
	}
	return out
}

// ConnLogFor returns the "connection closed" lines whose client address is
// from (host:port as the proxy saw it).
func (b *Appliance) ConnLogFor(from net.Addr) []LogLine {
	var out []LogLine
	for _, l := range b.ProxyLog("connection closed") {
		if l["client"] == from.String() {
			out = append(out, l)
		}
	}
	return out
}

// WaitFor polls cond with backoff until it is true, it errors, or timeout.
func WaitFor(timeout time.Duration, cond func() (bool, error)) error {
	deadline := time.Now().Add(timeout)
	delay := 5 * time.Millisecond
	for {
		ok, err := cond()
		if err != nil {
			return err
		}
		if ok {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("condition not met within %s", timeout)
		}
		time.Sleep(delay) // polling interval of a bounded readiness loop
		delay = min(delay*2, 200*time.Millisecond)
	}
}

// Listen opens a TCP listener inside ns.
func Listen(ns *NS, network, addr string) (net.Listener, error) {
	var ln net.Listener
	err := ns.Do(func() (err error) {
		ln, err = net.Listen(network, addr)
		return err
	})
	return ln, err
}

// Dial connects from inside ns.
func Dial(ns *NS, network, addr string, timeout time.Duration) (*net.TCPConn, error) {
	var c net.Conn
	err := ns.Do(func() (err error) {
		c, err = net.DialTimeout(network, addr, timeout)
		return err
	})
	if err != nil {
		return nil, err
	}
	return c.(*net.TCPConn), nil
}
