#!/usr/bin/env bash
# Lazy pulling through containerd, three snapshotters side by side on the same images and the same
# link (needs root: network namespace, FUSE, drop_caches, nft):
#
#   strata     `strata rpull` (manifest, config, TOCs; committed lazy snapshots) on the strata
#              snapshotter (`strata snapshotter`, a [proxy_plugins] entry), image from `strata convert`;
#   stargz     `ctr-remote image rpull` on containerd-stargz-grpc (stargz 0.12, built from Debian's
#              packages by shared/bench/stargz-snapshotter.sh), image from `ctr-remote image
#              convert --oci --estargz` (gzip level 9, the default);
#   overlayfs  `ctr image pull` (full pull + unpack) on containerd's built-in snapshotter, the
#              published gzip image;
#   strata-profile    strata with an access profile published next to the image (the same
#              manifest, in a repository of its own), recorded from `/bin/true` on a lazy mount
#              with the snapshotter's 16 KiB readahead (`strata mount --record-profile`, then
#              `strata push-profile`): rpull fetches it, the layer mounts fetch the pages it
#              names at once;
#   stargz-optimized  its counterpart: `ctr-remote image optimize --oci --entrypoint
#              '["/bin/true"]'` (runs /bin/true, puts the files it read first in their layer
#              behind a prefetch landmark, which the snapshotter fetches when it mounts the layer).
#   The profile variants are opt-in (SNAPSHOTTERS), as they need the workload in advance.
#
#   benches/e2e/snapshotter-bench.sh [WORKDIR]          (default /var/tmp/strata-snapbench)
#
# Images (benches/e2e/mkimage.py: busybox-static in the first layer, then one gzip layer per
# directory of this machine): "large", 4 layers, ~255 MB gzip (/usr/lib/x86_64-linux-gnu,
# /usr/lib/python3.11, /usr/share/i18n); "small", 3 layers, ~55 MB (/usr/lib/python3.11,
# /usr/share/man). The three formats are converted from the same OCI layout.
# Links: the registry (docker-registry) behind a 100 Mbit/s link (shared/bench/shaped-link.sh,
# TBF, no added latency), then on loopback.
# Workloads, each the first command of a fresh pull:
#   true   `/bin/true`: time to first command;
#   read30 `sh -c 'cat F1 … F30 > /dev/null'`: 30 regular files (≤ 2 MiB each, names of safe
#          characters) spread evenly over the non-busybox layers, picked at even intervals from
#          each layer's sorted file list (deterministic for given image contents).
# Every measurement starts from nothing: a fresh containerd (root, state), a fresh snapshotter
# root (which holds stargz's and strata's caches), the page cache dropped; then the time is the
# wall time of pull + `ctr run --rm --snapshotter X REF ID CMD`.
# Bytes fetched = bytes the registry sent up to the end of `ctr run` (IP packets, headers
# included): the rx counter of the host side of the shaped link's veth, and on loopback an nft
# counter on packets leaving the registry's port. Background fetching that goes on after the
# command (stargz starts it after 5 s without a mount; strata's prefetch) is not counted. The
# registry's access log (GET response bytes of the requests completed by then) is printed too.
# stargz keeps its defaults: background fetch on, prefetch by landmark (ctr-remote's eStargz
# without --estargz-record-in has .no.prefetch.landmark: no prefetch; rpull's 10 MiB prefetch label
# applies only to layers without a landmark), 50 kB chunks, 2 concurrent background tasks, FUSE
# attr/entry timeout 1 s; its resolver config only maps each registry to a plain-HTTP mirror.
# strata keeps its defaults too (background prefetch of the rest of each layer, neighbour fetch
# 256K, 1 MiB chunks and 32 KiB ones for ELF executables, 16 KiB kernel readahead per layer); its rpull and snapshotter reach the shaped link's registry over plain HTTP
# through STRATA_INSECURE_REGISTRIES (loopback is plain HTTP by default).
#
# Knobs (environment): SKIP_BUILD=1 (no cargo build), REUSE=1 (keep WORKDIR's source
# images, gzip and eStargz images from an earlier run; strata's is converted again),
# STRATA_CONVERT_ARGS and STRATA_SNAPSHOTTER_ARGS (extra flags of strata's convert and
# snapshotter), STRATA=PATH (strata binary),
# STARGZ_BIN=DIR (where containerd-stargz-grpc is, built there if missing; /var/tmp/stargz-bin),
# SNAPSHOTTERS="strata stargz overlayfs" (add strata-profile and stargz-optimized for the
# profiled pair), LINKS="shaped loopback", IMAGES="large small",
# WORKLOADS="true read30", RATE=100mbit, REPEAT=5 (runs per lazy figure, interleaved; medians
# shown), REPEAT_FULL=1 (runs per overlayfs figure: a full pull varies little and takes long).
set -euo pipefail
work=${1:-/var/tmp/strata-snapbench}
repo=$(cd "$(dirname "$0")/../.." && pwd)
link="$repo/../shared/bench/shaped-link.sh"
# shellcheck source=benches/e2e/registry.sh
. "$repo/benches/e2e/registry.sh"
cd "$repo"
[ -n "${SKIP_BUILD:-}" ] || cargo build --release --bins -q
strata=${STRATA:-$repo/target/release/strata}
stargz_bin=${STARGZ_BIN:-/var/tmp/stargz-bin}
snapshotters=${SNAPSHOTTERS:-strata stargz overlayfs}
links=${LINKS:-shaped loopback}
images=${IMAGES:-large small}
workloads=${WORKLOADS:-true read30}
rate=${RATE:-100mbit}
repeat=${REPEAT:-5}
repeat_full=${REPEAT_FULL:-1}
ns='strata-snapbench'
nft_table=strata_snapbench
has() { case " $1 " in *" $2 "*) return 0 ;; *) return 1 ;; esac; }
has_strata() { has "$snapshotters" strata || has "$snapshotters" strata-profile; }
has_stargz() { has "$snapshotters" stargz || has "$snapshotters" stargz-optimized; }

