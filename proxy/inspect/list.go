package inspect

import (
	"fmt"
	"strings"
)

// List is a set of server names: exact host names, IP addresses, and
// "*.suffix" wildcards, which match any name with at least one more label
// ("*.example.com" matches a.example.com and a.b.example.com, not
// example.com). The zero List is empty and matches nothing. A List is
// never changed after NewList, so it may be shared between goroutines.
type List struct {
	exact    map[string]struct{}
	suffixes map[string]struct{} // ".example.com" for "*.example.com"
	n        int
}

// NewList checks and compiles names. Entries are case-insensitive and may
// end in a dot; an error names the first bad entry and what is wrong.
func NewList(names []string) (List, error) {
	l := List{exact: map[string]struct{}{}, suffixes: map[string]struct{}{}}
	for _, e := range names {
		rest, wild := strings.CutPrefix(e, "*.")
		if strings.Contains(rest, "*") {
			return List{}, fmt.Errorf("name list entry %q: a wildcard may only be a whole first label, as in *.example.com", e)
		}
		if wild {
			s, err := hostname(rest)
			if err != nil {
				return List{}, fmt.Errorf("name list entry %q: %v", e, err)
			}
			l.suffixes["."+s] = struct{}{}
			continue
		}
		s, err := hostOrAddr(e)
		if err != nil {
			return List{}, fmt.Errorf("name list entry %q: %v", e, err)
		}
		l.exact[s] = struct{}{}
	}
	l.n = len(l.exact) + len(l.suffixes)
	return l, nil
}

// Len is the number of distinct entries.
func (l List) Len() int { return l.n }

// Match reports whether name is in the list, ignoring case and a trailing
// dot.
func (l List) Match(name string) bool {
	_, ok := l.match(name)
	return ok
}

// match returns the entry that matches name, as written in the list's
// canonical form, for log lines.
func (l List) match(name string) (string, bool) {
	if l.n == 0 || name == "" {
		return "", false
	}
	name, err := hostOrAddr(name)
	if err != nil {
		// Not a name a list can hold, so it matches no entry.
		return "", false
	}
	if _, ok := l.exact[name]; ok {
		return name, true
	}
	// Try every suffix that leaves at least one label in front of it.
	for i := 1; i < len(name); i++ {
		if name[i] != '.' {
			continue
		}
		if _, ok := l.suffixes[name[i:]]; ok {
			return "*" + name[i:], true
		}
	}
	return "", false
}
