#!/usr/bin/env bash
# Containers on lazy images, against podman on the same machine in the same run (needs root):
#
#   1. cold start: `strata run --rm IMAGE /bin/true` from an empty store against a local
#      registry, vs `podman pull` + `podman run --rm` of the same image as published (gzip), for
#      a small and a large image;
#   2. warm start: the same with the image already local (median of 5);
#   3. commit: `strata commit` of a container whose upper layer holds ~500 MB of real files, vs
#      `tar -c | zstd -3 -T2` of the same upper directory.
#
#   benches/e2e/container-bench.sh [WORKDIR]
#
# Images: busybox-static (for /bin/true, sh, cp) plus files of this machine's /usr, in three
# layers each. Figures are ratios against the baseline measured in the same run.
set -euo pipefail
work=${1:-/var/tmp/strata-containers}
repo=$(cd "$(dirname "$0")/../.." && pwd)
cd "$repo"
cargo build --release --bins -q
strata="$repo/target/release/strata"

cleanup() {
  for r in "$work"/strata-*; do
    [ -S "$r/daemon.sock" ] && "$strata" --root "$r" daemon --stop --forget >/dev/null 2>&1 || true
  done
  [ -n "${reg_pid:-}" ] && kill "$reg_pid" 2>/dev/null || true
  for p in "$work"/podman-*; do
    [ -d "$p" ] && podman --root "$p/root" --runroot "/run/strata-bench-${p##*-}" --storage-driver overlay \
      system reset -f >/dev/null 2>&1 || true
  done
}
trap cleanup EXIT
findmnt -rn -o TARGET | { grep "^${work}/" || true; } | sort -r | while read -r m; do umount "$m" || umount -l "$m"; done
rm -rf "$work"; mkdir -p "$work"
now() { date +%s.%N; }
since() { echo "$(now) - $1" | bc; }
ratio() { echo "scale=3; $1 / $2" | bc; }

echo "# building the images" >&2
mkimage() { # NAME DIR...: an OCI layout at $work/src-NAME, busybox in the first layer
  local name=$1; shift
  python3 "$repo/benches/e2e/mkimage.py" "$work/src-$name" "$@"
}
small_bytes=$(mkimage small /usr/lib/python3.11 /usr/share/vim)
large_bytes=$(mkimage large /usr/lib/python3.11 /usr/lib/x86_64-linux-gnu /usr/share/man)

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
mkdir -p "$work/registry"
cat > "$work/registry/config.yml" <<YML
version: 0.1
storage:
  filesystem:
    rootdirectory: $work/registry/data
http:
  addr: 127.0.0.1:$port
YML
docker-registry serve "$work/registry/config.yml" > "$work/registry/log" 2>&1 &
reg_pid=$!
for _ in $(seq 50); do curl -sf "http://127.0.0.1:$port/v2/" >/dev/null && break; sleep 0.1; done
reg=127.0.0.1:$port
for s in small large; do
  skopeo copy -q --dest-tls-verify=false "oci:$work/src-$s:v1" "docker://$reg/bench/$s:gzip"
  "$strata" --root "$work/convert" convert "oci:$work/src-$s:v1" "$reg/bench/$s:strata" >/dev/null
done

pod() { # podman with storage of its own under $work/podman-$1
  local p="$work/podman-$1"; shift
  podman --root "$p/root" --runroot "/run/strata-bench-$1" --storage-driver overlay --events-backend file "$@"
}
podrun=(run --rm --network none --ulimit nofile=20000:20000 --ulimit nproc=1000:1000)

printf '%-8s %10s %12s %12s %8s\n' image "gzip MB" "podman s" "strata s" ratio
for s in small large; do
  bytes=$([ $s = small ] && echo "$small_bytes" || echo "$large_bytes")
  t=$(now)
  pod "$s" pull -q --tls-verify=false "$reg/bench/$s:gzip" >/dev/null
  pod "$s" "${podrun[@]}" "$reg/bench/$s:gzip" /bin/true
  podman_s=$(since "$t")
  t=$(now)
  "$strata" --root "$work/strata-$s" run --rm "$reg/bench/$s:strata" /bin/true
  strata_s=$(since "$t")
  printf '%-8s %10.1f %12.2f %12.2f %8.3f\n' "$s" "$(echo "$bytes / 1000000" | bc -l)" \
    "$podman_s" "$strata_s" "$(ratio "$strata_s" "$podman_s")"
  eval "cold_${s}_ratio=$(ratio "$strata_s" "$podman_s")"
done

echo
echo "# warm start (image local, median of 5)"
median() { sort -n | sed -n 3p; }
pw=$(for _ in 1 2 3 4 5; do t=$(now); pod large "${podrun[@]}" "$reg/bench/large:gzip" /bin/true; since "$t"; done | median)
sw=$(for _ in 1 2 3 4 5; do t=$(now); "$strata" --root "$work/strata-large" run --rm "$reg/bench/large:strata" /bin/true; since "$t"; done | median)
printf 'podman run --rm: %.3f s   strata run --rm: %.3f s   ratio %.3f\n' "$pw" "$sw" "$(ratio "$sw" "$pw")"

echo
echo "# commit of a ~500 MB upper layer"
root="$work/strata-large"
"$strata" --root "$root" run --name big -v /usr/lib:/src:ro "$reg/bench/small:strata" \
  /bin/sh -c 'mkdir -p /data && cp -a /src/llvm-14 /src/gcc /src/python3.11 /data/'
upper=$("$strata" --root "$root" inspect big | python3 -c 'import json,sys; print(json.load(sys.stdin)["upper"])')
size=$(du -sb "$upper" | cut -f1)
# Alternating, each from a cold page cache; medians of 3.
for _ in 1 2 3; do
  sync; echo 3 > /proc/sys/vm/drop_caches
  t=$(now); tar -C "$upper" -cf - . | zstd -3 -T2 -q > "$work/baseline.tar.zst"; since "$t" >> "$work/tar.times"
  sync; echo 3 > /proc/sys/vm/drop_caches
  t=$(now); "$strata" --root "$root" commit big bench/committed >/dev/null; since "$t" >> "$work/commit.times"
done
median3() { sort -n | sed -n 2p; }
tar_s=$(median3 < "$work/tar.times"); commit_s=$(median3 < "$work/commit.times")
printf 'upper %d MB: tar|zstd -3 -T2 %.2f s (%.0f MB/s)   strata commit %.2f s (%.0f MB/s)   throughput ratio %.3f\n' \
  $((size / 1000000)) "$tar_s" "$(echo "$size / 1000000 / $tar_s" | bc -l)" \
  "$commit_s" "$(echo "$size / 1000000 / $commit_s" | bc -l)" "$(ratio "$tar_s" "$commit_s")"
"$strata" --root "$root" rm big >/dev/null
