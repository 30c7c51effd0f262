package provision

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"net/netip"
	"os"
	"path/filepath"

	"github.com/ghostwire/ghostwire/bridge"
	"github.com/ghostwire/ghostwire/rules"
)

// State records what apply created and what it changed, so that teardown
// removes exactly that and restores the rest, even if the config file has
// changed since.
type State struct {
	Version       int                `json:"version"`
	Bridge        string             `json:"bridge"`
	BridgeSpec    bridgeSpecJSON     `json:"bridge_spec"`
	CreatedBridge bool               `json:"created_bridge"`
	Ports         []bridge.PortState `json:"ports"`
	Sysctls       map[string]string  `json:"sysctls"` // value before the first apply
	Routing       rules.Routing      `json:"routing"`
	Tables        string             `json:"tables"`
}

type bridgeSpecJSON struct {
	Ports     []string `json:"ports"`
	Addresses []string `json:"addresses,omitempty"`
	Routes    []string `json:"routes,omitempty"`
	Invisible bool     `json:"invisible,omitempty"`
}

// newBridgeSpecJSON records spec in the words of the config it came from
// (bridge.Route and netip.Prefix print what their parsers read back).
func newBridgeSpecJSON(spec bridge.Spec) bridgeSpecJSON {
	j := bridgeSpecJSON{Ports: spec.Ports, Invisible: spec.Invisible}
	for _, a := range spec.Addresses {
		j.Addresses = append(j.Addresses, a.String())
	}
	for _, r := range spec.Routes {
		j.Routes = append(j.Routes, r.String())
	}
	return j
}

// spec is the bridge apply built, as the state file records it.
func (s *State) spec() (bridge.Spec, error) {
	spec := bridge.Spec{Name: s.Bridge, Ports: s.BridgeSpec.Ports, Invisible: s.BridgeSpec.Invisible}
	for _, a := range s.BridgeSpec.Addresses {
		p, err := netip.ParsePrefix(a)
		if err != nil {
			return spec, fmt.Errorf("address %q: %w", a, err)
		}
		spec.Addresses = append(spec.Addresses, p)
	}
	for _, r := range s.BridgeSpec.Routes {
		rt, err := bridge.ParseRoute(r)
		if err != nil {
			return spec, err
		}
		spec.Routes = append(spec.Routes, rt)
	}
	return spec, spec.Validate()
}

const stateVersion = 1

// loadState returns the state at path, or nil if there is none.
func loadState(path string) (*State, error) {
	b, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	} else if err != nil {
		return nil, fmt.Errorf("reading state file: %w", err)
	}
	var s State
	if err := json.Unmarshal(b, &s); err != nil {
		return nil, fmt.Errorf("state file %s is corrupt (%v): inspect it, then remove it to start afresh", path, err)
	}
	if s.Version != stateVersion {
		return nil, fmt.Errorf("state file %s has version %d, this ghostwire understands %d", path, s.Version, stateVersion)
	}
	return &s, nil
}

// save writes atomically: a crash mid-write must not lose the original
// sysctl values.
func (s *State) save(path string) error {
	b, err := json.MarshalIndent(s, "", "  ")
	if err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return fmt.Errorf("creating state directory: %w", err)
	}
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, append(b, '\n'), 0o644); err != nil {
		return fmt.Errorf("writing state file: %w", err)
	}
	if err := os.Rename(tmp, path); err != nil {
		return fmt.Errorf("writing state file: %w", err)
	}
	return nil
}
