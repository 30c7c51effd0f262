package appliance

import "testing"

func TestParseByteSize(t *testing.T) {
	for in, want := range map[string]ByteSize{
		"4MiB": 4 << 20, "512KiB": 512 << 10, "1GiB": 1 << 30, "100B": 100, "4194304": 4 << 20, " 2 MiB ": 2 << 20, "0": 0,
	} {
		if got, err := ParseByteSize(in); err != nil || got != want {
			t.Errorf("ParseByteSize(%q) = %d, %v; want %d", in, got, err, want)
		}
	}
	for _, in := range []string{"", "4MB", "-1", "1.5MiB", "MiB", "99999999999GiB"} {
		if got, err := ParseByteSize(in); err == nil {
			t.Errorf("ParseByteSize(%q) = %d, want an error", in, got)
		}
	}
	if s := ByteSize(4 << 20).String(); s != "4MiB" {
		t.Errorf("String() = %q", s)
	}
}
