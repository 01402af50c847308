#!/usr/bin/env bash
# Cold start over a slow link: time from `strata mount` (lazy, from a registry behind a
# 100 Mbit/s shaped link) to the end of a startup workload, against `strata pull --all` + a local
# mount of the same image, with the bytes each moved. Needs root (network namespace, FUSE).
#
#   benches/e2e/cold-start.sh [WORKDIR] [RATE]
#
# The image (~320 MB): Python's standard library and interpreter plus large shared libraries.
# The workload: every file `python3.11 -c 'import json'` opens (recorded with strace), read in
# full through the mount. The link has no added latency (this kernel has no netem).
set -euo pipefail
work=${1:-/var/tmp/strata-coldstart}
rate=${2:-100mbit}
repo=$(cd "$(dirname "$0")/../.." && pwd)
link="$repo/../shared/bench/shaped-link.sh"
# shellcheck source=benches/e2e/registry.sh
. "$repo/benches/e2e/registry.sh"
cd "$repo"
cargo build --release --bins -q
strata="$repo/target/release/strata"
ns=strata-bench

cleanup() {
  for m in "$work"/mnt-*; do umount -l "$m" 2>/dev/null || true; done
  [ -n "${reg_pid:-}" ] && kill "$reg_pid" 2>/dev/null || true
  bash "$link" down "$ns" || true
}
trap cleanup EXIT
# Mounts left under work by an interrupted run go first: never rm -rf through a mount.
findmnt -rn -o TARGET | { grep "^${work}/" || true; } | sort -r | while read -r m; do umount "$m" || umount -l "$m"; done
rm -rf "$work"; mkdir -p "$work/mnt-lazy" "$work/mnt-full"

