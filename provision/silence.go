package provision

import (
	"fmt"

	"github.com/ghostwire/ghostwire/bridge"
)

// readSilence fills what checkInvisible needs, for an invisible bridge.
func (b *Box) readSilence(d *Desired, cf *CheckFacts) error {
	cf.Invisible = d.Bridge.Invisible
	if !cf.Invisible || d.Quiet == nil {
		return nil
	}
	links, err := bridge.ReadLinks(b.Netlink, d.Bridge.Name)
	if err != nil {
		return err
	}
	if br, ok := links[d.Bridge.Name]; ok {
		cf.Speaking = append(cf.Speaking, d.Bridge.Speaking(br)...)
	}
	for _, p := range d.Bridge.Ports {
		key := "net.ipv6.conf." + p + ".disable_ipv6"
		if v, ok := cf.Sysctls[key]; ok && v != "1" {
			cf.Speaking = append(cf.Speaking, fmt.Sprintf("port %s has IPv6 on (%s = %s)", p, key, v))
		}
	}
	drift, err := d.Quiet.Check(b.NFT)
	if err != nil {
		return fmt.Errorf("checking the quiet table: %w", err)
	}
	cf.Speaking = append(cf.Speaking, drift...)
	counters, err := d.Quiet.Counters(b.NFT)
	if err != nil {
		return fmt.Errorf("reading the quiet table's counters: %w", err)
	}
	for _, c := range counters {
		cf.Silenced += c.Packets
	}
	return nil
}

// checkInvisible: with bridge.invisible, everything that keeps the box
// from speaking on the wire is in place.
func checkInvisible(f CheckFacts) []Result {
	if !f.Invisible {
		return []Result{{Found: "bridge.invisible is off: the box answers ARP and NDP and its frames carry its own MACs"}}
	}
	var out []Result
	for _, s := range f.Speaking {
		out = append(out, Result{Level: Fail, Found: s + ": the box can send frames of its own", Fix: "ghostwire apply"})
	}
	if len(out) > 0 {
		return out
	}
	return []Result{{Found: fmt.Sprintf("silent: %s has arp off and no link-local address, the ports have IPv6 off, the quiet table is in place (%d frames of the box's own dropped)", f.Bridge, f.Silenced)}}
}
