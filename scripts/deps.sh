#!/usr/bin/env bash
# Installs what walship's tests and benchmarks need on a fresh Debian machine
# with Go. Sourced by test.sh and bench.sh.
#   PostgreSQL 15 server binaries (initdb, pg_ctl, pgbench, pg_receivewal)
#   Versity S3 Gateway (versitygw), built with go install
#   nats-server at the version in go.mod, built with go install (the
#     cluster tests run real processes; the others embed the server)
#   barman-cli-cloud + python3-boto3, prometheus (for promtool)
export PATH="$PATH:/usr/local/go/bin"
GOBIN_DIR="$(go env GOPATH)/bin"
export PATH="$PATH:$GOBIN_DIR"

SUDO=""
if [ "$(id -u)" != 0 ] && command -v sudo >/dev/null; then SUDO=sudo; fi

have_pg() {
  ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || [ -n "${WALSHIP_PG_BINDIR:-}" ]
}
if ! have_pg || ! command -v pgbench >/dev/null; then
  echo "test.sh: installing PostgreSQL 15 from Debian" >&2
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq postgresql-15 postgresql-client-15 >/dev/null
fi
# As root the tests run PostgreSQL as the 'postgres' user, which Debian's
# package creates; make sure it exists even when the binaries came otherwise.
if [ "$(id -u)" = 0 ] && ! id postgres >/dev/null 2>&1; then
  useradd --system --home /var/lib/postgresql --shell /bin/bash postgres
fi

# The race detector needs cgo: a C compiler.
if ! command -v gcc >/dev/null; then
  echo "deps.sh: installing gcc for the race detector" >&2
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends gcc libc6-dev >/dev/null
fi

# barman-cloud-wal-restore (the restore-compatibility test and benchmark)
# and promtool (the alert rule tests) come from Debian.
missing=""
command -v barman-cloud-wal-restore >/dev/null || missing="$missing barman-cli-cloud python3-boto3"
command -v promtool >/dev/null || missing="$missing prometheus"
if [ -n "$missing" ]; then
  echo "deps.sh: installing$missing from Debian" >&2
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi

if ! command -v versitygw >/dev/null; then
  echo "test.sh: installing versitygw v1.8.0" >&2
  go install github.com/versity/versitygw/cmd/versitygw@v1.8.0
fi

# The version walship is built against, so the processes the cluster tests
# run are the server the embedded tests use.
NATS_SERVER_VERSION="$(awk '$1 == "github.com/nats-io/nats-server/v2" { print $2 }' "$(dirname "${BASH_SOURCE[0]}")/../go.mod")"
if ! "$GOBIN_DIR/nats-server" --version 2>/dev/null | grep -qF "$NATS_SERVER_VERSION"; then
  echo "deps.sh: installing nats-server $NATS_SERVER_VERSION" >&2
  GOBIN="$GOBIN_DIR" go install "github.com/nats-io/nats-server/v2@$NATS_SERVER_VERSION"
fi
export WALSHIP_NATS_SERVER="$GOBIN_DIR/nats-server"