echo "# building the image" >&2
rootfs="$work/rootfs"; mkdir -p "$rootfs/usr/bin" "$rootfs/usr/lib/x86_64-linux-gnu"
cp -a /usr/lib/python3.11 "$rootfs/usr/lib/"
cp -a /usr/bin/python3.11 "$rootfs/usr/bin/"
for f in $(ls -S /usr/lib/x86_64-linux-gnu/*.so* 2>/dev/null | head -3); do cp -L "$f" "$rootfs/usr/lib/x86_64-linux-gnu/"; done
python3 - "$rootfs" "$work/src" <<'PY'
import gzip, hashlib, io, json, os, sys, tarfile
rootfs, out = sys.argv[1], sys.argv[2]
os.makedirs(f"{out}/blobs/sha256", exist_ok=True)
def put(data):
    d = hashlib.sha256(data).hexdigest()
    open(f"{out}/blobs/sha256/{d}", "wb").write(data)
    return "sha256:" + d
layers, diff_ids = [], []
for top in ["usr/lib/python3.11", "usr/lib/x86_64-linux-gnu", "usr/bin"]:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        t.add(os.path.join(rootfs, top), arcname=top)
    raw = buf.getvalue()
    gz = gzip.compress(raw, compresslevel=6)
    layers.append({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": put(gz), "size": len(gz)})
    diff_ids.append("sha256:" + hashlib.sha256(raw).hexdigest())
config = json.dumps({"architecture": "amd64", "os": "linux", "config": {"Cmd": ["/usr/bin/python3.11"]},
                     "rootfs": {"type": "layers", "diff_ids": diff_ids}}).encode()
manifest = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
    "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": put(config), "size": len(config)},
    "layers": layers}).encode()
md = put(manifest)
json.dump({"schemaVersion": 2, "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
    "digest": md, "size": len(manifest), "annotations": {"org.opencontainers.image.ref.name": "v1"}}]},
    open(f"{out}/index.json", "w"))
open(f"{out}/oci-layout", "w").write('{"imageLayoutVersion":"1.0.0"}')
PY
image_mb=$(du -sm "$rootfs" | cut -f1)

echo "# recording the workload (files python3.11 -c 'import json' opens)" >&2
strace -f -qq -e trace=openat -o "$work/strace.txt" /usr/bin/python3.11 -c 'import json' || true
grep -o '"/usr/[^"]*"' "$work/strace.txt" | tr -d '"' | sort -u | while read -r f; do
  if [ -f "$rootfs$f" ]; then echo "$f"; fi
done > "$work/workload.txt"
echo "# workload: $(wc -l < "$work/workload.txt") files" >&2

echo "# converting, starting a registry behind a $rate link" >&2
"$strata" --root "$work/build" convert "oci:$work/src:v1" bench/python:v1 >/dev/null
bash "$link" down "$ns" >/dev/null 2>&1 || true
addr=$(bash "$link" up "$ns" "$rate")
mkdir -p "$work/registry"
registry_config "$work/registry/config.yml" "$work/registry/data" 0.0.0.0:5000
bash "$link" exec "$ns" docker-registry serve "$work/registry/config.yml" > "$work/registry/access.log" 2>&1 &
reg_pid=$!
for _ in $(seq 100); do curl -sf "http://$addr:5000/v2/" >/dev/null && break; sleep 0.1; done
ref="$addr:5000/bench/python:v1"
"$strata" --root "$work/build" push bench/python:v1 "$ref" --insecure-registry "$addr:5000" >/dev/null 2>&1

log_bytes() { # response bytes of GETs in the access log after line $1
  tail -n +"$(( $1 + 1 ))" "$work/registry/access.log" | grep '"GET ' | awk '{s+=$10} END {print s+0}'
}
now() { date +%s.%N; }
read_workload() { while read -r f; do cat "$1$f" > /dev/null; done < "$work/workload.txt"; }

# Compressed bytes of the chunks the workload reads (from the TOCs).
"$strata" --root "$work/build" inspect bench/python:v1 --toc > "$work/toc.txt"
read_compressed=$(python3 - "$work/toc.txt" "$work/workload.txt" <<'PY'
import re, sys
want = {l.strip().lstrip("/") for l in open(sys.argv[2])}
total, cur = 0, None
for line in open(sys.argv[1]):
    if line.startswith("  chunk"):
        if cur in want:
            total += int(re.search(r"blob@\d+\+(\d+)", line).group(1))
    elif not line.startswith("#") and not line.startswith("toc "):
        m = re.match(r"^\S+\s+\d+ \d+:\d+ size=\d+ mtime=\S+ (.*)$", line.rstrip("\n"))
        cur = m.group(1).split(" -> ")[0].split(" xattr:")[0] if m else None
print(total)
PY
)

sync; echo 3 > /proc/sys/vm/drop_caches
mark=$(wc -l < "$work/registry/access.log")
t0=$(now)
"$strata" --root "$work/lazy" mount "$ref" "$work/mnt-lazy" --no-prefetch --insecure-registry "$addr:5000" >/dev/null
t_mount=$(echo "$(now) - $t0" | bc -l)
read_workload "$work/mnt-lazy"
t_lazy=$(echo "$(now) - $t0" | bc -l)
sleep 0.3
b_lazy=$(log_bytes "$mark")
"$strata" --root "$work/lazy" umount "$work/mnt-lazy"

"$strata" --root "$work/lazy" daemon --stop >/dev/null

# The same with background prefetch on: it must not delay what the workload waits for.
sync; echo 3 > /proc/sys/vm/drop_caches
mark=$(wc -l < "$work/registry/access.log")
t0=$(now)
"$strata" --root "$work/lazy-pf" mount "$ref" "$work/mnt-lazy" --insecure-registry "$addr:5000" >/dev/null
read_workload "$work/mnt-lazy"
t_lazy_pf=$(echo "$(now) - $t0" | bc -l)
"$strata" --root "$work/lazy-pf" umount "$work/mnt-lazy"
"$strata" --root "$work/lazy-pf" daemon --stop >/dev/null

# 1,000 small files (under 64 KiB, in path order) read lazily: one request per file (neighbour
# fetch off, as before the node daemon) vs the default.
find "$rootfs/usr/lib/python3.11" -type f -size -64k | sort | head -1000 | sed "s|^$rootfs||" > "$work/small.txt"
# One reader process for all the files (a shell loop would time 1,000 process starts).
read_small() { sed "s|^|$1|" "$work/small.txt" | xargs -d '\n' cat > /dev/null; }
declare -A t_small b_small
for nf in 0 256K; do
  sync; echo 3 > /proc/sys/vm/drop_caches
  mark=$(wc -l < "$work/registry/access.log")
  t0=$(now)
  STRATA_NEIGHBOUR_FETCH=$nf "$strata" --root "$work/small-$nf" mount "$ref" "$work/mnt-lazy" --no-prefetch --insecure-registry "$addr:5000" >/dev/null
  read_small "$work/mnt-lazy"
  t_small[$nf]=$(echo "$(now) - $t0" | bc -l)
  sleep 0.3
  b_small[$nf]=$(log_bytes "$mark")
  "$strata" --root "$work/small-$nf" umount "$work/mnt-lazy"
  "$strata" --root "$work/small-$nf" daemon --stop >/dev/null
done

sync; echo 3 > /proc/sys/vm/drop_caches
mark=$(wc -l < "$work/registry/access.log")
t0=$(now)
"$strata" --root "$work/full" pull --all "$ref" --insecure-registry "$addr:5000" >/dev/null 2>&1
"$strata" --root "$work/full" mount "$ref" "$work/mnt-full" --insecure-registry "$addr:5000" >/dev/null
read_workload "$work/mnt-full"
t_full=$(echo "$(now) - $t0" | bc -l)
sleep 0.3
b_full=$(log_bytes "$mark")
"$strata" --root "$work/full" umount "$work/mnt-full"
"$strata" --root "$work/full" daemon --stop >/dev/null

echo
echo "Image ${image_mb} MB uncompressed; link $rate; workload $(wc -l < "$work/workload.txt") files."
echo
echo "| | time to end of workload | bytes from the registry |"
echo "|---|---|---|"
printf '| lazy: strata mount (ready in %.2f s) + workload | %.2f s | %s |\n' "$t_mount" "$t_lazy" "$b_lazy"
printf '| full: strata pull --all + mount + workload | %.2f s | %s |\n' "$t_full" "$b_full"
printf '| ratio lazy/full | %.3f× | %.3f× |\n' "$(echo "$t_lazy / $t_full" | bc -l)" "$(echo "$b_lazy / $b_full" | bc -l)"
printf '\nbytes the workload reads, compressed: %s; lazy fetched %.2f× that\n' "$read_compressed" "$(echo "$b_lazy / $read_compressed" | bc -l)"
echo
echo "| workload with background prefetch | time | ratio to --no-prefetch |"
echo "|---|---|---|"
printf '| --no-prefetch | %.2f s | 1.00× |\n' "$t_lazy"
printf '| prefetch on (default) | %.2f s | **%.2f×** |\n' "$t_lazy_pf" "$(echo "$t_lazy_pf / $t_lazy" | bc -l)"
echo
echo "| 1,000 small files, lazy, --no-prefetch | time (incl. mount) | bytes from the registry |"
echo "|---|---|---|"
printf '| one request per file (--neighbour-fetch 0) | %.2f s | %s |\n' "${t_small[0]}" "${b_small[0]}"
printf '| neighbour fetch 256K (default) | %.2f s | %s |\n' "${t_small[256K]}" "${b_small[256K]}"
printf '| **ratio** | **%.2f×** | %.2f× |\n' "$(echo "${t_small[256K]} / ${t_small[0]}" | bc -l)" "$(echo "${b_small[256K]} / ${b_small[0]}" | bc -l)"