for tool in containerd ctr runc docker-registry skopeo nft bc curl; do
  command -v "$tool" >/dev/null || { echo "error: $tool missing (apt-get install containerd runc docker-registry skopeo nftables bc curl)" >&2; exit 1; }
done
if has_stargz; then
  command -v ctr-remote >/dev/null || { echo "error: ctr-remote missing (apt-get install stargz-snapshotter)" >&2; exit 1; }
  [ -x "$stargz_bin/containerd-stargz-grpc" ] || bash "$repo/../shared/bench/stargz-snapshotter.sh" build "$stargz_bin" >&2
fi
if has_strata; then
  "$strata" rpull --help >/dev/null 2>&1 || {
    echo "error: $strata has no rpull; run with SNAPSHOTTERS='stargz overlayfs' to leave strata out" >&2; exit 1; }
fi

# Unix socket paths must stay short: containerd's socket and state, and the snapshotters' sockets,
# live in a short directory under /tmp.
run=$(mktemp -d /tmp/snapb.XXXXXX)
ctd_pid='' sn_pid='' sn_root='' reg_pid=''
unmount_under() { # DIR: every mount under DIR, deepest first (never rm -rf through a mount)
  findmnt -rn -o TARGET | { grep "^$1/" || true; } | sort -r | while read -r m; do umount "$m" || umount -l "$m"; done
}
stop_pid() { # PID: SIGTERM, then SIGKILL after 15 s
  local p=$1
  [ -n "$p" ] && kill -0 "$p" 2>/dev/null || return 0
  kill "$p" 2>/dev/null || true
  for _ in $(seq 150); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
  kill -9 "$p" 2>/dev/null || true
  wait "$p" 2>/dev/null || true
}
stop_daemons() { # containerd first (it holds the snapshotter), then the snapshotter
  stop_pid "$ctd_pid"; ctd_pid=
  stop_pid "$sn_pid"; sn_pid=
  if [ -n "$sn_root" ] && [ -S "$sn_root/daemon.sock" ]; then
    "$strata" --root "$sn_root" daemon --stop --forget >/dev/null 2>&1 || true
  fi
  sn_root=
  unmount_under "$run"; unmount_under "$work"
}
cleanup() {
  stop_daemons
  stop_pid "$reg_pid"
  bash "$link" down "$ns" >/dev/null 2>&1 || true
  nft delete table inet "$nft_table" 2>/dev/null || true
  unmount_under "$run"; rm -rf "$run"
}
trap cleanup EXIT
unmount_under "$work"
reuse=${REUSE:-}
if [ -n "$reuse" ] && [ -d "$work/registry/data" ]; then
  rm -rf "$work/runs" "$work/registry/"*.log
