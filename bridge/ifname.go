package bridge

import (
	"errors"
	"fmt"
	"strings"
)

// maxIfName is IFNAMSIZ - 1.
const maxIfName = 15

// ValidIfName is the one rule for interface names ghostwire accepts, for
// the bridge and its NICs here and for the nftables rules that name them:
// the kernel's dev_valid_name, plus what nft text cannot carry unescaped.
func ValidIfName(name string) error {
	switch {
	case name == "":
		return errors.New("interface name is empty")
	case len(name) > maxIfName:
		return fmt.Errorf("interface name %q is longer than %d bytes (IFNAMSIZ)", name, maxIfName)
	case name == "." || name == "..":
		return fmt.Errorf("interface name %q is not allowed", name)
	case strings.ContainsAny(name, "/:\"\\*") || strings.ContainsFunc(name, func(r rune) bool { return r <= ' ' || r >= 0x7f }):
		// '"', '\\' and '*' are legal for the kernel, but nft text would
		// need escapes for them ('*' is nft's interface wildcard).
		return fmt.Errorf("interface name %q contains '/', ':', '*', a quote, a backslash, whitespace or a non-ASCII byte", name)
	}
	return nil
}
