#!/bin/bash
# Assembles a C toolchain rootfs from this machine's gcc, binutils and libc headers at $1.
set -euo pipefail
r=$1
mkdir -p "$r"
copy() { for f in "$@"; do [ -e "$f" ] || continue; mkdir -p "$r$(dirname "$f")"; cp -aL "$f" "$r$f"; done; }
gccdir=$(dirname "$(gcc -print-prog-name=cc1)")
bins="$(readlink -f /usr/bin/gcc) $(readlink -f /usr/bin/as) $(readlink -f /usr/bin/ld) $gccdir/cc1 $gccdir/collect2 $gccdir/lto-wrapper"
copy $bins
for b in $bins; do ldd "$b" 2>/dev/null | grep -o '/[^ ]*' | while read -r l; do copy "$l"; done; done
mkdir -p "$r/usr/bin"
ln -sf "$(readlink -f /usr/bin/gcc)" "$r/usr/bin/gcc"
ln -sf "$(readlink -f /usr/bin/as)" "$r/usr/bin/as"
ln -sf "$(readlink -f /usr/bin/ld)" "$r/usr/bin/ld"
# gcc's own directory without the C++ and LTO compilers.
(cd / && find "${gccdir#/}" -maxdepth 1 -type f ! -name 'cc1plus' ! -name 'lto1' ! -name 'cc1obj' -print0 | xargs -0 -I{} sh -c 'mkdir -p "$0/$(dirname {})" && cp -aL "/{}" "$0/{}"' "$r")
cp -a "$gccdir/include" "$r$gccdir/" 2>/dev/null || true
copy /usr/lib/x86_64-linux-gnu/crt1.o /usr/lib/x86_64-linux-gnu/crti.o /usr/lib/x86_64-linux-gnu/crtn.o /usr/lib/x86_64-linux-gnu/Scrt1.o \
     /usr/lib/x86_64-linux-gnu/libc.a /usr/lib/x86_64-linux-gnu/libc.so /usr/lib/x86_64-linux-gnu/libc_nonshared.a \
     /usr/lib/x86_64-linux-gnu/libc.so.6 /usr/lib/x86_64-linux-gnu/libm.a /usr/lib/x86_64-linux-gnu/libm.so.6 /lib64/ld-linux-x86-64.so.2 \
     /usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2
# The C library headers a hello world needs (what gcc -M lists for stdio.h and stdlib.h).
printf '#include <stdio.h>\n#include <stdlib.h>\n#include <string.h>\n' | gcc -O2 -M -x c - | tr ' \\' '\n\n' | grep '^/' | sort -u | while read -r h; do copy "$h"; done
mkdir -p "$r/bin" "$r/tmp" "$r/etc"; chmod 1777 "$r/tmp"
cp /bin/busybox "$r/bin/busybox"
for t in sh ls cat echo mkdir rm true; do ln -sf busybox "$r/bin/$t"; done
printf 'root:x:0:0:root:/root:/bin/sh\n' > "$r/etc/passwd"; printf 'root:x:0:\n' > "$r/etc/group"
