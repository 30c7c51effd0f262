package bridge

import (
	"errors"
	"fmt"
	"testing"

	"github.com/vishvananda/netlink"
)

func TestRetryDump(t *testing.T) {
	interrupted := fmt.Errorf("listing: %w", netlink.ErrDumpInterrupted)
	other := errors.New("permission denied")
	for _, tc := range []struct {
		name      string
		errs      []error // what each call returns; past the end, nil
		wantCalls int
		wantErr   error
	}{
		{"first try", nil, 1, nil},
		{"interrupted twice", []error{interrupted, interrupted}, 3, nil},
		{"other error is not retried", []error{other}, 1, other},
		{"gives up", []error{interrupted, interrupted, interrupted, interrupted, interrupted, interrupted}, dumpAttempts, interrupted},
	} {
		calls := 0
		v, err := RetryDump(func() (int, error) {
			calls++
			if calls <= len(tc.errs) {
				return calls, tc.errs[calls-1]
			}
			return calls, nil
		})
		if calls != tc.wantCalls || v != calls || !errors.Is(err, tc.wantErr) || (tc.wantErr == nil) != (err == nil) {
			t.Errorf("%s: %d calls, (%d, %v); want %d calls, error %v", tc.name, calls, v, err, tc.wantCalls, tc.wantErr)
		}
	}
}