else
  reuse=; rm -rf "$work"; mkdir -p "$work"
fi
now() { date +%s.%N; }
since() { echo "$(now) - $1" | bc; }
ratio() { echo "scale=3; $1 / $2" | bc; }
wait_sock() { for _ in $(seq 300); do [ -S "$1" ] && return 0; sleep 0.1; done; echo "error: $1 never appeared" >&2; exit 1; }
ctr_() { ctr -a "$run/c.sock" "$@"; }

start_containerd() { # DIR: containerd with its root in DIR, its state and socket in $run
  rm -rf "$run/state"; rm -f "$run/c.sock"
  mkdir -p "$1"
  cat > "$1/containerd.toml" <<TOML
version = 2
root = "$1/root"
state = "$run/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "$run/c.sock"
[debug]
  level = "${CONTAINERD_LOG_LEVEL:-info}"
[plugins."io.containerd.internal.v1.opt"]
  path = "$1/opt"
[proxy_plugins]
  [proxy_plugins.stargz]
    type = "snapshot"
    address = "$run/z.sock"
  [proxy_plugins.strata]
    type = "snapshot"
    address = "$run/s.sock"
TOML
  containerd --config "$1/containerd.toml" > "$1/containerd.log" 2>&1 &
  ctd_pid=$!
  wait_sock "$run/c.sock"
  for _ in $(seq 100); do ctr_ version >/dev/null 2>&1 && return 0; sleep 0.1; done
  echo "error: containerd did not start (see $1/containerd.log)" >&2; exit 1
}
start_snapshotter() { # NAME DIR: the proxy snapshotter NAME with its root (and caches) in DIR
  case $1 in
    stargz|stargz-optimized)
      mkdir -p "$2"; rm -f "$run/z.sock"
      "$stargz_bin/containerd-stargz-grpc" --address "$run/z.sock" --root "$2" \
        --config "$work/stargz.toml" --log-level info > "$2.log" 2>&1 &
      sn_pid=$!; wait_sock "$run/z.sock" ;;
    strata|strata-profile)
      # The node daemon runs before any pull, as under systemd (strata-daemon.service): it is
      # the snapshotter's half that owns mounts and caches, as containerd-stargz-grpc's own.
      mkdir -p "$2"; rm -f "$run/s.sock"
      "$strata" --root "$2" daemon > "$2.daemon.log" 2>&1 &
      for _ in $(seq 100); do [ -S "$2/daemon.sock" ] && break; sleep 0.05; done
      "$strata" --root "$2" snapshotter --address "$run/s.sock" ${STRATA_SNAPSHOTTER_ARGS:-} > "$2.log" 2>&1 &
      sn_pid=$!; sn_root=$2; wait_sock "$run/s.sock" ;;
  esac
}

