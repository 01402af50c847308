#!/usr/bin/env bash
# How the chunk size of executables and the kernel readahead of a lazy mount trade bytes for
# time at `exec` (needs root: network namespace, FUSE, chroot, drop_caches):
#
#   benches/e2e/exec-chunks.sh [WORKDIR]        (default /var/tmp/strata-execbench)
#
# One image (benches/e2e/mkimage.py with no directories: busybox-static as /bin/true and a few
# files of /etc) converted with each --exec-chunk-size of SIZES, served by docker-registry behind
# a 100 Mbit/s link (shared/bench/shaped-link.sh). Each run: a fresh store, `strata mount
# --no-prefetch --read-ahead-kb RA` of the image, page cache dropped, then the wall time of
# `chroot MOUNT /bin/true` and the GET requests and bytes the registry served for it (its access
# log). Prints one line per run and the medians per configuration.
#
# Knobs (environment): STRATA=PATH (strata binary; default target/release/strata, built unless
# SKIP_BUILD=1), SIZES="32K 16K 64K 0" (0 = the layer's 1 MiB chunks), RAS="16 4 1024"
# (readahead in KiB), REPS=5, RATE=100mbit.
set -euo pipefail
work=${1:-/var/tmp/strata-execbench}
repo=$(cd "$(dirname "$0")/../.." && pwd)
link="$repo/../shared/bench/shaped-link.sh"
# shellcheck source=benches/e2e/registry.sh
. "$repo/benches/e2e/registry.sh"
[ -n "${SKIP_BUILD:-}" ] || (cd "$repo" && cargo build --release --bins -q)
strata=${STRATA:-$repo/target/release/strata}
sizes=${SIZES:-32K 16K 64K 0}
ras=${RAS:-16 4 1024}
reps=${REPS:-5}
rate=${RATE:-100mbit}
ns=strata-execbench
for tool in docker-registry curl chroot; do
  command -v "$tool" >/dev/null || { echo "error: $tool missing" >&2; exit 1; }
done

reg_pid=''
cleanup() {
  findmnt -rn -o TARGET | { grep "^$work/" || true; } | sort -r | while read -r m; do umount -l "$m"; done
  [ -z "$reg_pid" ] || kill "$reg_pid" 2>/dev/null || true
  bash "$link" down "$ns" >/dev/null 2>&1 || true
}
trap cleanup EXIT
cleanup
rm -rf "$work"; mkdir -p "$work/registry"
python3 "$repo/benches/e2e/mkimage.py" "$work/src" > /dev/null

# registry ADDR: the config serving $work/registry/data at ADDR.
registry() { registry_config "$work/registry/config.yml" "$work/registry/data" "$1"; }

# Convert each variant, pushed to a loopback registry over the same storage.
port=$(free_port)
registry "127.0.0.1:$port"
docker-registry serve "$work/registry/config.yml" > "$work/registry/convert.log" 2>&1 &
reg_pid=$!
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$port/v2/" >/dev/null && break; sleep 0.1; done
for s in $sizes; do
  "$strata" --root "$work/convert-$s" convert --exec-chunk-size "$s" "oci:$work/src:v1" \
    "127.0.0.1:$port/bench/exec:c$s" > /dev/null
done
kill "$reg_pid"; wait "$reg_pid" 2>/dev/null || true; reg_pid=

addr=$(bash "$link" up "$ns" "$rate")
registry "0.0.0.0:5000"
: > "$work/registry/log"
bash "$link" exec "$ns" docker-registry serve "$work/registry/config.yml" >> "$work/registry/log" 2>&1 &
reg_pid=$!
for _ in $(seq 100); do curl -sf "http://$addr:5000/v2/" >/dev/null && break; sleep 0.1; done
export STRATA_INSECURE_REGISTRIES="$addr:5000"

: > "$work/results.tsv"
mnt=$work/mnt
for rep in $(seq "$reps"); do
  for s in $sizes; do
    for ra in $ras; do
      root=$work/run-$s-$ra-$rep
      mkdir -p "$root" "$mnt"
      "$strata" --root "$root" mount --no-prefetch --read-ahead-kb "$ra" "$addr:5000/bench/exec:c$s" "$mnt" > /dev/null
      sync; echo 3 > /proc/sys/vm/drop_caches
      mark=$(wc -l < "$work/registry/log")
      t0=$(date +%s%N)
      chroot "$mnt" /bin/true
      ms=$(( ($(date +%s%N) - t0) / 1000000 ))
      read -r bytes requests < <(tail -n +"$(( mark + 1 ))" "$work/registry/log" | grep '"GET ' |
        awk '{ s += $10; n++ } END { print s + 0, n + 0 }')
      printf '%s\t%s\t%s\t%s\t%s\n' "$s" "$ra" "$ms" "$bytes" "$requests" >> "$work/results.tsv"
      printf '  exec chunks %-4s readahead %4s KiB: %4d ms %8d bytes %3d requests\n' "$s" "$ra" "$ms" "$bytes" "$requests" >&2
      "$strata" --root "$root" umount "$mnt" > /dev/null 2>&1 || umount -l "$mnt"
      "$strata" --root "$root" daemon --stop --forget > /dev/null 2>&1 || true
    done
  done
done

echo
echo "| exec chunk size | readahead | exec time (median of $reps) | bytes fetched | requests |"
echo "|---|---|---|---|---|"
for s in $sizes; do
  for ra in $ras; do
    awk -F'\t' -v s="$s" -v ra="$ra" '$1 == s && $2 == ra { print $3, $4, $5 }' "$work/results.tsv" |
      sort -n | awk -v s="$s" -v ra="$ra" '{ t[NR] = $1; b = $2; n = $3 }
        END { m = NR % 2 ? t[(NR + 1) / 2] : (t[NR / 2] + t[NR / 2 + 1]) / 2
              printf "| %s | %s KiB | %d ms | %.2f MB | %d |\n", (s == "0" ? "1 MiB (off)" : s), ra, m, b / 1e6, n }'
  done
done
