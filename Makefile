# ghostwire — build, test, demo, bench, install.
# Root targets (test, demo, bench) build throwaway network namespaces.

GO        ?= go
PREFIX    ?= /usr/local
DESTDIR   ?=
BINDIR    := $(PREFIX)/bin
UNITDIR   ?= /etc/systemd/system
CONFDIR   ?= /etc/ghostwire
BIN       := bin/ghostwire
GOFLAGS   ?=
TESTFLAGS ?= -count=1 -timeout 45m

.PHONY: all build deps test unit demo demo-invisible bench bench-quick install install-files verify-units validate-vagrant clean fmt vet

all: build

# Static: the binary must run on the appliance whatever glibc the build host has.
build:
	CGO_ENABLED=0 $(GO) build -o $(BIN) ./cmd/ghostwire

# deps installs what the tests, demo and bench read state back with, and
# the UDP tests' real peers (dig, dnsmasq, iperf3), the name-policy
# tests' curl and openssl, and promtool (package prometheus) to lint
# /metrics, on a fresh Debian
# machine. It is a no-op when everything is present. dnsmasq comes from
# dnsmasq-base, the binary alone: the `dnsmasq` package would also start a
# system service on port 53 wired into the host's resolver; the tests run
# their own instance in a lab namespace. systemd-nspawn (systemd-container)
# and mmdebstrap boot the installed units under a real systemd
# (e2e/systemd_test.go); vagrant validates vagrant/Vagrantfile.
deps:
	@missing=""; \
	for p in nft:nftables ip:iproute2 systemd-analyze:systemd dig:bind9-dnsutils dnsmasq:dnsmasq-base iperf3:iperf3 curl:curl openssl:openssl promtool:prometheus systemd-nspawn:systemd-container mmdebstrap:mmdebstrap vagrant:vagrant; do \
	  command -v $${p%%:*} >/dev/null 2>&1 || missing="$$missing $${p#*:}"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi
	$(GO) mod download

vet:
	$(GO) vet ./...

# test runs everything: unit tests everywhere, root integration tests in
# throwaway namespaces (they skip, saying why, without root). Then a short
# run of each fuzz target (one target per invocation: go test refuses more).
# The fuzz budget is a count, not a duration: a duration races Go's fuzzing
# coordinator at its deadline on a loaded machine and fails with a bare
# "context deadline exceeded" and no input (golang/go#75804); -timeout still
# fails a real hang.
test: deps vet
	$(GO) test $(TESTFLAGS) ./...
	$(GO) test -run='^$$' -fuzz='^FuzzName$$' -fuzztime=100000x -timeout=5m ./proxy/inspect
	$(GO) test -run='^$$' -fuzz='^FuzzList$$' -fuzztime=100000x -timeout=5m ./proxy/inspect
	@$(MAKE) --no-print-directory validate-vagrant

# validate-vagrant checks vagrant/Vagrantfile's syntax and settings offline
# (no box is downloaded, no VM started). Its state directory goes to a
# throwaway place, not vagrant/.vagrant.
validate-vagrant:
	@command -v vagrant >/dev/null 2>&1 || { \
	  echo "validate-vagrant: vagrant not found (apt-get install vagrant)" >&2; exit 1; }
	@set -e; tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	cd vagrant && VAGRANT_DOTFILE_PATH="$$tmp" VAGRANT_CHECKPOINT_DISABLE=1 vagrant validate

unit:
	$(GO) test -count=1 -short ./...

demo: deps build
	$(GO) run ./cmd/ghostwire-lab demo --ghostwire $(BIN)

# demo-invisible is the demo with bridge.invisible: the MACs each side
# sees are the hosts', and no frame carries the box's.
demo-invisible: deps build
	$(GO) run ./cmd/ghostwire-lab demo -invisible --ghostwire $(BIN)

# bench measures ghostwire against plain bridging and HAProxy (needs root;
# installs iperf3, wrk, haproxy if missing). BENCHFLAGS adds flags, e.g.
# BENCHFLAGS="-rounds 5 -json /tmp/b.json". See docs/performance.md.
bench: build
	$(GO) run ./cmd/bench -ghostwire $(BIN) $(BENCHFLAGS)

