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

.PHONY: all build deps test unit demo bench bench-quick install verify-units clean fmt vet

all: build

build:
	$(GO) build -o $(BIN) ./cmd/ghostwire

# deps installs what the tests, demo and bench read state back with, on a
# fresh Debian machine. It is a no-op when everything is present.
deps:
	@missing=""; \
	for p in nft:nftables ip:iproute2 systemd-analyze:systemd; do \
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
# throwaway namespaces (they skip, saying why, without root).
test: deps vet
	$(GO) test $(TESTFLAGS) ./...

unit:
	$(GO) test -count=1 -short ./...

demo: deps build
	$(GO) run ./cmd/ghostwire-lab demo --ghostwire $(BIN)

bench: build
	$(GO) run ./bench -ghostwire $(BIN)

bench-quick: build
	$(GO) run ./bench -ghostwire $(BIN) -quick

install: build
	install -D -m 0755 $(BIN) $(DESTDIR)$(BINDIR)/ghostwire
	install -D -m 0644 systemd/ghostwire.service $(DESTDIR)$(UNITDIR)/ghostwire.service
	install -D -m 0644 systemd/ghostwire-provision.service $(DESTDIR)$(UNITDIR)/ghostwire-provision.service
	sed -i 's|@BINDIR@|$(BINDIR)|g' $(DESTDIR)$(UNITDIR)/ghostwire.service $(DESTDIR)$(UNITDIR)/ghostwire-provision.service
	install -D -m 0644 systemd/ghostwire.example.yaml $(DESTDIR)$(CONFDIR)/ghostwire.yaml.example

fmt:
	gofmt -w $$(git ls-files '*.go')

clean:
	rm -rf bin
