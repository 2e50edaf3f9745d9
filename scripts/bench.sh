#!/usr/bin/env bash
# walship's benchmarks: the backlog drain against pg_receivewal (about 1 GB
# of WAL, a few minutes) and the micro-benchmarks. Extra arguments go to
# go test, e.g. scripts/bench.sh -benchtime 3x.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/deps.sh
go test -run '^$' -bench . -benchtime 1x -timeout 60m "$@" ./e2e/
go test -run '^$' -bench . -benchmem ./compress/ ./pipeline/...
