#!/usr/bin/env bash
# walship's test command: installs what the tests need on a fresh Debian
# machine with Go, then runs every test against real servers.
# See scripts/deps.sh for what it installs.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/deps.sh

go vet ./...
# Unit tests, the deterministic simulation (500 seeds; 150 under -race;
# WALSHIP_SIM_SEEDS for more) and the adapters' tests against real NATS and
# S3, all under the race detector.
CGO_ENABLED=1 go test -race -count=1 -timeout 20m "$@" $(go list ./... | grep -v '/e2e$')
# End to end: the real binary against real PostgreSQL, NATS and S3; one of
# these tests builds walship with -race and runs the whole pipeline.
go test -count=1 -timeout 30m "$@" ./e2e/
