#!/usr/bin/env bash
# Installs what strata's demo, tests and benchmarks need on a fresh Debian 12 machine (as root):
# FUSE, umoci/skopeo (reference tools for the tests), zstd, GNU tar, bc. Idempotent and quiet.
set -euo pipefail

need=()
for pkg in fuse3 umoci skopeo zstd tar bc attr docker-registry apache2-utils curl openssl runc busybox-static; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
  echo "setup: installing ${need[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${need[@]}" >/dev/null
fi
if [ ! -e /dev/fuse ]; then
  modprobe fuse 2>/dev/null || true
fi
[ -e /dev/fuse ] || { echo "setup: /dev/fuse is missing; strata needs FUSE" >&2; exit 1; }
command -v cargo >/dev/null || { echo "setup: cargo not found; install Rust (rustup)" >&2; exit 1; }
