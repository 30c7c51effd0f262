package inspect

// reader reads big-endian integers and length-prefixed byte strings, and
// reports false instead of reading past its end: every length in a
// ClientHello is checked against what is really there.
type reader []byte

func (r *reader) empty() bool { return len(*r) == 0 }

func (r *reader) bytes(n int) ([]byte, bool) {
	if n < 0 || n > len(*r) {
		return nil, false
	}
	b := (*r)[:n]
	*r = (*r)[n:]
	return b, true
}

func (r *reader) u8() (int, bool) {
	b, ok := r.bytes(1)
	if !ok {
		return 0, false
	}
	return int(b[0]), true
}

func (r *reader) u16() (int, bool) {
	b, ok := r.bytes(2)
	if !ok {
		return 0, false
	}
	return int(b[0])<<8 | int(b[1]), true
}

// prefixed8 and prefixed16 read a byte string behind a 1- or 2-byte length.
func (r *reader) prefixed8() (reader, bool) {
	n, ok := r.u8()
	if !ok {
		return nil, false
	}
	b, ok := r.bytes(n)
	return reader(b), ok
}

func (r *reader) prefixed16() (reader, bool) {
	n, ok := r.u16()
	if !ok {
		return nil, false
	}
	b, ok := r.bytes(n)
	return reader(b), ok
}