echo "# building the images" >&2
declare -A dirs=(
  [large]="/usr/lib/x86_64-linux-gnu /usr/lib/python3.11 /usr/share/i18n"
  [small]="/usr/lib/python3.11 /usr/share/man"
)
declare -A files
for img in $images; do
  # shellcheck disable=SC2086
  [ -n "$reuse" ] || python3 "$repo/benches/e2e/mkimage.py" "$work/src-$img" ${dirs[$img]} > /dev/null
  # The read30 workload: 30 files spread over the layers after busybox's.
  files[$img]=$(python3 - "$work/src-$img" <<'PY'
import json, re, sys, tarfile
out = sys.argv[1]
blob = lambda d: f"{out}/blobs/sha256/" + d.split(":")[1]
manifest = json.load(open(blob(json.load(open(f"{out}/index.json"))["manifests"][0]["digest"])))
layers = manifest["layers"][1:]
safe = re.compile(r"^[A-Za-z0-9._+/-]+$")
picked = []
for i, l in enumerate(layers):
    n = 30 // len(layers) + (1 if i < 30 % len(layers) else 0)
    with tarfile.open(blob(l["digest"]), "r:gz") as t:
        names = sorted(m.name for m in t if m.isreg() and 0 < m.size <= 2 << 20 and safe.match(m.name))
    step = len(names) / n
    picked += ["/" + names[int(k * step + step / 2)] for k in range(n)]
print(" ".join(picked))
PY
)
done

echo "# converting and pushing (gzip as built, eStargz, strata) to a loopback registry" >&2
mkdir -p "$work/registry"
reg_config() { registry_config "$work/registry/$2.yml" "$work/registry/data" "$1"; } # ADDR NAME
port=$(free_port)
loop_reg=127.0.0.1:$port
start_loop_registry() {
  reg_config "$loop_reg" loopback
  docker-registry serve "$work/registry/loopback.yml" >> "$work/registry/loopback.log" 2>&1 &
  reg_pid=$!
  for _ in $(seq 100); do curl -sf "http://$loop_reg/v2/" >/dev/null && return 0; sleep 0.1; done
  echo "error: registry did not start" >&2; exit 1
}
start_loop_registry
if has_stargz; then
  start_containerd "$work/convert-ctd"
fi
# stargz-optimized: eStargz optimised for the first command (`ctr-remote image optimize`, which
# runs /bin/true in a container and puts the files it read first in their layers, behind a
# prefetch landmark that the stargz snapshotter fetches when it mounts the layer): the
# counterpart of strata-profile. Built once per WORKDIR (minutes: gzip level 9 on every layer).
optimize_esgz() { # REF (without tag)
  curl -sf -o /dev/null -H 'Accept: application/vnd.oci.image.manifest.v1+json' \
    "http://$loop_reg/v2/${1#*/}/manifests/esgz-opt" && return 0
  ctr_ content fetch --plain-http "$1:gzip" > /dev/null
  ctr-remote -a "$run/c.sock" image optimize --oci --entrypoint='["/bin/true"]' \
    --record-out "$work/esgz-opt-${1##*/}.json" "$1:gzip" "$1:esgz-opt" > "$work/esgz-opt-${1##*/}.log" 2>&1 ||
    { cat "$work/esgz-opt-${1##*/}.log" >&2; exit 1; }
  ctr_ image push --plain-http "$1:esgz-opt" > /dev/null
}
for img in $images; do
  r=$loop_reg/bench/$img
  if [ -n "$reuse" ]; then
    if has "$snapshotters" stargz-optimized; then optimize_esgz "$r"; fi
    # strata's image is converted again: its converter is what changes between runs.
    if has_strata; then
      rm -rf "$work/convert-strata"
      "$strata" --root "$work/convert-strata" convert ${STRATA_CONVERT_ARGS:-} "oci:$work/src-$img:v1" "$r:strata" > /dev/null 2> "$work/convert-$img.log" ||
        { cat "$work/convert-$img.log" >&2; exit 1; }
    fi
    continue
  fi
  skopeo copy -q --dest-tls-verify=false "oci:$work/src-$img:v1" "docker://$r:gzip"
  if has "$snapshotters" stargz; then
    ctr_ content fetch --plain-http "$r:gzip" > /dev/null
    ctr-remote -a "$run/c.sock" image convert --oci --estargz "$r:gzip" "$r:esgz" > /dev/null
    ctr_ image push --plain-http "$r:esgz" > /dev/null
  fi
  if has "$snapshotters" stargz-optimized; then optimize_esgz "$r"; fi
  if has_strata; then
    "$strata" --root "$work/convert-strata" convert ${STRATA_CONVERT_ARGS:-} "oci:$work/src-$img:v1" "$r:strata" > /dev/null 2> "$work/convert-$img.log" ||
      { cat "$work/convert-$img.log" >&2; exit 1; }
  fi
