#!/usr/bin/env bash
# End-to-end benchmark of a local strata mount against the same tree on local disk, measured in
# one run so the ratios hold on a noisy shared machine. Needs root (FUSE, drop_caches), umoci and
# zstd. Prints a markdown table; docs/benchmarks.md records a run.
#
#   benches/e2e/mount-bench.sh [WORKDIR] [LARGE_FILE_MIB] [RUNS]
set -euo pipefail

work=${1:-/var/tmp/strata-bench}
large_mib=${2:-1024}
runs=${3:-3}
repo=$(cd "$(dirname "$0")/../.." && pwd)
cd "$repo"
cargo build --release --bins -q
strata="$repo/target/release/strata"
sample="$repo/target/release/strata-sample"

# Mounts left under work by an interrupted run go first: never rm -rf through a mount.
findmnt -rn -o TARGET | { grep "^${work}/" || true; } | sort -r | while read -r m; do umount "$m" || umount -l "$m"; done
rm -rf "$work"; mkdir -p "$work"
root="$work/store"; mnt="$work/mnt"; native="$work/native"
mkdir -p "$mnt"

echo "# generating the image (${large_mib} MiB large file + 10k small files)" >&2
# The large file is made of real shared libraries when there are some (realistic to compress).
mapfile -t real < <(find /usr/lib/x86_64-linux-gnu -maxdepth 1 -name '*.so*' -type f -size +5M 2>/dev/null | sort | head -40)
"$sample" "$work/src" --small-files 10000 --large-file-mib "$large_mib" --compression none \
  ${real:+--large-file-from "${real[@]}"} >&2
umoci unpack --image "$work/src:v1" "$work/bundle" >/dev/null 2>&1
mv "$work/bundle/rootfs" "$native"

drop_caches() { sync; echo 3 > /proc/sys/vm/drop_caches; }
now() { date +%s.%N; }
# median of the arguments
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
# time_cmd CMD...: seconds for one run
time_cmd() { local t0; t0=$(now); "$@" >/dev/null 2>&1; echo "$(now) - $t0" | bc -l; }

mount_args=()
mount_strata() { "$strata" --root "$root" mount bench:v1 "$mnt" "${mount_args[@]}" >/dev/null; }
umount_strata() { "$strata" --root "$root" umount "$mnt"; }

