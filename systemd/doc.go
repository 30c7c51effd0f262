// Package systemd holds ghostwire's systemd units and checks them.
//
// The units and the example config in this directory are installed by
// `make install` (@BINDIR@ replaced by the install's bin directory); the
// tests here parse them and run `systemd-analyze verify` on them as
// installed. The package has no code of its own.
package systemd
