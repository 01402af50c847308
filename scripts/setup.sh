#!/usr/bin/env bash
# Installs what strata's demo, tests and benchmarks need on a fresh Debian 12 machine (as root):
# FUSE, umoci/skopeo (reference tools for the tests), zstd, GNU tar, bc. Idempotent and quiet.
set -euo pipefail

need=()
for pkg in fuse3 uidmap umoci skopeo zstd tar bc attr docker-registry apache2-utils curl openssl runc crun podman buildah busybox-static gcc libc6-dev containerd golang-github-containerd-containerd-dev; do
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
# Ordinary users open /dev/fuse themselves (fusermount3 then mounts): 0666, as udev makes it on
# a standard system (some containers create it 0600).
chmod 0666 /dev/fuse 2>/dev/null || true
command -v cargo >/dev/null || { echo "setup: cargo not found; install Rust (rustup)" >&2; exit 1; }

# crun refuses a hybrid cgroup layout whose unified (v2) hierarchy still holds controllers
# ("cgroups in hybrid mode not supported, drop all controllers from cgroupv2"). A systemd host in
# hybrid mode mounts every v1 controller, which leaves v2 none; some sandboxes leave one (e.g.
# hugetlb) unmounted. Mount those as v1 hierarchies, as systemd would, so crun runs.
unified=/sys/fs/cgroup/unified
if [ -r "$unified/cgroup.controllers" ] && [ "$(id -u)" = 0 ]; then
  for c in $(cat "$unified/cgroup.controllers"); do
    mkdir -p "/sys/fs/cgroup/$c" 2>/dev/null &&
      mount -t cgroup -o "$c" cgroup "/sys/fs/cgroup/$c" 2>/dev/null ||
      echo "setup: could not mount the $c cgroup v1 hierarchy (crun may refuse to run)" >&2
  done
fi