done
# strata-profile: the same strata image (same manifest digest) in a repository of its own, with
# an access profile published next to it, recorded from the first command (/bin/true) on a lazy
# mount with the snapshotter's readahead.
record_profile() { # IMAGE
  local r=$loop_reg/bench/$1:strata rec=$work/profile-$1 mnt
  mnt=$run/profile-mnt
  rm -rf "$rec"; mkdir -p "$mnt"
  "$strata" --root "$rec" mount --no-prefetch --read-ahead-kb 16 --record-profile "$work/profile-$1.txt" \
    "$r" "$mnt" > /dev/null
  chroot "$mnt" /bin/true
  "$strata" --root "$rec" umount "$mnt"
  "$strata" --root "$rec" daemon --stop --forget > /dev/null 2>&1 || true
  skopeo copy -q --preserve-digests --src-tls-verify=false --dest-tls-verify=false \
    "docker://$r" "docker://$loop_reg/bench/$1-profiled:strata"
  "$strata" push-profile "$work/profile-$1.txt" "$loop_reg/bench/$1-profiled:strata" > /dev/null
  printf '  profile of %s: %d files, %d ranges\n' "$1" "$(wc -l < "$work/profile-$1.txt")" \
    "$(cut -s -f2 "$work/profile-$1.txt" | tr ',' '\n' | grep -c . || true)" >&2
}
if has "$snapshotters" strata-profile; then
  for img in $images; do record_profile "$img"; done
fi
stop_daemons; rm -rf "$work/convert-ctd"
image_mb() { # REF: the compressed size of an image's layers, from its manifest
  curl -sf -H 'Accept: application/vnd.oci.image.manifest.v1+json' \
    -H 'Accept: application/vnd.docker.distribution.manifest.v2+json' \
    "http://$loop_reg/v2/${1%:*}/manifests/${1##*:}" |
    python3 -c 'import json,sys; m=json.load(sys.stdin); print("%d layers %.1f MB" % (len(m["layers"]), sum(l["size"] for l in m["layers"]) / 1e6))'
}
{
  echo "| image | gzip (overlayfs) | eStargz (stargz) | eStargz optimised | strata | read30: files, bytes |"
  echo "|---|---|---|---|---|---|"
  for img in $images; do
    es=n/a; eo=n/a; st=n/a
    has "$snapshotters" stargz && es=$(image_mb "bench/$img:esgz")
    has "$snapshotters" stargz-optimized && eo=$(image_mb "bench/$img:esgz-opt")
    has_strata && st=$(image_mb "bench/$img:strata")
    # shellcheck disable=SC2086
    printf '| %s | %s | %s | %s | %s | %d, %.1f MB |\n' "$img" "$(image_mb "bench/$img:gzip")" "$es" "$eo" "$st" \
      "$(echo ${files[$img]} | wc -w)" "$(cd "$work" && python3 - "$work/src-$img" ${files[$img]} <<'PY'
import json, sys, tarfile
out, want = sys.argv[1], set(p.lstrip("/") for p in sys.argv[2:])
blob = lambda d: f"{out}/blobs/sha256/" + d.split(":")[1]
m = json.load(open(blob(json.load(open(f"{out}/index.json"))["manifests"][0]["digest"])))
total = 0
for l in m["layers"]:
    with tarfile.open(blob(l["digest"]), "r:gz") as t:
        total += sum(x.size for x in t if x.name in want)
print(total / 1e6)
PY
)"
  done
} > "$work/images.md"
stop_pid "$reg_pid"; reg_pid=