# measure NAME COLD(0/1) CMD-with-DIR-placeholder: prints "native strata" medians
measure() {
  local cold=$1; shift
  local n=() s=()
  for _ in $(seq "$runs"); do
    if [ "$cold" = 1 ]; then drop_caches; fi
    n+=("$(time_cmd "${@//DIR/$native}")")
    if [ "$cold" = 1 ]; then umount_strata; drop_caches; mount_strata; fi
    s+=("$(time_cmd "${@//DIR/$mnt}")")
  done
  echo "$(median "${n[@]}") $(median "${s[@]}")"
}

read_all() { find "$1" -type f -print0 | xargs -0 cat; }
stat_all() { find "$1" -printf '%i %s %m %u %g %T@\n'; }

# --- convert throughput vs zstd -3 -T2 on the same tar -----------------------------------
layers=$(python3 -c "import json,sys;m=json.load(open(sys.argv[1]));print(m['manifests'][0]['digest'][7:])" "$work/src/index.json")
manifest="$work/src/blobs/sha256/$layers"
mapfile -t blobs < <(python3 -c "import json,sys;[print(l['digest'][7:]) for l in json.load(open(sys.argv[1]))['layers']]" "$manifest")
total=0; for b in "${blobs[@]}"; do total=$((total + $(stat -c %s "$work/src/blobs/sha256/$b"))); done
cat "${blobs[@]/#/$work/src/blobs/sha256/}" > /dev/null   # warm the page cache for both
zs=(); cs=()
for _ in $(seq "$runs"); do
  t0=$(now); for b in "${blobs[@]}"; do zstd -3 -T2 -q -c "$work/src/blobs/sha256/$b" > /dev/null; done; zs+=("$(echo "$(now) - $t0" | bc -l)")
  rm -rf "$root"
  t0=$(now); "$strata" --root "$root" convert "oci:$work/src:v1" bench:v1 >/dev/null; cs+=("$(echo "$(now) - $t0" | bc -l)")
done
zt=$(median "${zs[@]}"); ct=$(median "${cs[@]}")

# First reads: no node cache, every chunk decoded and verified from the layer blob.
mount_args=(--cache-size 0)
mount_strata
read -r ln_f ls_f < <(measure 1 cat DIR/large.bin)
umount_strata
# With the node cache (what remote layers always get; local ones with --cache-local): one read
# fills it, then cold reads come from it.
mount_args=(--cache-local)
mount_strata
cat "$mnt/large.bin" > /dev/null
read -r ln_c ls_c < <(measure 1 cat DIR/large.bin)
read -r ln_w ls_w < <(measure 0 cat DIR/large.bin)
umount_strata
mount_args=()
mount_strata
read -r sn_c ss_c < <(measure 1 read_all DIR/many)
read -r sn_w ss_w < <(measure 0 read_all DIR/many)
read -r tn_c ts_c < <(measure 1 stat_all DIR)
read -r tn_w ts_w < <(measure 0 stat_all DIR)
umount_strata
# Passthrough: the first read also writes the file's whole copy; once it is written, reads go to
# that copy through the kernel. Every open reaches the daemon, which small files pay for.
mount_args=(--passthrough)
wait_copy() {   # until the mount has written the large file's copy (up to 60 s)
  for _ in $(seq 600); do
    [ -n "$(find "$root/cache/files" -mindepth 2 -type f -not -path "$root/cache/files/tmp/*" 2>/dev/null)" ] && return
    sleep 0.1
  done
}
pf=()
for _ in $(seq "$runs"); do   # first reads: no copy yet, it is written meanwhile
  rm -rf "$root/cache/files"; mount_strata; drop_caches
  pf+=("$(time_cmd cat "$mnt/large.bin")")
  wait_copy; umount_strata
done
pn_f=$ln_f; ps_f=$(median "${pf[@]}")
mount_strata
read -r pn_c ps_c < <(measure 1 cat DIR/large.bin)
read -r pn_w ps_w < <(measure 0 cat DIR/large.bin)
read -r psn_w pss_w < <(measure 0 read_all DIR/many)
umount_strata

mb=$(echo "$total / 1000000" | bc -l)
row() { printf '| %s | %.3f s | %.3f s | %.2f× |\n' "$1" "$2" "$3" "$(echo "$4" | bc -l)"; }
echo
echo "Machine: $(nproc) cores, $(uname -r); large file ${large_mib} MiB; median of $runs runs."
echo
echo "| workload | native | strata | ratio |"
echo "|---|---|---|---|"
row "large file, cold, first read (throughput strata/native)" "$ln_f" "$ls_f" "$ln_f / $ls_f"
row "large file, cold, node cache filled (throughput strata/native)" "$ln_c" "$ls_c" "$ln_c / $ls_c"
row "large file, warm (throughput strata/native)" "$ln_w" "$ls_w" "$ln_w / $ls_w"
row "large file, --passthrough, runs while its copy is written (throughput)" "$pn_f" "$ps_f" "$pn_f / $ps_f"
row "large file, --passthrough, cold, copy written (throughput)" "$pn_c" "$ps_c" "$pn_c / $ps_c"
row "large file, --passthrough, warm (throughput)" "$pn_w" "$ps_w" "$pn_w / $ps_w"
row "10k small files, --passthrough, warm (throughput)" "$psn_w" "$pss_w" "$psn_w / $pss_w"
row "10k small files, cold (throughput strata/native)" "$sn_c" "$ss_c" "$sn_c / $ss_c"
row "10k small files, warm (throughput strata/native)" "$sn_w" "$ss_w" "$sn_w / $ss_w"
row "find+stat all, cold (time strata/native)" "$tn_c" "$ts_c" "$ts_c / $tn_c"
row "find+stat all, warm (time strata/native)" "$tn_w" "$ts_w" "$ts_w / $tn_w"
printf '| convert %.0f MB of tar (throughput strata/zstd -3 -T2) | %.3f s (zstd) | %.3f s | %.2f× |\n' \
  "$mb" "$zt" "$ct" "$(echo "$zt / $ct" | bc -l)"
printf '\nconvert: strata %.0f MB/s, zstd -3 -T2 %.0f MB/s\n' "$(echo "$mb / $ct" | bc -l)" "$(echo "$mb / $zt" | bc -l)"
