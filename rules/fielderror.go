package rules

import (
	"fmt"
)

// FieldError is a problem with one Config field. Its text starts with the
// field's name ("ClientPort: ..."); a caller that knows where the field
// came from (appliance: the config key bridge.client_nic) can say it in
// its own terms with Fields.
type FieldError struct {
	Field string // a Config field name
	Err   error
}

func (e *FieldError) Error() string { return e.Field + ": " + e.Err.Error() }
func (e *FieldError) Unwrap() error { return e.Err }

func fieldErr(field, format string, a ...any) *FieldError {
	return &FieldError{Field: field, Err: fmt.Errorf(format, a...)}
}

// Fields returns every FieldError in err's tree (errors.Join included), in
// order.
func Fields(err error) []*FieldError {
	var out []*FieldError
	var walk func(error)
	walk = func(err error) {
		if fe, ok := err.(*FieldError); ok {
			out = append(out, fe)
			return
		}
		switch u := err.(type) {
		case interface{ Unwrap() []error }:
			for _, e := range u.Unwrap() {
				walk(e)
			}
		case interface{ Unwrap() error }:
			walk(u.Unwrap())
		}
	}
	if err != nil {
		walk(err)
	}
	return out
}