bench-quick: build
	$(GO) run ./cmd/bench -ghostwire $(BIN) -quick $(BENCHFLAGS)

# install builds, then installs the binary, both units (@BINDIR@ replaced by
# $(BINDIR)) and the example config (never over a real ghostwire.yaml):
#   make install DESTDIR=/tmp/x PREFIX=/usr
install: build
	@$(MAKE) --no-print-directory install-files

# install-files installs an already built $(BIN) (BIN=... to install another
# file, e.g. a prebuilt binary on a box without Go).
UNITS := ghostwire.service ghostwire-provision.service
install-files:
	install -D -m 0755 $(BIN) $(DESTDIR)$(BINDIR)/ghostwire
	install -d -m 0755 $(DESTDIR)$(UNITDIR)
	for u in $(UNITS); do \
	  sed 's|@BINDIR@|$(BINDIR)|g' systemd/$$u > $(DESTDIR)$(UNITDIR)/$$u.tmp && \
	  chmod 0644 $(DESTDIR)$(UNITDIR)/$$u.tmp && \
	  mv $(DESTDIR)$(UNITDIR)/$$u.tmp $(DESTDIR)$(UNITDIR)/$$u || exit 1; \
	done
	@if grep -n '@[A-Z_]*@' $(addprefix $(DESTDIR)$(UNITDIR)/,$(UNITS)); then \
	  echo "install: unsubstituted placeholders left in the units" >&2; exit 1; fi
	install -D -m 0644 systemd/ghostwire.example.yaml $(DESTDIR)$(CONFDIR)/ghostwire.yaml.example

# verify-units runs `systemd-analyze verify` on the units as `make install`
# writes them, offline (no running systemd needed; `apt-get install systemd`
# provides the tool). verify insists that every ExecStart= binary exists and
# is executable on *this* machine, and `--root=DIR` is no way round that on
# systemd 252: it then also wants every dependency (sysinit.target...) and
# /bin/kill under DIR. So: install-files into a throwaway DESTDIR with a
# stub executable as the binary (verify never runs it, so the real binary
# would add nothing and the check needs no Go build), copy the installed
# units with $(BINDIR)/ghostwire pointed at the staged stub, and verify the
# copies side by side (each finds the other in its own directory). Any
# output fails the target. systemd/units_test.go does the same in `go test`.
# `systemd-analyze security --offline` prints the exposure scores (FYI).
verify-units:
	@command -v systemd-analyze >/dev/null 2>&1 || { \
	  echo "verify-units: systemd-analyze not found (apt-get install systemd)" >&2; exit 1; }
	@set -e; tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	printf '#!/bin/sh\nexit 0\n' > "$$tmp/stub"; \
	$(MAKE) --no-print-directory install-files DESTDIR="$$tmp/root" BIN="$$tmp/stub" >/dev/null; \
	mkdir "$$tmp/units"; \
	for u in $(UNITS); do \
	  sed 's|$(BINDIR)/ghostwire|'"$$tmp/root$(BINDIR)"'/ghostwire|g' \
	    "$$tmp/root$(UNITDIR)/$$u" > "$$tmp/units/$$u"; \
	done; \
	rc=0; out=$$(cd "$$tmp/units" && systemd-analyze verify --man=no $(addprefix ./,$(UNITS)) 2>&1) || rc=$$?; \
	if [ -n "$$out" ] || [ $$rc -ne 0 ]; then \
	  printf '%s\n' "$$out" >&2; echo "verify-units: FAILED (exit $$rc)" >&2; exit 1; fi; \
	for u in $(UNITS); do \
	  (cd "$$tmp/units" && systemd-analyze security --offline=yes ./$$u 2>&1 | tail -n 1); \
	done; \
	echo "verify-units: $(UNITS) OK"

fmt:
	gofmt -w $$(git ls-files '*.go')

clean:
	rm -rf bin
