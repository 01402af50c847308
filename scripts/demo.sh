#!/usr/bin/env bash
# The demo: build a sample multi-layer OCI image (whiteouts, opaque dir, hard links, devices,
# xattrs, a sparse 100 MB file, 10k small files), convert it to the strata format, serve it from a
# local registry, mount it lazily from an empty store, read from it, and print the time and the
# bytes fetched. Run as root:  sudo scripts/demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "demo.sh: run as root (FUSE mount)" >&2; exit 1; }
scripts/setup.sh

echo "== building strata (release)"
cargo build --release --bins --quiet
strata=$PWD/target/release/strata
work=${STRATA_DEMO_DIR:-/var/tmp/strata-demo}
# Mounts left under work by an interrupted run go first: never rm -rf through a mount.
findmnt -rn -o TARGET | { grep "^${work}/" || true; } | sort -r | while read -r m; do umount "$m" || umount -l "$m"; done
rm -rf "$work"; mkdir -p "$work/mnt" "$work/registry"
t() { date +%s.%N; }
secs() { printf '%.3f' "$(echo "$(t) - $1" | bc -l)"; }
reg_pid=
cleanup() {
  umount -l "$work/mnt" 2>/dev/null || true
  [ -n "$reg_pid" ] && kill "$reg_pid" 2>/dev/null || true
}
trap cleanup EXIT

echo "== generating a sample OCI image in $work/image"
s=$(t); target/release/strata-sample "$work/image" --small-files 10000; echo "   took $(secs "$s")s"

echo "== strata convert oci:$work/image:v1 demo/sample:v1"
s=$(t); "$strata" --root "$work/build" convert "oci:$work/image:v1" demo/sample:v1; echo "   took $(secs "$s")s"

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
cat > "$work/registry/config.yml" <<YML
version: 0.1
log:
  level: warn
storage:
  filesystem:
    rootdirectory: $work/registry/data
http:
  addr: 127.0.0.1:$port
YML
docker-registry serve "$work/registry/config.yml" > "$work/registry/log" 2>&1 &
reg_pid=$!
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$port/v2/" >/dev/null && break; sleep 0.1; done
ref="127.0.0.1:$port/demo/sample:v1"
echo "== strata push demo/sample:v1 $ref   (registry: docker-registry, pid $reg_pid)"
"$strata" --root "$work/build" push demo/sample:v1 "$ref"

echo "== strata mount $ref $work/mnt   (empty store: metadata only, data stays in the registry)"
s=$(t); "$strata" --root "$work/node" mount "$ref" "$work/mnt" --no-prefetch; echo "   ready in $(secs "$s")s"
"$strata" --root "$work/node" stats "$work/mnt" | sed 's/^/   /'

echo "== reading lazily"
ls -la "$work/mnt" "$work/mnt/usr/bin"
echo "   /etc/hosts (layer 2 replaced it):"; sed 's/^/     /' "$work/mnt/etc/hosts"
echo "   opq/ (opaque in layer 2): $(ls "$work/mnt/opq")"
echo "   del/ (del/gone whited out): $(ls "$work/mnt/del")"
s=$(t); n=$(find "$work/mnt" | wc -l); echo "   find: $n entries in $(secs "$s")s (no data fetched)"
s=$(t); cat "$work/mnt/usr/bin/busybox" > /dev/null; echo "   read usr/bin/busybox (300 kB) in $(secs "$s")s"
sleep 0.3
"$strata" --root "$work/node" stats "$work/mnt" | sed 's/^/   /'
s=$(t); find "$work/mnt/many/d00" -type f | sed -n "1,100p" | xargs cat > /dev/null; echo "   read 100 small files in $(secs "$s")s (one range request each)"
sleep 0.3
"$strata" --root "$work/node" stats "$work/mnt" | sed 's/^/   /'
echo "   (without --no-prefetch the rest of the image streams into the node cache in the background)"

echo "== strata umount $work/mnt"
"$strata" --root "$work/node" umount "$work/mnt"
echo "done. Image size in the registry: $(du -sh "$work/registry/data" | cut -f1)"
