# One build for the tests, the Dockerfile and releases.
BIN ?= bin/walship
VERSION ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
GOFLAGS_BUILD = -trimpath -ldflags "-s -w -X main.version=$(VERSION)"

.PHONY: build test bench
build:
	CGO_ENABLED=0 go build $(GOFLAGS_BUILD) -o $(BIN) ./cmd/walship

test:
	bash scripts/test.sh

bench:
	bash scripts/bench.sh
