#!/usr/bin/env bash
# walship's benchmarks: the backlog drain against pg_receivewal (about 1 GB
# of WAL, a few minutes) and the micro-benchmarks. Extra arguments go to
# go test, e.g. scripts/bench.sh -benchtime 3x.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/deps.sh
# The drain benchmark's "walg" shape: WAL-G's wal-receive, built from its
# source (scripts/walg.sh); without it that shape is skipped.
if [ -z "${WALSHIP_WALG:-}" ]; then
  if WALSHIP_WALG="$(bash scripts/walg.sh)"; then
    export WALSHIP_WALG
  else
    echo "bench.sh: no WAL-G binary (see the line above): the drain benchmark runs without the walg shape" >&2
  fi
fi
go test -run '^$' -bench . -benchtime 1x -timeout 60m "$@" ./e2e/
go test -run '^$' -bench . -benchmem ./compress/ ./pipeline/...