# The stargz snapshotter reaches both registries over plain HTTP (a mirror entry per host).
shaped_addr=$(bash "$link" addr "$ns")
cat > "$work/stargz.toml" <<TOML
# Defaults kept: background fetch, prefetch, chunk size, concurrency (see the script's header).
[[resolver.host."$loop_reg".mirrors]]
  host = "$loop_reg"
  insecure = true
[[resolver.host."$shaped_addr:5000".mirrors]]
  host = "$shaped_addr:5000"
  insecure = true
TOML

counter() { # bytes the registry has sent so far on the current link
  if [ "$cur_link" = shaped ]; then
    cat "/sys/class/net/$veth/statistics/rx_bytes"
  else
    nft list table inet "$nft_table" | awk '/counter/ { for (i = 1; i < NF; i++) if ($i == "bytes") print $(i + 1) }'
  fi
}
log_bytes() { # GET response bytes in the registry's access log after line $1
  tail -n +"$(( $1 + 1 ))" "$reg_log" | grep '"GET ' | awk '{ s += $10 } END { print s + 0 }'
}

measure() { # SNAPSHOTTER IMAGE WORKLOAD REP: one run from nothing; appends a line to results
  local sn=$1 img=$2 wl=$3 ref d t0 t1= secs bytes lbytes mark pulled= status=ok
  d=$work/runs/$cur_link-$img-$sn-$wl-$4
  stop_daemons; rm -rf "$d"; mkdir -p "$d"
  case $sn in
    strata) ref=$reg/bench/$img:strata ;;
    strata-profile) ref=$reg/bench/$img-profiled:strata ;;
    stargz) ref=$reg/bench/$img:esgz ;;
    stargz-optimized) ref=$reg/bench/$img:esgz-opt ;;
    overlayfs) ref=$reg/bench/$img:gzip ;;
  esac
  local cmd=(/bin/true)
  [ "$wl" = read30 ] && cmd=(/bin/sh -c "cat ${files[$img]} > /dev/null")
  start_snapshotter "$sn" "$d/$sn"
  start_containerd "$d/containerd"
  sync; echo 3 > /proc/sys/vm/drop_caches
  mark=$(wc -l < "$reg_log"); bytes=$(counter)
  t0=$(now)
  case $sn in
    overlayfs)
      ctr_ image pull --plain-http "$ref" > "$d/pull.log" 2>&1 && t1=$(now) &&
        ctr_ run --rm --snapshotter overlayfs "$ref" bench "${cmd[@]}" > "$d/run.log" 2>&1 || status=FAIL ;;
    stargz|stargz-optimized)
      ctr-remote -a "$run/c.sock" image rpull --plain-http --snapshotter stargz "$ref" > "$d/pull.log" 2>&1 && t1=$(now) &&
        ctr_ run --rm --snapshotter stargz "$ref" bench "${cmd[@]}" > "$d/run.log" 2>&1 || status=FAIL ;;
    strata|strata-profile)
      local profile=()
      [ "$sn" = strata ] || profile=(--profile)
      "$strata" --root "$d/$sn" rpull "${profile[@]}" --address "$run/c.sock" --namespace default --snapshotter strata \
        "$ref" > "$d/pull.log" 2>&1 && t1=$(now) &&
        ctr_ run --rm --snapshotter strata "$ref" bench "${cmd[@]}" > "$d/run.log" 2>&1 || status=FAIL ;;
  esac
  secs=$(since "$t0")
  bytes=$(( $(counter) - bytes )); lbytes=$(log_bytes "$mark")
  echo "$t0 ${t1:-}" > "$d/times"
  [ -z "$t1" ] || pulled=$(echo "$t1 - $t0" | bc)
  [ "$status" = ok ] || echo "  FAILED: see $d/*.log" >&2
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$cur_link" "$img" "$sn" "$wl" "$secs" "$bytes" "$lbytes" "$status" "${pulled:-}" >> "$work/results.tsv"
  printf '  %-8s %-5s %-9s %-6s %8.2f s (pull %5.2f s) %10.2f MB  %s\n' "$cur_link" "$img" "$sn" "$wl" "$secs" "${pulled:-0}" \
    "$(echo "$bytes / 1000000" | bc -l)" "$status" >&2
  if [ "$sn" = overlayfs ] && [ "$wl" = true ] && [ "$status" = ok ]; then
    # The floor every figure includes: `ctr run --rm /bin/true` of an image already unpacked.
    t0=$(now)
    ctr_ run --rm --snapshotter overlayfs "$ref" bench "${cmd[@]}" > "$d/run-warm.log" 2>&1 || status=FAIL
    printf '%s\t%s\t%s\t%s\t%s\t0\t0\t%s\n' "$cur_link" "$img" "$sn" warm "$(since "$t0")" "$status" >> "$work/results.tsv"
  fi
  stop_daemons
}

