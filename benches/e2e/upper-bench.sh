#!/usr/bin/env bash
# Writable layers over the same lazy lower, in one run (needs root):
#
#   strata's FUSE writable layer (`strata mount --upper DIR --fuse-upper`) vs fuse-overlayfs
#   (over a read-only strata mount of the same image) vs kernel overlayfs (`strata mount
#   --upper DIR`), each workload on a fresh upper directory:
#
#   1. untar of a source tree (20,000 files from this machine's /usr) into the view;
#   2. a 1 GiB sequential write (dd bs=1M, fsync at the end);
#   3. `chmod -R g+w` of an image directory (/usr/share/man: ~21k files, metadata copy-ups);
#   4. copy-up-heavy: append one byte to every file of an image directory (/usr/lib/python3.11).
#
#   benches/e2e/upper-bench.sh [WORKDIR] [ROUNDS]      (WORKLOADS="untar chmodr" for a subset)
#
# Every view's upper directory is on a freshly made ext4 filesystem (a 3 GiB loop device): the
# host's own filesystem, full and fragmented, would time its inode allocator instead. Each
# figure is the median of ROUNDS (default 3) alternating runs; ratios are throughput ratios
# against the baselines measured in the same run (higher is better for strata).
set -euo pipefail
work=${1:-/var/tmp/strata-upper}
rounds=${2:-3}
repo=$(cd "$(dirname "$0")/../.." && pwd)
cd "$repo"
cargo build --release --bins -q
strata="$repo/target/release/strata"
root="$work/node"

loopdev=
unmount_all() {
  findmnt -rn -o TARGET | { grep "^${work}/" || true; } | sort -r |
    while read -r m; do umount "$m" 2>/dev/null || umount -l "$m"; done
}
cleanup() {
  unmount_all
  [ -S "$root/daemon.sock" ] && "$strata" --root "$root" daemon --stop --forget >/dev/null 2>&1 || true
  [ -n "$loopdev" ] && losetup -d "$loopdev" 2>/dev/null || true
}
trap cleanup EXIT
unmount_all
rm -rf "$work"; mkdir -p "$work"
now() { date +%s.%N; }
since() { echo "$(now) - $1" | bc; }

echo "# building the image and the source tarball" >&2
python3 "$repo/benches/e2e/mkimage.py" "$work/src" /usr/lib/python3.11 /usr/share/man >/dev/null
"$strata" --root "$root" convert "oci:$work/src:v1" bench/upper:v1 >/dev/null
python3 - "$work/tree.tar" <<'PY'
import os, sys, tarfile
# 20,000 files of real sources and text, as a source tree would hold them.
n = 0
with tarfile.open(sys.argv[1], "w") as t:
    for top in ["/usr/include", "/usr/share/perl", "/usr/lib/python3.11", "/usr/share/man"]:
        for d, _, files in os.walk(top):
            for f in files:
                p = os.path.join(d, f)
                if n == 20000 or not os.path.isfile(p) or os.path.islink(p):
                    continue
                t.add(p, arcname="src" + p, recursive=False)
                n += 1
print(n, file=sys.stderr)
PY
tree_mb=$(echo "$(stat -c %s "$work/tree.tar") / 1000000" | bc -l)

# The lower fuse-overlayfs stacks on: a read-only lazy mount of the same image.
mkdir -p "$work/lower"
"$strata" --root "$root" mount bench/upper:v1 "$work/lower" >/dev/null
# Warm the store's chunk cache once for every mode alike: the lower's reads are not measured.
tar -C "$work/lower" -cf - usr/lib/python3.11 usr/share/man >/dev/null

truncate -s 3G "$work/upper.img"
loopdev=$(losetup -f --show "$work/upper.img")
view() { # MODE N: mounts a fresh view (its upper on a new ext4), prints its path
  local mode=$1 n=$2 d="$work/$1-$2"
  mkdir -p "$d/mnt" "$d/dir"
  mkfs.ext4 -q -F "$loopdev" && mount "$loopdev" "$d/dir"
  case $mode in
    strata) "$strata" --root "$root" mount --upper "$d/dir" --fuse-upper bench/upper:v1 "$d/mnt" >/dev/null ;;
    kernel) "$strata" --root "$root" mount --upper "$d/dir" bench/upper:v1 "$d/mnt" >/dev/null ;;
    fuse-overlayfs)
      mkdir -p "$d/dir/upper" "$d/dir/work"
      fuse-overlayfs -o "lowerdir=$work/lower,upperdir=$d/dir/upper,workdir=$d/dir/work" "$d/mnt" ;;
  esac
  echo "$d/mnt"
}
drop() { # MODE N
  local d="$work/$1-$2"
  case $1 in
    fuse-overlayfs) umount "$d/mnt" ;;
    *) "$strata" --root "$root" umount "$d/mnt" >/dev/null ;;
  esac
  # A FUSE daemon lets go of the upper dir when its session ends, just after the unmount.
  for _ in $(seq 50); do umount "$d/dir" 2>/dev/null && break; sleep 0.1; done
  rm -rf "$d"
}

untar() { tar -C "$1" -xf "$work/tree.tar"; sync -f "$1"; }
seqwrite() { dd if=/dev/zero of="$1/big" bs=1M count=1024 conv=fsync status=none; }
chmodr() { chmod -R g+w "$1/usr/share/man"; sync -f "$1"; }
copyup() {
  python3 - "$1/usr/lib/python3.11" <<'PY'
import os, sys
for d, _, files in os.walk(sys.argv[1]):
    for f in files:
        p = os.path.join(d, f)
        if not os.path.islink(p):
            with open(p, "ab") as fh:
                fh.write(b"\n")
PY
  sync -f "$1"
}

modes=(kernel fuse-overlayfs strata)
read -r -a workloads <<< "${WORKLOADS:-untar seqwrite chmodr copyup}"
n=0
for _ in $(seq "$rounds"); do
  for w in "${workloads[@]}"; do
    for m in "${modes[@]}"; do
      n=$((n + 1))
      mnt=$(view "$m" "$n")
      sync; echo 3 > /proc/sys/vm/drop_caches
      t=$(now); "$w" "$mnt"; since "$t" >> "$work/$w.$m.times"
      drop "$m" "$n"
    done
  done
done

median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
units() { # WORKLOAD: amount and unit of work, for throughputs
  case $1 in
    untar) echo "20000 files" ;;
    seqwrite) echo "1024 MiB" ;;
    chmodr) echo "$(find "$work/lower/usr/share/man" | wc -l) entries" ;;
    copyup) echo "$(find "$work/lower/usr/lib/python3.11" -type f | wc -l) files" ;;
  esac
}
echo
echo "# medians of $rounds (seconds); ratios: strata's throughput over the baseline's"
printf '%-9s %-14s %9s %15s %9s %12s %12s\n' workload work kernel fuse-overlayfs strata "vs fuse-ovl" "vs kernel"
for w in "${workloads[@]}"; do
  k=$(median < "$work/$w.kernel.times")
  f=$(median < "$work/$w.fuse-overlayfs.times")
  s=$(median < "$work/$w.strata.times")
  printf '%-9s %-14s %9.2f %15.2f %9.2f %12.2f %12.2f\n' "$w" "$(units "$w")" "$k" "$f" "$s" \
    "$(echo "$f / $s" | bc -l)" "$(echo "$k / $s" | bc -l)"
done
echo "(source tree: ${tree_mb%.*} MB)"
