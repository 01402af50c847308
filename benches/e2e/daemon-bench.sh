#!/usr/bin/env bash
# Node daemon benchmarks over loopback, each against a baseline measured in the same run (the
# machines are shared and noisy, so only ratios mean anything). Needs root (FUSE, drop_caches)
# and docker-registry. Prints markdown tables; docs/benchmarks.md records a run.
#
#   benches/e2e/daemon-bench.sh [WORKDIR] [RUNS]
#
# The image: /usr/share/man, /usr/include and /usr/lib/python3.11 of this machine as three gzip
# layers (~30k files, ~275 MB), converted to strata and pushed to a local docker-registry.
#  1. read-all of the lazily mounted image with --no-prefetch: neighbour fetch on vs off;
#  2. cold read-all from the node's disk cache vs from the same image local in the store;
#  3. cold first read of the local image vs its CPU bound (every chunk decoded and verified on
#     every core, no FUSE: strata-decode-bound);
#  4. memory: one daemon serving 10 mounts vs 10 daemons serving one each (the old design).
set -euo pipefail
work=${1:-/var/tmp/strata-daemon-bench}
runs=${2:-3}
repo=$(cd "$(dirname "$0")/../.." && pwd)
cd "$repo"
cargo build --release --bins -q
strata="$repo/target/release/strata"
bound="$repo/target/release/strata-decode-bound"

roots=()
cleanup() {
  for m in $(findmnt -rn -o TARGET | grep "^${work}/" | sort -r); do umount -l "$m" 2>/dev/null || true; done
  for r in "${roots[@]}"; do "$strata" --root "$r" daemon --stop >/dev/null 2>&1 || true; done
  [ -n "${reg_pid:-}" ] && kill "$reg_pid" 2>/dev/null || true
}
trap cleanup EXIT
findmnt -rn -o TARGET | { grep "^${work}/" || true; } | sort -r | while read -r m; do umount "$m" || umount -l "$m"; done
rm -rf "$work"; mkdir -p "$work"

echo "# building the image" >&2
python3 - "$work/src" <<'PY'
import gzip, hashlib, io, json, os, sys, tarfile
out = sys.argv[1]
os.makedirs(f"{out}/blobs/sha256", exist_ok=True)
def put(data):
    d = hashlib.sha256(data).hexdigest()
    open(f"{out}/blobs/sha256/{d}", "wb").write(data)
    return "sha256:" + d
