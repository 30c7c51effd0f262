package appliance

import (
	"github.com/ghostwire/ghostwire/provision"
)

// Check reads b as c describes it (changing nothing) and runs
// provision.Checks on it: `ghostwire check`.
func Check(b *provision.Box, c *Config) ([]provision.Result, error) {
	d, _, err := desired(b, c)
	if err != nil {
		return nil, err
	}
	f, err := b.CheckFacts(d, c.StateFile, c.Proxy.TCPPort)
	if err != nil {
		return nil, err
	}
	f.ControlSocket = c.ControlSocket
	if r, err := Control(c.ControlSocket, ControlRequest{Cmd: "stats"}); err == nil && r.OK {
		f.DaemonAnswers = true
		f.Restored = r.Restored
	}
	return provision.RunChecks(f), nil
}
