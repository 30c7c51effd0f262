package appliance

import (
	"github.com/ghostwire/ghostwire/provision"
)

// The commands below read the kernel facts c depends on once, compute the
// desired state from them (Desire) and hand that to the provisioner.

// Facts reads what c's desired state depends on in b's kernel.
func Facts(b *provision.Box, c *Config) (provision.Facts, error) {
	spec, err := c.BridgeSpec()
	if err != nil {
		return provision.Facts{}, err
	}
	return b.Facts(spec)
}

// Plan is everything apply would do, without changing anything; it refuses
// what apply would refuse (see Preflight).
func Plan(b *provision.Box, c *Config) (*provision.Desired, error) {
	f, err := Facts(b, c)
	if err != nil {
		return nil, err
	}
	if err := Preflight(c, f); err != nil {
		return nil, err
	}
	return Desire(c, f)
}

// Apply provisions the box as c asks (see provision.Box.Apply).
func Apply(b *provision.Box, c *Config, opts provision.ApplyOptions) error {
	d, err := Plan(b, c)
	if err != nil {
		return err
	}
	return b.Apply(d, c.StateFile, opts)
}

// Teardown undoes what apply did (see provision.Box.Teardown).
func Teardown(b *provision.Box, c *Config) error {
	d, _, err := desired(b, c)
	if err != nil {
		return err
	}
	return b.Teardown(d, c.StateFile)
}

// Status compares the kernel with what c asks for.
func Status(b *provision.Box, c *Config) (*provision.Status, error) {
	d, f, err := desired(b, c)
	if err != nil {
		return nil, err
	}
	return b.Status(d, f, c.StateFile)
}

// desired is c's desired state on b and the facts it was computed from,
// not refusing anything: status and teardown face a box that may be
// provisioned or drifted.
func desired(b *provision.Box, c *Config) (*provision.Desired, provision.Facts, error) {
	f, err := Facts(b, c)
	if err != nil {
		return nil, f, err
	}
	d, err := Desire(c, f)
	return d, f, err
}