layers, diff_ids = [], []
for top in ["usr/share/man", "usr/include", "usr/lib/python3.11"]:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        t.add("/" + top, arcname=top)
    raw = buf.getvalue()
    gz = gzip.compress(raw, compresslevel=6)
    layers.append({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": put(gz), "size": len(gz)})
    diff_ids.append("sha256:" + hashlib.sha256(raw).hexdigest())
config = json.dumps({"architecture": "amd64", "os": "linux",
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
build="$work/build"; roots+=("$build")
"$strata" --root "$build" convert "oci:$work/src:v1" bench/many:v1 >/dev/null

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
mkdir -p "$work/registry"
cat > "$work/registry/config.yml" <<YML
version: 0.1
log:
  level: error
storage:
  filesystem:
    rootdirectory: $work/registry/data
http:
  addr: 127.0.0.1:$port
YML
docker-registry serve "$work/registry/config.yml" > "$work/registry/log" 2>&1 &
reg_pid=$!
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$port/v2/" >/dev/null && break; sleep 0.1; done
ref="127.0.0.1:$port/bench/many:v1"
"$strata" --root "$build" push bench/many:v1 "$ref" >/dev/null 2>&1

drop_caches() { sync; echo 3 > /proc/sys/vm/drop_caches; }
now() { date +%s.%N; }
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
# Every file read in full by 4 parallel readers (what a container start or a scan does).
readall() { find "$1" -type f -print0 | xargs -0 -P 4 -n 256 cat > /dev/null; }
timed() { local t0; t0=$(now); "$@"; echo "$(now) - $t0" | bc -l; }
catfile() { cat "$1" > /dev/null; }
mnt="$work/mnt"; mkdir -p "$mnt"
stat_of() { "$strata" --root "$1" stats --json "$mnt" | python3 -c "import json,sys; v=json.load(sys.stdin); print(v$2)"; }
tree_bytes=$(du -sb --apparent-size /usr/share/man /usr/include /usr/lib/python3.11 | awk '{s+=$1} END {print s}')
files=$(find /usr/share/man /usr/include /usr/lib/python3.11 -type f | wc -l)

echo "# 1. lazy read-all, --no-prefetch, neighbour fetch off vs on" >&2
declare -A t_nf req_nf bytes_nf
for nf in 0 256K; do
  ts=()
  for r in $(seq "$runs"); do
    root="$work/lazy-$nf-$r"; roots+=("$root")
    STRATA_NEIGHBOUR_FETCH=$nf "$strata" --root "$root" mount "$ref" "$mnt" --no-prefetch >/dev/null
    ts+=("$(timed readall "$mnt")")
    req_nf[$nf]=$(stat_of "$root" "['fetch']['source_reads']")
    bytes_nf[$nf]=$(stat_of "$root" "['fetch']['source_bytes']")
    "$strata" --root "$root" umount "$mnt"; "$strata" --root "$root" daemon --stop >/dev/null
  done
  t_nf[$nf]=$(median "${ts[@]}")
done

echo "# 2+3. cold read-all: local image, disk cache, CPU bound" >&2
ts_local=(); ts_disk=(); ts_bound=()
for r in $(seq "$runs"); do
  drop_caches
  "$strata" --root "$build" mount bench/many:v1 "$mnt" --no-prefetch >/dev/null
  ts_local+=("$(timed readall "$mnt")")
  "$strata" --root "$build" umount "$mnt"; "$strata" --root "$build" daemon --stop >/dev/null

  root="$work/disk-$r"; roots+=("$root")
  "$strata" --root "$root" mount "$ref" "$mnt" --no-prefetch >/dev/null
  readall "$mnt"    # every chunk into the disk cache
  "$strata" --root "$root" umount "$mnt"; "$strata" --root "$root" daemon --stop >/dev/null
  drop_caches
  "$strata" --root "$root" mount "$ref" "$mnt" --no-prefetch >/dev/null
  ts_disk+=("$(timed readall "$mnt")")
  from_registry=$(stat_of "$root" "['fetch']['source_bytes']")
  "$strata" --root "$root" umount "$mnt"; "$strata" --root "$root" daemon --stop >/dev/null

  drop_caches
  ts_bound+=("$("$bound" "$build" bench/many:v1 | cut -d' ' -f1)")
done
t_local=$(median "${ts_local[@]}"); t_disk=$(median "${ts_disk[@]}"); t_bound=$(median "${ts_bound[@]}")

echo "# 3b. cold first read of a large file vs its CPU bound" >&2
sample="$repo/target/release/strata-sample"
mapfile -t real < <(find /usr/lib/x86_64-linux-gnu -maxdepth 1 -name '*.so*' -type f -size +5M 2>/dev/null | sort | head -40)
"$sample" "$work/large-src" --small-files 1 --large-file-mib 512 --compression gzip \
  ${real:+--large-file-from "${real[@]}"} >/dev/null
large="$work/large"; roots+=("$large")
"$strata" --root "$large" convert "oci:$work/large-src:v1" bench/large:v1 >/dev/null
ts_large=(); ts_lbound=()
for r in $(seq "$runs"); do
  drop_caches
  "$strata" --root "$large" mount bench/large:v1 "$mnt" --no-prefetch >/dev/null
  ts_large+=("$(timed catfile "$mnt/large.bin")")
  "$strata" --root "$large" umount "$mnt"; "$strata" --root "$large" daemon --stop >/dev/null
  drop_caches
  ts_lbound+=("$("$bound" "$large" bench/large:v1 | cut -d' ' -f1)")
done
t_large=$(median "${ts_large[@]}"); t_lbound=$(median "${ts_lbound[@]}")

echo "# 4. memory: one daemon with 10 mounts vs 10 daemons" >&2
rss() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }
subset() { (set +o pipefail; find "$1" -type f | head -3000 | xargs cat > /dev/null); }
one="$work/mem-one"; roots+=("$one")
for i in $(seq 10); do
  mkdir -p "$work/m$i"
  "$strata" --root "$one" mount "$ref" "$work/m$i" >/dev/null
  subset "$work/m$i"
done
pid_one=$("$strata" --root "$one" stats --json "$work/m1" | python3 -c 'import json,sys; print(json.load(sys.stdin)["pid"])')
mem_one=$(rss "$pid_one")
for i in $(seq 10); do "$strata" --root "$one" umount "$work/m$i"; done
"$strata" --root "$one" daemon --stop >/dev/null
mem_ten=0
for i in $(seq 10); do
  r="$work/mem-$i"; roots+=("$r")
  "$strata" --root "$r" mount "$ref" "$work/m$i" >/dev/null
  subset "$work/m$i"
  p=$("$strata" --root "$r" stats --json "$work/m$i" | python3 -c 'import json,sys; print(json.load(sys.stdin)["pid"])')
  mem_ten=$(( mem_ten + $(rss "$p") ))
done
for i in $(seq 10); do "$strata" --root "$work/mem-$i" umount "$work/m$i"; "$strata" --root "$work/mem-$i" daemon --stop >/dev/null; done

mbps() { echo "$tree_bytes / $1 / 1000000" | bc -l; }
echo
echo "Image: $files files, $(( tree_bytes / 1000000 )) MB; loopback docker-registry; medians of $runs runs; $(nproc) cores."
echo
echo "| read-all, lazy, --no-prefetch | time | throughput | range requests | bytes fetched |"
echo "|---|---|---|---|---|"
printf '| neighbour fetch off (one request per read) | %.2f s | %.1f MB/s | %s | %s |\n' "${t_nf[0]}" "$(mbps "${t_nf[0]}")" "${req_nf[0]}" "${bytes_nf[0]}"
printf '| neighbour fetch 256K (default) | %.2f s | %.1f MB/s | %s | %s |\n' "${t_nf[256K]}" "$(mbps "${t_nf[256K]}")" "${req_nf[256K]}" "${bytes_nf[256K]}"
printf '| **throughput ratio on/off** | **%.2f×** | | | |\n' "$(echo "${t_nf[0]} / ${t_nf[256K]}" | bc -l)"
echo
echo "| cold read-all | time | ratio |"
echo "|---|---|---|"
printf '| local strata image (decode + verify every chunk) | %.2f s | 1.00× |\n' "$t_local"
printf '| node disk cache (remote image, cached; %s bytes from the registry) | %.2f s | **%.2f×** speed of local |\n' "$from_registry" "$t_disk" "$(echo "$t_local / $t_disk" | bc -l)"
printf '| CPU bound: every chunk decoded + verified on %s cores, no FUSE | %.2f s | first read reaches **%.2f×** of it |\n' "$(nproc)" "$t_bound" "$(echo "$t_bound / $t_local" | bc -l)"
echo
echo "| cold first read of one 512 MiB file (real shared libraries), local image | time | ratio |"
echo "|---|---|---|"
printf '| through the mount (`cat`, readahead on every core) | %.2f s | |\n' "$t_large"
printf '| CPU bound: the same chunks decoded + verified on %s cores, no FUSE | %.2f s | first read reaches **%.2f×** of it |\n' "$(nproc)" "$t_lbound" "$(echo "$t_lbound / $t_large" | bc -l)"
echo
echo "| 10 mounts of the image, 3000 files read in each | resident memory |"
echo "|---|---|"
printf '| one daemon serving all 10 | %d MiB |\n' "$(( mem_one / 1024 ))"
printf '| 10 daemons, one mount each (the former design) | %d MiB |\n' "$(( mem_ten / 1024 ))"
printf '| **ratio** | **%.2f×** |\n' "$(echo "$mem_one / $mem_ten" | bc -l)"
