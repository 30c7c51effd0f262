package bridge

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
)

// Sysctl is one kernel setting, keyed in dotted form (net.ipv4.ip_forward).
type Sysctl struct {
	Key   string
	Value string
}

// Sysctls are the settings a bridge-mode transparent proxy needs (see
// docs/kernel.md#sysctls):
//   - bridge-nf-call-*=0: br_netfilter defaults them to 1 in every namespace,
//     and with 1 none of the diversion mechanisms work;
//   - forwarding=1: diverted packets with no proxy socket (proxy down,
//     flows older than the diversion) are routed instead of dropped;
//   - send_redirects=0: otherwise those routed packets earn the client an
//     ICMP redirect pointing at the box.
func Sysctls(s Spec) []Sysctl {
	out := []Sysctl{
		{"net.bridge.bridge-nf-call-iptables", "0"},
		{"net.bridge.bridge-nf-call-ip6tables", "0"},
		{"net.bridge.bridge-nf-call-arptables", "0"},
		{"net.ipv4.ip_forward", "1"},
		{"net.ipv6.conf.all.forwarding", "1"},
		{"net.ipv4.conf.all.send_redirects", "0"},
		{"net.ipv4.conf." + s.Name + ".send_redirects", "0"},
	}
	if s.Invisible {
		// The ports have no IPv6 at all: a port with IPv6 sends DAD,
		// MLD and router solicitations from its own MAC, straight out
		// of the port where nothing on br0's egress can stop them.
		// br0 keeps IPv6 (it carries the diverted flows) but takes no
		// router advertisement and configures no address from one.
		for _, p := range s.Ports {
			out = append(out, Sysctl{"net.ipv6.conf." + p + ".disable_ipv6", "1"})
		}
		out = append(out,
			Sysctl{"net.ipv6.conf." + s.Name + ".accept_ra", "0"},
			Sysctl{"net.ipv6.conf." + s.Name + ".autoconf", "0"})
	}
	return out
}

// SysctlFS reads and writes sysctls under Root (normally /proc/sys, which
// shows the network namespace of the calling thread).
type SysctlFS struct {
	Root string
}

func (f SysctlFS) path(key string) string {
	root := f.Root
	if root == "" {
		root = "/proc/sys"
	}
	// Interface names may contain dots, so only the fixed prefix is split:
	// net.ipv4.conf.<ifname>.send_redirects.
	parts := strings.Split(key, ".")
	if len(parts) >= 5 && parts[0] == "net" && parts[2] == "conf" {
		ifname := strings.Join(parts[3:len(parts)-1], ".")
		parts = []string{parts[0], parts[1], parts[2], ifname, parts[len(parts)-1]}
	}
	return filepath.Join(append([]string{root}, parts...)...)
}

// Get returns the current value. ErrNotExist (wrapped) when the key is absent,
// e.g. for an interface that does not exist yet.
func (f SysctlFS) Get(key string) (string, error) {
	b, err := os.ReadFile(f.path(key))
	if err != nil {
		return "", fmt.Errorf("reading sysctl %s: %w", key, err)
	}
	return strings.TrimSpace(string(b)), nil
}

// Set writes value unless it is already there.
func (f SysctlFS) Set(key, value string) error {
	if cur, err := f.Get(key); err == nil && cur == value {
		return nil
	}
	if err := os.WriteFile(f.path(key), []byte(value), 0o644); err != nil {
		return fmt.Errorf("setting sysctl %s=%s: %w", key, value, err)
	}
	return nil
}

// IsNotExist reports whether err says a sysctl key is absent.
func IsNotExist(err error) bool { return errors.Is(err, fs.ErrNotExist) }
