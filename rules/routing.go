package rules

import (
	"errors"
	"fmt"
	"net"
	"slices"
	"strings"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/ghostwire/ghostwire/bridge"
)

// Routing is the policy routing that delivers TPROXYed (marked) packets to
// local sockets: in IPv4 and IPv6, a rule `fwmark Mark lookup Table` at
// Priority, and in Table a `local` default route via lo. The table and the
// priority are ghostwire's own; nothing else of the host is touched.
type Routing struct {
	Mark     uint32 `json:"mark"`
	Table    int    `json:"table"`
	Priority int    `json:"priority"`
}

// routeItem is one rule or route of the routing, in apply order.
type routeItem struct {
	family int // unix.AF_INET or unix.AF_INET6
	rule   bool
}

// items lists the routes before the rules that point at them, so that a
// marked packet never meets a rule whose table is still empty.
var items = [...]routeItem{
	{family: unix.AF_INET}, {family: unix.AF_INET6},
	{family: unix.AF_INET, rule: true}, {family: unix.AF_INET6, rule: true},
}

// String renders the routing as the iproute2 commands that create it, one a
// line, in the order Apply adds them.
func (r Routing) String() string {
	var b strings.Builder
	for _, it := range items {
		b.WriteString(r.describe(it))
		b.WriteString("\n")
	}
	return b.String()
}

func (r Routing) describe(it routeItem) string {
	ip := "ip"
	if it.family == unix.AF_INET6 {
		ip = "ip -6"
	}
	if it.rule {
		return fmt.Sprintf("%s rule add fwmark %#x lookup %d pref %d", ip, r.Mark, r.Table, r.Priority)
	}
	dst := "0.0.0.0/0"
	if it.family == unix.AF_INET6 {
		dst = "::/0"
	}
	return fmt.Sprintf("%s route add local %s dev lo table %d", ip, dst, r.Table)
}

// validate is the one place the routing's rules live: NewPlan uses it for
// a Config's fields, and a Routing read back from a state file is checked
// the same way. Each problem is a FieldError named for the Config field.
func (r Routing) validate() error {
	var errs []error
	if r.Mark == 0 {
		errs = append(errs, fieldErr("Mark", "must be non-zero (0 is every unmarked packet)"))
	}
	if r.Table < 1 || r.Table > maxRouteTable {
		errs = append(errs, fieldErr("RouteTable", "%d is out of range 1..%d", r.Table, maxRouteTable))
	} else if name, ok := reservedTables[r.Table]; ok {
		errs = append(errs, fieldErr("RouteTable", "%d is the kernel's %s table", r.Table, name))
	}
	if r.Priority < 1 || r.Priority > maxRulePrio {
		errs = append(errs, fieldErr("RulePriority", "%d is out of range 1..%d (0 is the local rule, 32766 main)", r.Priority, maxRulePrio))
	}
	if len(errs) > 0 {
		return fmt.Errorf("invalid policy routing: %w", errors.Join(errs...))
	}
	return nil
}

// Apply adds whatever of the routing is missing (routes first, then rules)
// and leaves what is already there, so it is idempotent. If a step fails it
// removes what this call added before returning the error.
func (r Routing) Apply(h *netlink.Handle) (err error) {
	if err := r.validate(); err != nil {
		return err
	}
	lo, err := loopback(h)
	if err != nil {
		return err
	}
	var added []routeItem
	defer func() {
		if err == nil {
			return
		}
		for _, it := range slices.Backward(added) {
			if rerr := r.del(h, it, lo); rerr != nil {
				err = errors.Join(err, fmt.Errorf("rolling back %q: %w", r.describe(it), rerr))
			}
		}
	}()
	for _, it := range items {
		ok, err := r.present(h, it, lo)
		if err != nil {
			return err
		}
		if ok {
			continue
		}
		if err := r.add(h, it, lo); err != nil && !errors.Is(err, unix.EEXIST) {
			return fmt.Errorf("adding policy routing %q: %w", r.describe(it), err)
		}
		added = append(added, it)
	}
	return nil
}

// Remove deletes ghostwire's rules (those at Priority with Mark and Table,
// in both families) and the local default routes in Table, rules first.
// What is already gone is fine, so it is safe to repeat. It carries on past
// errors and returns them all.
func (r Routing) Remove(h *netlink.Handle) error {
	if err := r.validate(); err != nil {
		return err
	}
	lo, err := loopback(h)
	if err != nil {
		return err
	}
	var errs []error
	for _, it := range slices.Backward(items[:]) {
		if err := r.del(h, it, lo); err != nil {
			errs = append(errs, fmt.Errorf("removing policy routing %q: %w", r.describe(it), err))
		}
	}
	return errors.Join(errs...)
}

