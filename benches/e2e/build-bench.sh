#!/usr/bin/env bash
# `strata build` against `buildah bud` on the same Dockerfile and machine, in one run (root):
#   1. first build of a 5-step Dockerfile (WORKDIR, COPY, RUN, ENV, CMD) whose base is a
#      ~285 MB (gzip) image in a local registry: buildah pulls the base whole, strata mounts it
#      lazily;
#   2. the cached rebuild of the same (nothing changed), median of 3.
#
#   benches/e2e/build-bench.sh [WORKDIR]
set -euo pipefail
work=${1:-/var/tmp/strata-build-bench}
repo=$(cd "$(dirname "$0")/../.." && pwd)
cd "$repo"
cargo build --release --bins -q
strata="$repo/target/release/strata"
runroot=/run/strata-build-bench

cleanup() {
  [ -S "$work/strata/daemon.sock" ] && "$strata" --root "$work/strata" daemon --stop --forget >/dev/null 2>&1 || true
  [ -n "${reg_pid:-}" ] && kill "$reg_pid" 2>/dev/null || true
  buildah --root "$work/buildah" --runroot "$runroot" --storage-driver overlay rmi -a -f >/dev/null 2>&1 || true
}
trap cleanup EXIT
findmnt -rn -o TARGET | { grep "^${work}/" || true; } | sort -r | while read -r m; do umount "$m" || umount -l "$m"; done
rm -rf "$work"; mkdir -p "$work/ctx"
now() { date +%s.%N; }
since() { echo "$(now) - $1" | bc; }
ratio() { echo "scale=3; $1 / $2" | bc; }
median3() { sort -n | sed -n 2p; }

echo "# building the base image" >&2
bytes=$(python3 "$repo/benches/e2e/mkimage.py" "$work/src" /usr/lib/python3.11 /usr/lib/x86_64-linux-gnu /usr/share/man)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
mkdir -p "$work/registry"
printf 'version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: %s\nhttp:\n  addr: 127.0.0.1:%s\n' "$work/registry/data" "$port" > "$work/registry/config.yml"
docker-registry serve "$work/registry/config.yml" > "$work/registry/log" 2>&1 &
reg_pid=$!
for _ in $(seq 50); do curl -sf "http://127.0.0.1:$port/v2/" >/dev/null && break; sleep 0.1; done
reg=127.0.0.1:$port
skopeo copy -q --dest-tls-verify=false "oci:$work/src:v1" "docker://$reg/bench/base:gzip"
"$strata" --root "$work/convert" convert "oci:$work/src:v1" "$reg/bench/base:strata" >/dev/null 2>&1

# The build context: a small app.
mkdir -p "$work/ctx/app"
for i in $(seq 20); do head -c 20000 /dev/urandom | base64 > "$work/ctx/app/file$i.txt"; done
dockerfile() { # BASE
  printf 'FROM %s\nWORKDIR /srv\nCOPY app /srv/app\nRUN cat /srv/app/*.txt | wc -c > /srv/size\nENV MODE=production\nCMD ["/bin/sh", "-c", "cat /srv/size"]\n' "$1"
}
dockerfile "$reg/bench/base:gzip" > "$work/ctx/Dockerfile.buildah"
dockerfile "$reg/bench/base:strata" > "$work/ctx/Dockerfile.strata"
ba=(buildah --root "$work/buildah" --runroot "$runroot" --storage-driver overlay)
bud=(bud --tls-verify=false --ulimit nofile=20000:20000 --ulimit nproc=1000:1000 --network host --layers)

sync; echo 3 > /proc/sys/vm/drop_caches
t=$(now); "${ba[@]}" "${bud[@]}" -q -f "$work/ctx/Dockerfile.buildah" -t localhost/bench:v1 "$work/ctx" >/dev/null; buildah_first=$(since "$t")
sync; echo 3 > /proc/sys/vm/drop_caches
t=$(now); "$strata" --root "$work/strata" build -f "$work/ctx/Dockerfile.strata" -t bench:v1 "$work/ctx" >/dev/null 2>&1; strata_first=$(since "$t")
buildah_cached=$(for _ in 1 2 3; do t=$(now); "${ba[@]}" "${bud[@]}" -q -f "$work/ctx/Dockerfile.buildah" -t localhost/bench:v1 "$work/ctx" >/dev/null; since "$t"; done | median3)
strata_cached=$(for _ in 1 2 3; do t=$(now); "$strata" --root "$work/strata" build -f "$work/ctx/Dockerfile.strata" -t bench:v1 "$work/ctx" >/dev/null 2>&1; since "$t"; done | median3)
printf 'base: %.1f MB gzip\n' "$(echo "$bytes / 1000000" | bc -l)"
printf '%-30s %10s %10s %8s\n' "" "buildah s" "strata s" ratio
printf '%-30s %10.2f %10.2f %8.3f\n' "first build" "$buildah_first" "$strata_first" "$(ratio "$strata_first" "$buildah_first")"
printf '%-30s %10.2f %10.2f %8.3f\n' "cached rebuild (median of 3)" "$buildah_cached" "$strata_cached" "$(ratio "$strata_cached" "$buildah_cached")"
printf 'strata cached rebuild / strata first build: %.3f\n' "$(ratio "$strata_cached" "$strata_first")"
echo "strata's image runs: $("$strata" --root "$work/strata" run --rm bench:v1)"
