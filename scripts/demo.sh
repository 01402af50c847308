#!/usr/bin/env bash
# The demo: build a sample multi-layer OCI image (whiteouts, opaque dir, hard links, devices,
# xattrs, a sparse 100 MB file, 10k small files), convert it to the strata format, mount it
# through FUSE, list and read it, and print timings. Run as root:  sudo scripts/demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "demo.sh: run as root (FUSE mount)" >&2; exit 1; }
scripts/setup.sh

echo "== building strata (release)"
cargo build --release --bins --quiet
strata=$PWD/target/release/strata
work=${STRATA_DEMO_DIR:-/var/tmp/strata-demo}
root=$work/store
rm -rf "$work"; mkdir -p "$work/mnt"
t() { date +%s.%N; }
secs() { printf '%.3f' "$(echo "$(t) - $1" | bc -l)"; }

echo "== generating a sample OCI image in $work/image"
s=$(t); target/release/strata-sample "$work/image" --small-files 10000; echo "   took $(secs "$s")s"

echo "== strata convert oci:$work/image:v1 demo/sample:v1"
s=$(t); "$strata" --root "$root" convert "oci:$work/image:v1" demo/sample:v1; echo "   took $(secs "$s")s"

echo "== strata images"
"$strata" --root "$root" images

echo "== strata mount demo/sample:v1 $work/mnt"
s=$(t); "$strata" --root "$root" mount demo/sample:v1 "$work/mnt"; echo "   ready in $(secs "$s")s"

echo "== listing"
ls -la "$work/mnt" "$work/mnt/usr/bin"
echo "   /etc/hosts (layer 2 replaced it):"; sed 's/^/     /' "$work/mnt/etc/hosts"
echo "   opq/ (opaque in layer 2): $(ls "$work/mnt/opq")"
echo "   del/ (del/gone whited out): $(ls "$work/mnt/del")"
echo "   xattrs of data/xattrs: $(getfattr -d --absolute-names "$work/mnt/data/xattrs" 2>/dev/null | grep -v '^#' | tr '\n' ' ')"

echo "== reading"
s=$(t); n=$(find "$work/mnt" | wc -l); echo "   find: $n entries in $(secs "$s")s"
s=$(t); find "$work/mnt/many" -type f -print0 | xargs -0 cat | wc -c | xargs printf '   read 10k small files: %s bytes'; echo " in $(secs "$s")s"
s=$(t); sha=$(sha256sum "$work/mnt/sparse-100M" | cut -c1-16); echo "   sha256 of the 100 MB sparse file: $sha… in $(secs "$s")s"

echo "== strata umount $work/mnt"
"$strata" --root "$root" umount "$work/mnt"
echo "done. The store is an OCI image layout: skopeo inspect oci:$root:docker.io/demo/sample:v1"