export STRATA_INSECURE_REGISTRIES="$shaped_addr:5000"   # --insecure-registry of rpull and snapshotter
: > "$work/results.tsv"
for cur_link in $links; do
  echo "# link: $cur_link" >&2
  if [ "$cur_link" = shaped ]; then
    bash "$link" down "$ns" >/dev/null 2>&1 || true
    bash "$link" up "$ns" "$rate" > /dev/null
    veth=$(ip -o route get "$shaped_addr" | sed -n 's/.* dev \([^ ]*\).*/\1/p')
    reg_config "0.0.0.0:5000" shaped
    reg_log=$work/registry/shaped.log; : > "$reg_log"
    bash "$link" exec "$ns" docker-registry serve "$work/registry/shaped.yml" >> "$reg_log" 2>&1 &
    reg_pid=$!
    reg=$shaped_addr:5000
    for _ in $(seq 100); do curl -sf "http://$reg/v2/" >/dev/null && break; sleep 0.1; done
  else
    reg_log=$work/registry/loopback.log
    start_loop_registry
    reg=$loop_reg
    nft delete table inet "$nft_table" 2>/dev/null || true
    nft add table inet "$nft_table"
    nft "add chain inet $nft_table out { type filter hook output priority 0; policy accept; }"
    nft add rule inet "$nft_table" out oifname lo tcp sport "$port" counter
  fi
  for img in $images; do
    for rep in $(seq "$repeat"); do
      for sn in overlayfs stargz stargz-optimized strata strata-profile; do
        has "$snapshotters" "$sn" || continue
        [ "$sn" != overlayfs ] || [ "$rep" -le "$repeat_full" ] || continue
        for wl in $workloads; do measure "$sn" "$img" "$wl" "$rep"; done
      done
    done
  done
  stop_pid "$reg_pid"; reg_pid=
  if [ "$cur_link" = shaped ]; then bash "$link" down "$ns" >/dev/null 2>&1; else nft delete table inet "$nft_table"; fi
done

