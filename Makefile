# One build for the tests, the Dockerfile and releases.
BIN ?= bin/walship
VERSION ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
GOFLAGS_BUILD = -trimpath -ldflags "-s -w -X main.version=$(VERSION)"

.PHONY: build test bench chaos sim
build:
	CGO_ENABLED=0 go build $(GOFLAGS_BUILD) -o $(BIN) ./cmd/walship

test:
	bash scripts/test.sh

bench:
	bash scripts/bench.sh

# The long runs: 200 faults on real servers and the NATS cluster losing
# nodes (about 20 minutes), and 10,000 seeds of the deterministic
# simulation (about 75 seconds on two cores).
chaos:
	bash -c 'source scripts/deps.sh && go test -count=1 -timeout 45m -run "TestChaos$$|TestClusterNodeLoss" ./e2e/ -chaos.faults=200 -v'

sim:
	go test -count=1 -timeout 30m -run 'TestSimulation$$' ./pipeline/sim/ -sim.seeds=10000 -v
