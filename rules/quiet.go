package rules

import (
	"errors"
	"fmt"
	"net"
	"slices"
	"strings"

	"github.com/google/nftables"
	"golang.org/x/sys/unix"

	"github.com/ghostwire/ghostwire/bridge"
)

// Quiet is the quiet table of an invisible box, `table netdev NAME_quiet`:
// one chain on the bridge's egress, after the invisible plan's br_out
// (priority 100 against br_out's 0), that drops every frame still
// carrying the bridge's MAC as source. br_out rewrites the source of every
// frame it can answer for, so what is left is what the box would say of
// its own: ARP, neighbour discovery, MLD and IGMP (counted by kind), and
// frames to hosts it has not learned (or ICMP errors from addresses no map
// holds).
//
// Unlike the plan's tables it is neither owned nor the proxy's: the
// provisioner applies it before the bridge is first brought up (the bridge
// sends MLD reports as soon as it is up) and removes it at teardown, so the
// box stays silent while no proxy runs too. Without a running invisible
// plan the box then cannot send anything through the bridge at all, which
// is the point: install it only on a box provisioned invisible.
type Quiet struct {
	Name      string           // ghostwire's table name (Config.Name); the table is Name + "_quiet"
	Bridge    string           // the bridge device whose egress is hooked
	BridgeMAC net.HardwareAddr // the bridge's MAC: the frames that keep it are dropped
}

const (
	quietSuffix = "_quiet"
	chainMute   = "mute"
)

// TableName is the quiet table's name: Name + "_quiet".
func (q Quiet) TableName() string { return q.Name + quietSuffix }

// Validate checks q without touching the kernel. Every error is a
// FieldError naming the offending field.
func (q Quiet) Validate() error {
	var errs []error
	bad := func(field, format string, a ...any) { errs = append(errs, fieldErr(field, format, a...)) }
	q.checkName(bad)
	if err := bridge.ValidIfName(q.Bridge); err != nil {
		bad("Bridge", "%w", err)
	}
	checkMAC(q.BridgeMAC, bad)
	if len(errs) > 0 {
		return fmt.Errorf("invalid quiet table config: %w", errors.Join(errs...))
	}
	return nil
}

// checkName reports, through bad, a Name whose quiet table name is not a
// valid table name.
func (q Quiet) checkName(bad func(field, format string, a ...any)) {
	if err := validTableName(q.Name); err != nil {
		bad("Name", "%w", err)
	} else if err := validTableName(q.TableName()); err != nil {
		bad("Name", "quiet table: %w", err)
	}
}

// nameErr is checkName's error, for the methods that need only Name.
func (q Quiet) nameErr() error {
	var errs []error
	q.checkName(func(field, format string, a ...any) { errs = append(errs, fieldErr(field, format, a...)) })
	return errors.Join(errs...)
}

// table describes the quiet table.
func (q Quiet) table() table {
	mac := etherSaddrIs(slices.Clone(q.BridgeMAC))
	return table{family: nftables.TableFamilyNetdev, chains: []chain{{
		name: chainMute, hook: hookEgress, prio: prio100, device: q.Bridge, rules: []rule{
			counted("box arp", rule{mac, metaProtocolIs(unix.ETH_P_ARP), drop{}}),
			counted("box ndp", rule{mac, icmp6TypeIn(icmp6NDP), drop{}}),
			counted("box mld", rule{mac, icmp6TypeIn(icmp6MLD), drop{}}),
			counted("box igmp", rule{mac, ipProtocolIs(l4IGMP), drop{}}),
			counted("box other", rule{mac, drop{}}),
		},
	}}}
}

// String renders the quiet table as `nft list table netdev NAME_quiet`
// lists it (ending in "}\n"); it parses back with `nft -f`.
func (q Quiet) String() string {
	var b strings.Builder
	q.table().render(&b, q.TableName())
	return b.String()
}

// existing is the quiet table if it exists (by family: netdev or none).
func (q Quiet) existing(c *nftables.Conn) (map[nftables.TableFamily]*nftables.Table, error) {
	return listTables(c, q.TableName(), []nftables.TableFamily{nftables.TableFamilyNetdev})
}

// Apply installs the quiet table in one atomic batch, replacing one that
// exists in place (a changed MAC or bridge is one batch, no gap), so it is
// idempotent. The bridge need not be up. On 6.18 it need not even exist
// yet (the hook attaches when a device of that name appears); older
// kernels refuse a netdev chain for a missing device.
func (q Quiet) Apply(c *nftables.Conn) error {
	if err := q.Validate(); err != nil {
		return err
	}
	existing, err := q.existing(c)
	if err != nil {
		return fmt.Errorf("applying nftables table netdev %s: %w", q.TableName(), err)
	}
	if err := replaceTables(c, q.TableName(), []table{q.table()}, 0, existing); err != nil {
		return fmt.Errorf("applying nftables table netdev %s: %w", q.TableName(), err)
	}
	return nil
}

// Remove deletes the quiet table. An absent table is fine, so it is safe to
// repeat; only Name is used.
func (q Quiet) Remove(c *nftables.Conn) error {
	if err := q.nameErr(); err != nil {
		return fmt.Errorf("removing the quiet table: %w", err)
	}
	existing, err := q.existing(c)
	if err != nil {
		return fmt.Errorf("removing nftables table netdev %s: %w", q.TableName(), err)
	}
	t := existing[nftables.TableFamilyNetdev]
	if t == nil {
		return nil
	}
	queueDelete(c, q.TableName(), nftables.TableFamilyNetdev, t)
	if err := c.Flush(); err != nil {
		return fmt.Errorf("removing nftables table netdev %s: %w", q.TableName(), explainOwned(err, existing))
	}
	return nil
}

// Check compares the kernel's quiet table with q, as Plan.Check does for
// the plan's tables: empty means it is in place. The chain's device is not
// compared (see Plan.Check).
func (q Quiet) Check(c *nftables.Conn) ([]string, error) {
	if err := q.Validate(); err != nil {
		return nil, err
	}
	existing, err := q.existing(c)
	if err != nil {
		return nil, fmt.Errorf("checking nftables table netdev %s: %w", q.TableName(), err)
	}
	return checkTables(c, q.TableName(), []table{q.table()}, existing)
}

// Counters reads the counters of the quiet table's rules (Table "quiet",
// Rule "box arp", "box ndp", "box mld", "box igmp", "box other"): what the
// box tried to say and did not. No table gives no counters, not an error;
// only Name is used.
func (q Quiet) Counters(c *nftables.Conn) ([]RuleCounter, error) {
	if err := q.nameErr(); err != nil {
		return nil, fmt.Errorf("reading the quiet table's counters: %w", err)
	}
	existing, err := q.existing(c)
	if err != nil {
		return nil, err
	}
	return countersOf(c, q.TableName(), existing, func(nftables.TableFamily) string { return "quiet" })
}
