package systemd

import (
	"bufio"
	"fmt"
	"go/ast"
	"go/parser"
	"go/token"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"
)

const (
	runUnit       = "ghostwire.service"
	provisionUnit = "ghostwire-provision.service"
	exampleConfig = "ghostwire.example.yaml"
)

var units = []string{runUnit, provisionUnit}

// unitFile is a parsed unit: section -> key -> values in file order.
type unitFile map[string]map[string][]string

// parseUnit reads the subset of systemd's unit syntax these units use:
// [Section] headers, Key=Value lines, # and ; comments, and lines
// continued with a trailing backslash.
func parseUnit(t *testing.T, path string) unitFile {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	u := unitFile{}
	section := ""
	sc := bufio.NewScanner(f)
	n, cont := 0, ""
	for sc.Scan() {
		n++
		line := strings.TrimSpace(sc.Text())
		if cont != "" {
			line = cont + " " + line
			cont = ""
		}
		if line == "" || line[0] == '#' || line[0] == ';' {
			continue
		}
		if strings.HasSuffix(line, `\`) {
			cont = strings.TrimSuffix(line, `\`)
			continue
		}
		if strings.HasPrefix(line, "[") && strings.HasSuffix(line, "]") {
			section = line[1 : len(line)-1]
			if u[section] == nil {
				u[section] = map[string][]string{}
			}
			continue
		}
		k, v, ok := strings.Cut(line, "=")
		if !ok || section == "" {
			t.Fatalf("%s:%d: not a Key=Value line in a section: %q", path, n, line)
		}
		k = strings.TrimSpace(k)
		u[section][k] = append(u[section][k], strings.TrimSpace(v))
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	return u
}

// last is the effective value of a single-valued setting ("" if unset).
func (u unitFile) last(section, key string) string {
	v := u[section][key]
	if len(v) == 0 {
		return ""
	}
	return v[len(v)-1]
}

// list is the effective value of a space-separated list setting: words
// accumulate, an empty assignment resets.
func (u unitFile) list(section, key string) []string {
	var words []string
	for _, v := range u[section][key] {
		if v == "" {
			words = nil
			continue
		}
		words = append(words, strings.Fields(v)...)
	}
	return words
}

func checkEqual(t *testing.T, unit string, u unitFile, section, key, want string) {
	t.Helper()
	if got := u.last(section, key); got != want {
		t.Errorf("%s: [%s] %s=%q, want %q", unit, section, key, got, want)
	}
}

func checkContains(t *testing.T, unit string, u unitFile, section, key, want string) {
	t.Helper()
	if got := u.list(section, key); !slices.Contains(got, want) {
		t.Errorf("%s: [%s] %s=%q does not contain %q", unit, section, key, got, want)
	}
}

func checkSet(t *testing.T, unit string, u unitFile, section, key string, want ...string) {
	t.Helper()
	got := slices.Clone(u.list(section, key))
	slices.Sort(got)
	want = slices.Clone(want)
	slices.Sort(want)
	if !slices.Equal(got, want) {
		t.Errorf("%s: [%s] %s=%q, want exactly %q", unit, section, key, got, want)
	}
}

// TestRunUnit checks the proxy unit's settings that the binary's behaviour
// relies on: sd_notify readiness, the watchdog, restarts, the stop timeout
// against the drain grace, and its privileges.
func TestRunUnit(t *testing.T) {
	u := parseUnit(t, runUnit)
	s := "Service"
	checkEqual(t, runUnit, u, s, "Type", "notify")
	checkEqual(t, runUnit, u, s, "NotifyAccess", "main")
	checkEqual(t, runUnit, u, s, "ExecStart", "@BINDIR@/ghostwire run -c /etc/ghostwire/ghostwire.yaml")
	checkEqual(t, runUnit, u, s, "ExecReload", "/bin/kill -HUP $MAINPID")
	checkEqual(t, runUnit, u, s, "WatchdogSec", "10s")
	checkEqual(t, runUnit, u, s, "Restart", "always")
	checkEqual(t, runUnit, u, s, "RestartSec", "1s")
	checkEqual(t, runUnit, u, s, "KillMode", "mixed")
	checkEqual(t, runUnit, u, s, "LimitNOFILE", "1048576")
	checkContains(t, runUnit, u, "Unit", "Requires", provisionUnit)
	checkContains(t, runUnit, u, "Unit", "After", provisionUnit)
	checkContains(t, runUnit, u, "Install", "WantedBy", "multi-user.target")

	// The stop timeout must outlast the drain, or systemd SIGKILLs a proxy
	// that is still letting connections finish.
	stop, err := time.ParseDuration(u.last(s, "TimeoutStopSec"))
	if err != nil {
		t.Fatalf("%s: TimeoutStopSec: %v", runUnit, err)
	}
	grace := exampleValue(t, "proxy.shutdown_grace")
	g, err := time.ParseDuration(grace)
	if err != nil {
		t.Fatalf("%s: proxy.shutdown_grace %q: %v", exampleConfig, grace, err)
	}
	if stop <= g {
		t.Errorf("%s: TimeoutStopSec=%s is not above proxy.shutdown_grace=%s", runUnit, stop, g)
	}

	// CAP_NET_ADMIN: owned nftables tables and IP_TRANSPARENT. Nothing
	// else: the default proxy port (9876) needs no CAP_NET_BIND_SERVICE, and
	// nothing loads BPF (no bpf(2) past ~@privileged).
	checkSet(t, runUnit, u, s, "CapabilityBoundingSet", "CAP_NET_ADMIN")
	if filters := u.list(s, "SystemCallFilter"); slices.Contains(filters, "bpf") {
		t.Errorf("%s: SystemCallFilter=%q allows bpf(2), which nothing needs", runUnit, filters)
	}
	if port := exampleValue(t, "proxy.tcp_port"); mustAtoi(t, port) < 1024 {
		t.Errorf("%s: proxy.tcp_port %s < 1024 needs CAP_NET_BIND_SERVICE, which %s does not grant", exampleConfig, port, runUnit)
	}
	checkEqual(t, runUnit, u, s, "ProtectKernelTunables", "yes")
}

// TestProvisionUnit checks the provisioning unit: oneshot, active after
// apply, no diversion of its own, teardown on stop, a writable state
// directory and writable /proc/sys.
func TestProvisionUnit(t *testing.T) {
	u := parseUnit(t, provisionUnit)
	s := "Service"
	checkEqual(t, provisionUnit, u, s, "Type", "oneshot")
	checkEqual(t, provisionUnit, u, s, "RemainAfterExit", "yes")
	start := strings.Fields(u.last(s, "ExecStart"))
	if len(start) < 2 || start[0] != "@BINDIR@/ghostwire" || start[1] != "apply" || !slices.Contains(start, "--no-diversion") {
		t.Errorf("%s: ExecStart=%q, want @BINDIR@/ghostwire apply ... --no-diversion (the diversion is the proxy's to own)", provisionUnit, start)
	}
	checkEqual(t, provisionUnit, u, s, "ExecStop", "@BINDIR@/ghostwire teardown -c /etc/ghostwire/ghostwire.yaml")
	checkEqual(t, provisionUnit, u, s, "StateDirectory", "ghostwire")
	checkSet(t, provisionUnit, u, s, "CapabilityBoundingSet", "CAP_NET_ADMIN")
	checkContains(t, provisionUnit, u, "Unit", "After", "network-pre.target")
	checkContains(t, provisionUnit, u, "Unit", "Wants", "network-pre.target")
	checkContains(t, provisionUnit, u, "Unit", "Before", runUnit)
	checkContains(t, provisionUnit, u, "Unit", "Before", "network-online.target")
	checkContains(t, provisionUnit, u, "Install", "WantedBy", "multi-user.target")

	// apply writes sysctls: /proc/sys must stay writable and visible.
	if v := u.last(s, "ProtectKernelTunables"); v != "" && v != "no" {
		t.Errorf("%s: ProtectKernelTunables=%s makes /proc/sys read-only; apply writes sysctls there", provisionUnit, v)
	}
	if v := u.last(s, "ProcSubset"); v == "pid" {
		t.Errorf("%s: ProcSubset=pid hides /proc/sys; apply writes sysctls there", provisionUnit)
	}
	// The state file must land in the StateDirectory, the one writable path.
	if sf := exampleValue(t, "state_file"); !strings.HasPrefix(sf, "/var/lib/ghostwire/") {
		t.Errorf("%s: state_file %q is outside StateDirectory=ghostwire (/var/lib/ghostwire), read-only under ProtectSystem=strict", exampleConfig, sf)
	}
}

// TestUnitsHardening checks what both units share: hardened, but in the
// host's network namespace with the sockets they need.
func TestUnitsHardening(t *testing.T) {
	for _, name := range units {
		u := parseUnit(t, name)
		s := "Service"
		for key, want := range map[string]string{
			"NoNewPrivileges":         "yes",
			"ProtectSystem":           "strict",
			"ProtectHome":             "yes",
			"PrivateTmp":              "yes",
			"ProtectKernelModules":    "yes",
			"ProtectControlGroups":    "yes",
			"ProtectClock":            "yes",
			"ProtectHostname":         "yes",
			"RestrictNamespaces":      "yes",
			"RestrictRealtime":        "yes",
			"RestrictSUIDSGID":        "yes",
			"LockPersonality":         "yes",
			"MemoryDenyWriteExecute":  "yes",
			"SystemCallArchitectures": "native",
		} {
			checkEqual(t, name, u, s, key, want)
		}
		checkSet(t, name, u, s, "RestrictAddressFamilies", "AF_NETLINK", "AF_UNIX", "AF_INET", "AF_INET6")
		for _, key := range []string{"PrivateNetwork", "PrivateUsers", "IPAddressDeny", "NetworkNamespacePath"} {
			if v := u.last(s, key); v != "" && v != "no" {
				t.Errorf("%s: %s=%s would cut the unit off the host's network", name, key, v)
			}
		}
		for _, key := range []string{"ExecStart", "ExecReload", "ExecStop"} {
			for _, v := range u[s][key] {
				if strings.Contains(v, "ghostwire") && !strings.HasPrefix(v, "@BINDIR@/ghostwire ") {
					t.Errorf("%s: %s=%q: the binary's path must be @BINDIR@/ghostwire (make install substitutes it)", name, key, v)
				}
			}
		}
	}
}

// TestExampleConfigHasEveryKey compares the example config's keys with the
// keys appliance/config.go knows (its `defaults` map), read from the
// source so that a new key without an example fails here.
func TestExampleConfigHasEveryKey(t *testing.T) {
	want := configKeys(t, filepath.Join("..", "appliance", "config.go"))
	got := exampleKeys(t)
	var have []string
	for k := range got {
		have = append(have, k)
	}
	slices.Sort(have)
	for _, k := range want {
		if _, ok := got[k]; !ok {
			t.Errorf("%s lacks key %s", exampleConfig, k)
		}
	}
	for _, k := range have {
		if !slices.Contains(want, k) {
			t.Errorf("%s has key %s, which appliance/config.go does not know (unknown keys are errors)", exampleConfig, k)
		}
	}
}

// configKeys returns the string keys of `var defaults = map[string]any{...}`.
func configKeys(t *testing.T, path string) []string {
	t.Helper()
	f, err := parser.ParseFile(token.NewFileSet(), path, nil, 0)
	if err != nil {
		t.Fatalf("reading the config keys: %v", err)
	}
	var keys []string
	ast.Inspect(f, func(n ast.Node) bool {
		vs, ok := n.(*ast.ValueSpec)
		if !ok || len(vs.Names) != 1 || vs.Names[0].Name != "defaults" || len(vs.Values) != 1 {
			return true
		}
		lit, ok := vs.Values[0].(*ast.CompositeLit)
		if !ok {
			return true
		}
		for _, e := range lit.Elts {
			kv, ok := e.(*ast.KeyValueExpr)
			if !ok {
				continue
			}
			if b, ok := kv.Key.(*ast.BasicLit); ok && b.Kind == token.STRING {
				if k, err := strconv.Unquote(b.Value); err == nil {
					keys = append(keys, k)
				}
			}
		}
		return false
	})
	if len(keys) == 0 {
		t.Fatalf("%s: found no `var defaults = map[string]any{...}` to read the config keys from", path)
	}
	slices.Sort(keys)
	return keys
}

// exampleKeys reads the example YAML's uncommented keys as dotted paths
// with their scalar values (nested by two-space indentation; enough for a
// file whose only nesting is sections and their subsections).
func exampleKeys(t *testing.T) map[string]string {
	t.Helper()
	b, err := os.ReadFile(exampleConfig)
	if err != nil {
		t.Fatal(err)
	}
	keys := map[string]string{}
	keyRE := regexp.MustCompile(`^( *)([a-z_]+):(.*)$`)
	section, sub := "", ""
	for i, line := range strings.Split(string(b), "\n") {
		if strings.TrimSpace(line) == "" || strings.HasPrefix(strings.TrimSpace(line), "#") {
			continue
		}
		if strings.HasPrefix(strings.TrimSpace(line), "- ") {
			continue // list item under the previous key
		}
		m := keyRE.FindStringSubmatch(line)
		if m == nil {
			t.Fatalf("%s:%d: cannot read %q", exampleConfig, i+1, line)
		}
		val, _, _ := strings.Cut(m[3], " #")
		val = strings.TrimSpace(val)
		switch len(m[1]) {
		case 0:
			sub = ""
			if val == "" {
				section = m[2]
				continue
			}
			section = ""
			keys[m[2]] = val
		case 2:
			if section == "" {
				t.Fatalf("%s:%d: indented key outside a section", exampleConfig, i+1)
			}
			sub = ""
			if val == "" {
				sub = m[2] // a subsection, like policy.sni
				continue
			}
			keys[section+"."+m[2]] = val
		case 4:
			if sub == "" {
				t.Fatalf("%s:%d: doubly indented key outside a subsection", exampleConfig, i+1)
			}
			keys[section+"."+sub+"."+m[2]] = val
		default:
			t.Fatalf("%s:%d: unexpected indentation", exampleConfig, i+1)
		}
	}
	return keys
}

func exampleValue(t *testing.T, key string) string {
	t.Helper()
	v, ok := exampleKeys(t)[key]
	if !ok {
		t.Fatalf("%s has no %s", exampleConfig, key)
	}
	return v
}

func mustAtoi(t *testing.T, s string) int {
	t.Helper()
	n, err := strconv.Atoi(s)
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// TestUnitsVerify installs the units with `make install-files` into a
// temporary DESTDIR and runs `systemd-analyze verify` on them, as
// `make verify-units` does. verify needs no running systemd, but it
// insists that ExecStart= binaries exist on this machine, so the install
// gets a stub executable as its binary (verify never runs it), and the
// installed units are checked with their binary path pointed at the
// staged stub. Any output fails: verify reports unknown keys and bad values
// as warnings with exit status 0.
func TestUnitsVerify(t *testing.T) {
	analyze, err := exec.LookPath("systemd-analyze")
	if err != nil {
		t.Skip("systemd-analyze not found; install it to check the units (apt-get install systemd)")
	}
	mk, err := exec.LookPath("make")
	if err != nil {
		t.Skip("make not found; it installs the units (apt-get install make)")
	}
	tmp := t.TempDir()
	stub := filepath.Join(tmp, "stub")
	if err := os.WriteFile(stub, []byte("#!/bin/sh\nexit 0\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	root := filepath.Join(tmp, "root")
	const prefix, unitDir, confDir = "/usr", "/etc/systemd/system", "/etc/ghostwire"
	install := exec.Command(mk, "--no-print-directory", "-C", "..", "install-files",
		"DESTDIR="+root, "PREFIX="+prefix, "UNITDIR="+unitDir, "CONFDIR="+confDir, "BIN="+stub)
	// An outer make (make test) must not leak its flags or variables in.
	install.Env = slices.DeleteFunc(os.Environ(), func(kv string) bool {
		for _, p := range []string{"MAKEFLAGS=", "MFLAGS=", "MAKELEVEL=", "MAKEOVERRIDES=", "DESTDIR=", "GNUMAKEFLAGS="} {
			if strings.HasPrefix(kv, p) {
				return true
			}
		}
		return false
	})
	if out, err := install.CombinedOutput(); err != nil {
		t.Fatalf("make install-files: %v\n%s", err, out)
	}

	for _, f := range []string{prefix + "/bin/ghostwire", confDir + "/ghostwire.yaml.example"} {
		if _, err := os.Stat(filepath.Join(root, f)); err != nil {
			t.Errorf("make install-files did not install %s: %v", f, err)
		}
	}
	check := filepath.Join(tmp, "units")
	if err := os.Mkdir(check, 0o755); err != nil {
		t.Fatal(err)
	}
	staged := filepath.Join(root, prefix, "bin", "ghostwire")
	var args []string
	for _, name := range units {
		b, err := os.ReadFile(filepath.Join(root, unitDir, name))
		if err != nil {
			t.Fatalf("make install-files did not install %s: %v", name, err)
		}
		text := string(b)
		if strings.Contains(text, "@BINDIR@") {
			t.Errorf("installed %s still says @BINDIR@", name)
		}
		if !strings.Contains(text, "ExecStart="+prefix+"/bin/ghostwire ") {
			t.Errorf("installed %s does not run %s/bin/ghostwire", name, prefix)
		}
		text = strings.ReplaceAll(text, prefix+"/bin/ghostwire ", staged+" ")
		p := filepath.Join(check, name)
		if err := os.WriteFile(p, []byte(text), 0o644); err != nil {
			t.Fatal(err)
		}
		args = append(args, p)
	}

	cmd := exec.Command(analyze, append([]string{"verify", "--man=no"}, args...)...)
	cmd.Dir = check
	out, err := cmd.CombinedOutput()
	if err != nil || len(strings.TrimSpace(string(out))) > 0 {
		t.Fatalf("systemd-analyze verify %s: %v\n%s", strings.Join(units, " "), exitStatus(err), out)
	}
}

func exitStatus(err error) string {
	if err == nil {
		return "exit status 0 but it printed"
	}
	return fmt.Sprint(err)
}
