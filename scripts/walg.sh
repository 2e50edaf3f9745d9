#!/usr/bin/env bash
# Builds WAL-G's PostgreSQL binary (main/pg) for the drain benchmark's
# "walg" shape and prints its path. The source is a git repository, bare or
# not: ${WALG_SRC:-/work/.mirror/wal-g+wal-g/repo}. The binary is cached in
# ${XDG_CACHE_HOME:-$HOME/.cache}/walship/wal-g and rebuilt only when the
# source's HEAD commit changes.
#
# The build leaves out the Yandex Cloud KMS crypter (its SDK module is not
# on every module proxy): its two packages are replaced by stubs that fail
# if configured. Brotli, libsodium and LZO are build tags WAL-G leaves off
# by default, so the build needs no cgo. WAL-G's go.mod asks for a newer Go
# than walship's: GOTOOLCHAIN (default go1.27.3) fetches it from the proxy.
#
# Not called by scripts/test.sh (CI has no WAL-G source); bench.sh calls it
# and carries on without the walg shape when it fails.
set -euo pipefail

src="${WALG_SRC:-/work/.mirror/wal-g+wal-g/repo}"
cache="${XDG_CACHE_HOME:-$HOME/.cache}/walship/wal-g"
toolchain="${WALG_GOTOOLCHAIN:-go1.27.3}"
export PATH="$PATH:/usr/local/go/bin"

die() { echo "walg.sh: $*" >&2; exit 1; }

[ -e "$src" ] || die "no WAL-G source at $src: set WALG_SRC to a clone of github.com/wal-g/wal-g"
if git --git-dir="$src" rev-parse --verify -q HEAD >/dev/null 2>&1; then
  gitdir="$src"
elif gitdir="$(git -C "$src" rev-parse --absolute-git-dir 2>/dev/null)"; then
  :
else
  die "$src is not a git repository: set WALG_SRC to a clone of github.com/wal-g/wal-g"
fi
commit="$(git --git-dir="$gitdir" rev-parse HEAD)"
bin="$cache/wal-g"
if [ -x "$bin" ] && [ "$(cat "$cache/commit" 2>/dev/null)" = "$commit" ]; then
  echo "$bin"
  exit 0
fi
mkdir -p "$cache"
log="$cache/build.log"
tree="$(mktemp -d "${TMPDIR:-/tmp}/walg-src.XXXXXX")"
trap 'rm -rf "$tree"' EXIT

# Check the tree out through a private index, so the source repository is
# only read. Blobs a partial mirror lacks (test data) are left out.
export GIT_INDEX_FILE="$tree/.index"
git --git-dir="$gitdir" read-tree "$commit" || die "cannot read commit $commit of $src"
git --git-dir="$gitdir" ls-files -s | awk '$1 != "160000" {print $2}' |
  git --git-dir="$gitdir" cat-file --batch-check | awk '$2 == "missing" {print $1}' >"$tree/.missing"
if [ -s "$tree/.missing" ]; then
  git --git-dir="$gitdir" ls-files -s | grep -F -f "$tree/.missing" | cut -f2- |
    git --git-dir="$gitdir" update-index --force-remove --stdin
fi
mkdir -p "$tree/w"
(cd "$tree/w" && git --git-dir="$gitdir" --work-tree=. checkout-index -a) || die "cannot check out $src"
unset GIT_INDEX_FILE

w="$tree/w"
[ -d "$w/main/pg" ] || die "$src has no main/pg: is it github.com/wal-g/wal-g?"
for d in internal/crypto/yckms internal/crypto/envelope/enveloper/yckms; do
  [ -d "$w/$d" ] || die "$src has no $d to stub out: update scripts/walg.sh for this WAL-G version"
  rm -f "$w/$d"/*.go
done
cat >"$w/internal/crypto/yckms/stub.go" <<'GO'
// Package yckms is stubbed out of walship's benchmark build of WAL-G.
package yckms

import (
	"errors"
	"io"

	"github.com/wal-g/wal-g/internal/crypto"
)

var errStub = errors.New("the Yandex Cloud KMS crypter is not in this build")

type stub struct{}

func (stub) Name() string                              { return "YcKMC/Crypter" }
func (stub) Encrypt(io.Writer) (io.WriteCloser, error) { return nil, errStub }
func (stub) Decrypt(io.Reader) (io.Reader, error)      { return nil, errStub }

// YcCrypterFromKeyIDAndCredential returns a crypter that always fails.
func YcCrypterFromKeyIDAndCredential(keyID, saFilePath string) crypto.Crypter { return stub{} }
GO
cat >"$w/internal/crypto/envelope/enveloper/yckms/stub.go" <<'GO'
// Package yckms is stubbed out of walship's benchmark build of WAL-G.
package yckms

import (
	"errors"

	"github.com/wal-g/wal-g/internal/crypto/envelope"
)

// EnveloperFromKeyIDAndCredential always fails in this build.
func EnveloperFromKeyIDAndCredential(keyID, saFilePath, endpoint string) (envelope.Enveloper, error) {
	return nil, errors.New("the Yandex Cloud KMS enveloper is not in this build")
}
GO

echo "walg.sh: building WAL-G ${commit:0:12} with $toolchain (a few minutes the first time; log in $log)" >&2
rev="github.com/wal-g/wal-g/cmd/pg"
if ! (cd "$w/main/pg" && env -u GOFLAGS GOTOOLCHAIN="$toolchain" CGO_ENABLED=0 \
  go build -trimpath -ldflags "-s -w -X $rev.gitRevision=${commit:0:12} -X $rev.walgVersion=walship-bench" \
  -o "$bin.tmp" .) >"$log" 2>&1; then
  die "building WAL-G failed: $(grep -m1 -E 'error|cannot|not found|go: ' "$log" || tail -1 "$log") (full log: $log)"
fi
mv "$bin.tmp" "$bin"
echo "$commit" >"$cache/commit"
echo "$bin"
