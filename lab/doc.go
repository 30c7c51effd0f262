// Package lab builds the client–box–server network-namespace topology that ghostwire's tests, demo and benchmarks run in.
//
// The topology is
//
//	client ns: PREFIXc ─veth─ PREFIXlan [box ns] PREFIXwan ─veth─ PREFIXs :server ns
//
// Client and server share one IPv4 /24 and one IPv6 /64, so whatever the box
// puts between its two ports (a plain bridge, or ghostwire) is a bump in the
// wire. The lab creates namespaces and veths only; bridging the box ports is
// left to ghostwire's own apply, or to PlainBridge for baselines.
//
// Appliance (appliance.go) drives the real ghostwire binary in a lab's box:
// it writes the config, applies, runs and reads back the proxy's JSON log;
// the end-to-end tests and `make demo` share it. Capture and the frame
// parser read what crosses the wire.
//
// Everything except frame parsing needs Linux and root (CAP_NET_ADMIN and
// CAP_SYS_ADMIN).
package lab
