#!/usr/bin/env bash
# walship's test command: installs what the tests need on a fresh Debian
# machine with Go, then runs every test against real servers.
# See scripts/deps.sh for what it installs.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/deps.sh

go vet ./...
go test -timeout 30m -count=1 "$@" ./...
