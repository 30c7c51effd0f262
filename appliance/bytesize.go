package appliance

import (
	"fmt"
	"reflect"
	"strconv"
	"strings"
)

// ByteSize is a config value in bytes, written as a number or with a
// binary unit: 4194304, "4MiB", "512KiB".
type ByteSize int64

// Limits of proxy.receive_buffer: below 64 KiB a LAN flow crawls; above
// 1 GiB the kernel's int arithmetic (it doubles the value) overflows.
const (
	minReceiveBuffer = 64 << 10
	maxReceiveBuffer = 1 << 30
)

var byteUnits = []struct {
	suffix string
	mult   int64
}{{"GiB", 1 << 30}, {"MiB", 1 << 20}, {"KiB", 1 << 10}, {"B", 1}}

// ParseByteSize reads "4MiB", "512KiB", "1GiB", "100B" or a plain number.
func ParseByteSize(s string) (ByteSize, error) {
	t := strings.TrimSpace(s)
	mult := int64(1)
	for _, u := range byteUnits {
		if strings.HasSuffix(t, u.suffix) {
			t, mult = strings.TrimSpace(strings.TrimSuffix(t, u.suffix)), u.mult
			break
		}
	}
	n, err := strconv.ParseInt(t, 10, 64)
	if err != nil || n < 0 || n > (1<<62)/mult {
		return 0, fmt.Errorf("%q is not a size (a whole number of bytes, or with KiB, MiB or GiB)", s)
	}
	return ByteSize(n * mult), nil
}

// String prints the largest unit that divides the size exactly.
func (b ByteSize) String() string {
	for _, u := range byteUnits {
		if b != 0 && int64(b)%u.mult == 0 {
			return strconv.FormatInt(int64(b)/u.mult, 10) + u.suffix
		}
	}
	return "0"
}

// stringToByteSizeHook decodes sizes written as strings.
func stringToByteSizeHook(from, to reflect.Type, data any) (any, error) {
	if to != reflect.TypeOf(ByteSize(0)) {
		return data, nil
	}
	if s, ok := data.(string); ok {
		return ParseByteSize(s)
	}
	return data, nil
}