// Check describes each rule or route of the routing that is missing, one per
// string (empty: all in place).
func (r Routing) Check(h *netlink.Handle) ([]string, error) {
	if err := r.validate(); err != nil {
		return nil, err
	}
	lo, err := loopback(h)
	if err != nil {
		return nil, err
	}
	var drift []string
	for _, it := range items {
		ok, err := r.present(h, it, lo)
		if err != nil {
			return nil, err
		}
		if !ok {
			drift = append(drift, fmt.Sprintf("policy routing missing: %s", r.describe(it)))
		}
	}
	return drift, nil
}

func loopback(h *netlink.Handle) (int, error) {
	lo, err := h.LinkByName("lo")
	if err != nil {
		return 0, fmt.Errorf("looking up lo for policy routing: %w", err)
	}
	return lo.Attrs().Index, nil
}

func (r Routing) present(h *netlink.Handle, it routeItem, lo int) (bool, error) {
	if it.rule {
		rules, err := r.ownRules(h, it.family)
		return len(rules) > 0, err
	}
	routes, err := r.ownRoutes(h, it.family, lo)
	return len(routes) > 0, err
}

func (r Routing) add(h *netlink.Handle, it routeItem, lo int) error {
	if it.rule {
		return h.RuleAdd(r.rule(it.family))
	}
	return h.RouteAdd(r.route(it.family, lo))
}

// del removes every instance of the item (duplicates included).
func (r Routing) del(h *netlink.Handle, it routeItem, lo int) error {
	if it.rule {
		rules, err := r.ownRules(h, it.family)
		if err != nil {
			return err
		}
		for range rules {
			// The kernel deletes the first rule matching the given
			// selectors: priority, mark and table identify ours.
			if err := h.RuleDel(r.rule(it.family)); err != nil && !errors.Is(err, unix.ENOENT) {
				return err
			}
		}
		return nil
	}
	routes, err := r.ownRoutes(h, it.family, lo)
	if err != nil {
		return err
	}
	for _, rt := range routes {
		if err := h.RouteDel(&rt); err != nil && !errors.Is(err, unix.ESRCH) && !errors.Is(err, unix.ENOENT) {
			return err
		}
	}
	return nil
}

func (r Routing) rule(family int) *netlink.Rule {
	rule := netlink.NewRule()
	rule.Family = family
	rule.Priority = r.Priority
	rule.Mark = r.Mark
	rule.Table = r.Table
	return rule
}

func (r Routing) route(family, lo int) *netlink.Route {
	return &netlink.Route{
		LinkIndex: lo,
		Dst:       defaultDst(family),
		Type:      unix.RTN_LOCAL,
		Table:     r.Table,
		Scope:     netlink.SCOPE_HOST,
		Protocol:  unix.RTPROT_BOOT, // what `ip route add` uses; ip shows no "proto"
	}
}

func defaultDst(family int) *net.IPNet {
	if family == unix.AF_INET6 {
		return &net.IPNet{IP: net.IPv6zero, Mask: net.CIDRMask(0, 128)}
	}
	return &net.IPNet{IP: net.IPv4zero.To4(), Mask: net.CIDRMask(0, 32)}
}

// ownRules lists the family's rules that are ghostwire's: same priority, mark
// and table (matched loosely on purpose, so a later version can change the
// mask or other details and still clean up).
func (r Routing) ownRules(h *netlink.Handle, family int) ([]netlink.Rule, error) {
	all, err := bridge.RetryDump(func() ([]netlink.Rule, error) { return h.RuleList(family) })
	if err != nil {
		return nil, fmt.Errorf("listing policy rules: %w", err)
	}
	return slices.DeleteFunc(all, func(x netlink.Rule) bool {
		return x.Priority != r.Priority || x.Mark != r.Mark || x.Table != r.Table
	}), nil
}

// ownRoutes lists the family's local default routes via lo in Table.
func (r Routing) ownRoutes(h *netlink.Handle, family, lo int) ([]netlink.Route, error) {
	all, err := bridge.RetryDump(func() ([]netlink.Route, error) {
		return h.RouteListFiltered(family, &netlink.Route{Table: r.Table}, netlink.RT_FILTER_TABLE)
	})
	if err != nil {
		return nil, fmt.Errorf("listing routes of table %d: %w", r.Table, err)
	}
	return slices.DeleteFunc(all, func(x netlink.Route) bool {
		isDefault := x.Dst == nil
		if x.Dst != nil {
			ones, _ := x.Dst.Mask.Size()
			isDefault = ones == 0 && x.Dst.IP.IsUnspecified()
		}
		return x.Table != r.Table || x.Type != unix.RTN_LOCAL || x.LinkIndex != lo || !isDefault
	}), nil
}
