#!/usr/bin/env python3
"""Writes an OCI image layout for the end-to-end benchmarks: busybox-static (sh, true, cp, cat,
ls), /etc/passwd and /etc/group in the first layer, then one gzip layer per directory of this
machine given on the command line. Prints the total compressed size.

    mkimage.py OUT_DIR DIR...
"""
import gzip, hashlib, io, json, os, sys, tarfile
out, dirs = sys.argv[1], sys.argv[2:]
os.makedirs(f"{out}/blobs/sha256", exist_ok=True)
def put(data):
    d = hashlib.sha256(data).hexdigest()
    open(f"{out}/blobs/sha256/{d}", "wb").write(data)
    return "sha256:" + d
def layer(add):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        add(t)
    raw = buf.getvalue()
    gz = gzip.compress(raw, compresslevel=6)
    return ({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": put(gz), "size": len(gz)},
            "sha256:" + hashlib.sha256(raw).hexdigest())
def base(t):
    for d in ["bin", "tmp", "etc", "usr", "usr/lib", "usr/share"]:
        i = tarfile.TarInfo(d); i.type = tarfile.DIRTYPE; i.mode = 0o1777 if d == "tmp" else 0o755
        t.addfile(i)
    t.add("/bin/busybox", arcname="bin/busybox")
    for tool in ["sh", "true", "cp", "cat", "ls"]:
        i = tarfile.TarInfo(f"bin/{tool}"); i.type = tarfile.SYMTYPE; i.linkname = "busybox"
        t.addfile(i)
    for f, body in [("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n"), ("etc/group", b"root:x:0:\n")]:
        i = tarfile.TarInfo(f); i.size = len(body); i.mode = 0o644
        t.addfile(i, io.BytesIO(body))
layers = [layer(base)] + [layer(lambda t, d=d: t.add(d, arcname=d.lstrip("/"))) for d in dirs]
config = json.dumps({"architecture": "amd64", "os": "linux", "config": {"Cmd": ["/bin/sh"]},
                     "rootfs": {"type": "layers", "diff_ids": [d for _, d in layers]},
                     "history": [{"created_by": f"layer {i}"} for i in range(len(layers))]}).encode()
manifest = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
    "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": put(config), "size": len(config)},
    "layers": [l for l, _ in layers]}).encode()
md = put(manifest)
json.dump({"schemaVersion": 2, "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
    "digest": md, "size": len(manifest), "annotations": {"org.opencontainers.image.ref.name": "v1"}}]},
    open(f"{out}/index.json", "w"))
open(f"{out}/oci-layout", "w").write('{"imageLayoutVersion":"1.0.0"}')
print(sum(l["size"] for l, _ in layers))
