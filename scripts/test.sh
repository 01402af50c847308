#!/usr/bin/env bash
# The whole test suite, as CI runs it: installs system packages, checks formatting and lints,
# then runs every test, including the privileged end-to-end ones (real FUSE mounts, umoci,
# skopeo). Run as root on Debian 12:  sudo scripts/test.sh
set -euo pipefail
cd "$(dirname "$0")/.."

[ "$(id -u)" = 0 ] || { echo "test.sh: run as root (the end-to-end tests mount FUSE)" >&2; exit 1; }
scripts/setup.sh

export STRATA_TEST_TMP=${STRATA_TEST_TMP:-$PWD/target/strata-tests}
# Mounts left under STRATA_TEST_TMP by an interrupted run go first: never rm -rf through a mount.
findmnt -rn -o TARGET | { grep "^${STRATA_TEST_TMP}/" || true; } | sort -r | while read -r m; do umount "$m" || umount -l "$m"; done
rm -rf "$STRATA_TEST_TMP"

# A one-off build gains nothing from incremental caches, which double target/'s size.
export CARGO_INCREMENTAL=${CARGO_INCREMENTAL:-0}
df -h . | tail -1

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --quiet -- -D warnings
echo "== build"
cargo build --workspace --bins --tests --quiet
du -sh target 2>/dev/null || true
echo "== tests"
cargo test --workspace --quiet -- --test-threads=2 2>&1 | tee target/test.log
# Fail loudly if anything was left mounted.
if grep -q "$STRATA_TEST_TMP" /proc/mounts; then
  echo "test.sh: tests left mounts behind:" >&2
  grep "$STRATA_TEST_TMP" /proc/mounts >&2
  exit 1
fi
passed=$(grep -o '[0-9]* passed' target/test.log | awk '{s+=$1} END {print s+0}')
failed=$(grep -o '[0-9]* failed' target/test.log | awk '{s+=$1} END {print s+0}')
echo "tests: $passed passed, $failed failed"
