package provision

import (
	"encoding/json"
	"net/netip"
	"os"
	"path/filepath"
	"reflect"
	"testing"

	"github.com/ghostwire/ghostwire/bridge"
	"github.com/ghostwire/ghostwire/rules"
)

// A state file written by the ghostwire before the desired state (it kept
// the config's own spelling, "2001:DB8::fe/64") must still tear down.
func TestStateFromEarlierGhostwire(t *testing.T) {
	st, err := loadState("testdata/state-before-desired.json")
	if err != nil {
		t.Fatal(err)
	}
	spec, err := st.spec()
	if err != nil {
		t.Fatal(err)
	}
	want := bridge.Spec{
		Name:      "gwbr",
		Ports:     []string{"gwc", "gws"},
		Addresses: []netip.Prefix{netip.MustParsePrefix("192.0.2.254/24"), netip.MustParsePrefix("2001:db8::fe/64")},
		Routes: []bridge.Route{
			{Dst: netip.MustParsePrefix("198.51.100.0/24"), Via: netip.MustParseAddr("192.0.2.1")},
			{Dst: netip.MustParsePrefix("0.0.0.0/0"), Via: netip.MustParseAddr("192.0.2.1")},
			{Dst: netip.MustParsePrefix("2001:db8:1::/48")},
		},
	}
	if !reflect.DeepEqual(spec, want) {
		t.Errorf("spec = %+v\nwant %+v", spec, want)
	}
	if st.Routing != (rules.Routing{Mark: 42, Table: 200, Priority: 900}) || st.Tables != "ghostwire" || !st.CreatedBridge {
		t.Errorf("state = %+v", st)
	}
	if len(st.Ports) != 2 || st.Ports[0] != (bridge.PortState{Name: "gwc"}) || st.Ports[1] != (bridge.PortState{Name: "gws", Up: true}) {
		t.Errorf("ports = %+v", st.Ports)
	}
}

// What apply records of a spec reads back as the same spec, and keeps the
// keys and layout teardown of older versions reads.
func TestStateRoundTrip(t *testing.T) {
	spec, err := (&State{Bridge: "br0", BridgeSpec: bridgeSpecJSON{
		Ports:     []string{"eth0", "eth1"},
		Addresses: []string{"192.0.2.254/24", "2001:db8::fe/64"},
		Routes:    []string{"default via 192.0.2.1", "2001:db8:1::/48", "default via 2001:db8::1"},
	}}).spec()
	if err != nil {
		t.Fatal(err)
	}
	st := &State{Version: stateVersion, Bridge: spec.Name, BridgeSpec: newBridgeSpecJSON(spec), Sysctls: map[string]string{}}
	path := filepath.Join(t.TempDir(), "state.json")
	if err := st.save(path); err != nil {
		t.Fatal(err)
	}
	raw, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var keys map[string]json.RawMessage
	if err := json.Unmarshal(raw, &keys); err != nil {
		t.Fatal(err)
	}
	for _, k := range []string{"version", "bridge", "bridge_spec", "created_bridge", "ports", "sysctls", "routing", "tables"} {
		if _, ok := keys[k]; !ok {
			t.Errorf("state file lacks %q:\n%s", k, raw)
		}
	}
	back, err := loadState(path)
	if err != nil {
		t.Fatal(err)
	}
	got, err := back.spec()
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(got, spec) {
		t.Errorf("read back %+v\nwant %+v", got, spec)
	}
}