get() { # LINK IMAGE SNAPSHOTTER WORKLOAD FIELD(5 secs, 6 bytes, 7 log bytes, 9 pull secs): the median over the
  # runs that succeeded; FAIL when every run failed, empty when none ran
  awk -F'\t' -v l="$1" -v i="$2" -v s="$3" -v w="$4" -v f="$5" \
    '$1 == l && $2 == i && $3 == s && $4 == w { n++; if ($8 == "ok") print $f } END { exit n > 0 ? 0 : 1 }' \
    "$work/results.tsv" > "$work/get.tmp" || return 0
  [ -s "$work/get.tmp" ] || { echo FAIL; return 0; }
  sort -g "$work/get.tmp" | awk '{ v[NR] = $1 } END { printf "%.6f\n", (NR % 2 ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2) }'
}
num() { [ -n "$1" ] && [ "$1" != FAIL ]; }
r_or_na() { if num "$1" && num "$2"; then printf '%.3f' "$(ratio "$1" "$2")"; else echo n/a; fi; }
target() { # RATIO BOUND: the ratio with its target and whether it is met
  if [ "$1" = n/a ]; then echo "n/a (target ≤ $2)"
  elif [ "$(echo "$1 <= $2" | bc)" = 1 ]; then echo "$1 (target ≤ $2: met)"
  else echo "$1 (target ≤ $2: missed)"; fi
}
mb() { if num "$1"; then printf '%.2f MB' "$(echo "$1 / 1000000" | bc -l)"; else echo "${1:-n/a}"; fi; }
sec() { if num "$1"; then printf '%.2f s' "$1"; else echo "${1:-n/a}"; fi; }
echo
echo "Images (compressed layer bytes per format):"
echo
cat "$work/images.md"
for cur_link in $links; do
  label=$([ "$cur_link" = shaped ] && echo "$rate shaped link (bytes: veth rx counter)" || echo "loopback (bytes: nft counter on the registry port)")
  echo
  echo "### $label"
  echo
  echo "Each figure is a fresh pull: pull + \`ctr run --rm\` of the workload as the first command (median of $repeat runs; overlayfs: of $repeat_full)."
  echo
  echo "| image | snapshotter | /bin/true: time to first command (pull) | read30: time | bytes fetched, /bin/true | bytes fetched, read30 | registry log, /bin/true / read30 |"
  echo "|---|---|---|---|---|---|---|"
  for img in $images; do
    for sn in strata strata-profile stargz stargz-optimized overlayfs; do
      has "$snapshotters" "$sn" || continue
      printf '| %s | %s | %s | %s | %s | %s | %s / %s |\n' "$img" "$sn" \
        "$(sec "$(get "$cur_link" "$img" "$sn" true 5)") ($(sec "$(get "$cur_link" "$img" "$sn" true 9)"))" "$(sec "$(get "$cur_link" "$img" "$sn" read30 5)")" \
        "$(mb "$(get "$cur_link" "$img" "$sn" true 6)")" "$(mb "$(get "$cur_link" "$img" "$sn" read30 6)")" \
        "$(mb "$(get "$cur_link" "$img" "$sn" true 7)")" "$(mb "$(get "$cur_link" "$img" "$sn" read30 7)")"
    done
  done
  # shellcheck disable=SC2016
  printf '\nFloor (in every figure): `ctr run --rm /bin/true` of an image already unpacked (overlayfs, warm): %s.\n' \
    "$(for img in $images; do printf '%s %s; ' "$img" "$(sec "$(get "$cur_link" "$img" overlayfs warm 5)")"; done | sed 's/; $//')"
  echo
  echo "| image | workload | strata | vs | time ratio | bytes ratio |"
  echo "|---|---|---|---|---|---|"
  for img in $images; do
    for wl in $workloads; do
      for st in strata strata-profile; do
        has "$snapshotters" "$st" || continue
        for other in stargz stargz-optimized overlayfs; do
          has "$snapshotters" "$other" || continue
          t_r=$(r_or_na "$(get "$cur_link" "$img" "$st" "$wl" 5)" "$(get "$cur_link" "$img" "$other" "$wl" 5)")
          b_r=$(r_or_na "$(get "$cur_link" "$img" "$st" "$wl" 6)" "$(get "$cur_link" "$img" "$other" "$wl" 6)")
          if [ "$other" != overlayfs ]; then
            # Targets against stargz: time to first command (/bin/true) ≤ 0.6× on the large
            # image, ≤ 0.7× on the small one; bytes fetched ≤ 0.6×.
            if [ "$wl" = true ]; then t_r=$(target "$t_r" "$([ "$img" = small ] && echo 0.7 || echo 0.6)"); fi
            b_r=$(target "$b_r" 0.6)
          fi
          printf '| %s | %s | %s | %s | %s | %s |\n' "$img" "$wl" "$st" "$other" "$t_r" "$b_r"
        done
      done
    done
  done
done
failed=$(awk -F'\t' '$8 != "ok"' "$work/results.tsv" | wc -l)
if [ "$failed" -gt 0 ]; then
  echo
  echo "$failed run(s) failed and are left out of the medians (logs under $work/runs):"
  awk -F'\t' '$8 != "ok" { print "  " $1, $2, $3, $4 }' "$work/results.tsv"
fi
