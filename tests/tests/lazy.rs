#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failure should abort loudly
//! Lazy pulling from a real registry (Debian's docker-registry on a loopback port): an image
//! pushed by strata mounts from a fresh store after fetching only metadata, a read fetches a
//! small fraction of the image, and everything read matches the source; with basic auth too.

use std::fs;
use std::path::Path;

use strata_tests::image::{noise, scratch, write_oci_layout, Compression, Layer, LayerBuilder};
use strata_tests::registry::TestRegistry;
use strata_tests::snapshot::{diff, snapshot, SnapshotOptions};
use strata_tests::util::{convert_one_layer, strata, strata_ok, strata_with, Mounted};

/// An image of about 100 MB of incompressible files plus small files, converted into `root`.
fn big_image(tmp: &Path, root: &Path, name: &str) {
    let mut l1 = LayerBuilder::new();
    l1.dir("blob", 0o755).unwrap();
    for i in 0..100u64 {
        l1.file(&format!("blob/f{i:03}"), 0o644, &noise(i, 1 << 20))
            .unwrap();
    }
    let mut l2 = LayerBuilder::new();
    l2.dir("etc", 0o755).unwrap();
    for i in 0..200 {
        l2.file(
            &format!("etc/conf{i}"),
            0o644,
            format!("setting {i}\n").as_bytes(),
        )
        .unwrap();
    }
    let src = tmp.join("src");
    write_oci_layout(
        &src,
        "v1",
        &[
            Layer {
                tar: l1.finish().unwrap(),
                compression: Compression::Gzip,
            },
            Layer {
                tar: l2.finish().unwrap(),
                compression: Compression::Gzip,
            },
        ],
    )
    .unwrap();
    strata_ok(
        root,
        &["convert", &format!("oci:{}:v1", src.display()), name],
    );
}

#[test]
fn lazy_mount_reads_a_small_fraction_then_matches_the_source() {
    let tmp = scratch("lazy").unwrap();
    let local = tmp.join("local");
    big_image(&tmp, &local, "test/lazy:v1");
    let reg = TestRegistry::start(&tmp.join("registry"), None).unwrap();
    let remote = format!("{}/test/lazy:v1", reg.addr);
    strata_ok(&local, &["push", "test/lazy:v1", &remote]);
    let inspected: serde_json::Value =
        serde_json::from_str(&strata_ok(&local, &["inspect", "test/lazy:v1"])).unwrap();
    let image_bytes: u64 = inspected["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["size"].as_u64().unwrap())
        .sum();
    assert!(image_bytes > 100_000_000, "pushed {image_bytes} bytes");

    // A fresh store mounts straight from the registry.
    let fresh = tmp.join("fresh");
    let before = reg.log_lines().len();
    // Background prefetch off: this measures what reads alone fetch.
    let lazy =
        Mounted::with_args(&fresh, &remote, &tmp.join("mnt-lazy"), &["--no-prefetch"]).unwrap();
    let open_bytes = reg.bytes_since(before, "GET /v2/");
    let data = fs::read(lazy.dir.join("blob/f042")).unwrap();
    assert_eq!(data, noise(42, 1 << 20));
    let fetched = reg.bytes_since(before, "GET /v2/");
    assert!(
        (fetched as f64) < 0.05 * image_bytes as f64,
        "reading 1 MB of a {image_bytes}-byte image fetched {fetched} bytes ({open_bytes} to open)"
    );
    // The daemon's own counters agree: one chunk's worth of range reads.
    let stats_of = || -> serde_json::Value {
        serde_json::from_str(&strata_ok(
            &fresh,
            &["stats", &lazy.dir.display().to_string(), "--json"],
        ))
        .unwrap()
    };
    // Published within ~100 ms of a change: wait for it rather than sleep a fixed time.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let mut stats = stats_of();
    while stats["fetch"]["source_bytes"].as_u64() == Some(0) && std::time::Instant::now() < deadline
    {
        std::thread::sleep(std::time::Duration::from_millis(50));
        stats = stats_of();
    }
    let counted = stats["fetch"]["source_bytes"].as_u64().unwrap();
    assert!(
        counted > 1 << 20 && counted <= fetched,
        "stats say {counted}, registry {fetched}"
    );
    assert!(stats["time_to_mount_ms"].as_u64().is_some());
    assert!(strata_ok(&fresh, &["stats", &lazy.dir.display().to_string()]).contains("fetched:"));
    let ranged = reg.log_lines()[before..]
        .iter()
        .filter(|l| l.contains("\" 206 "))
        .count();
    assert!(ranged >= 3, "expected range requests (2 TOCs and a chunk)");

    // Everything read lazily equals the local mount of the same image.
    let reference = Mounted::new(&local, "test/lazy:v1", &tmp.join("mnt-local")).unwrap();
    let want = snapshot(&reference.dir, SnapshotOptions { dir_mtimes: true }).unwrap();
    let got = snapshot(&lazy.dir, SnapshotOptions { dir_mtimes: true }).unwrap();
    let d = diff(&want, &got);
    assert!(d.is_empty(), "{}", d.join("\n"));
    reference.unmount().unwrap();
    lazy.unmount().unwrap();

    // With background prefetch (the default) the whole image arrives in the disk cache, after
    // which the mount keeps working with the registry gone.
    let pre = tmp.join("prefetched");
    let m = Mounted::with_args(&pre, &remote, &tmp.join("mnt-pre"), &[]).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    loop {
        let stats: serde_json::Value =
            serde_json::from_str(&strata_ok(&pre, &["cache", "stats", "--json"])).unwrap();
        // Every chunk in (the small files' batch frames may come after the 100 MiB of blobs).
        let mount: serde_json::Value = serde_json::from_str(&strata_ok(
            &pre,
            &["stats", "--json", &m.dir.to_string_lossy()],
        ))
        .unwrap();
        if stats["bytes"].as_u64().unwrap() >= 100 << 20 && mount["prefetched"] == true {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "prefetch did not finish: {stats}"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let remote_reg_addr = reg.addr.clone();
    drop(reg);
    for i in [0u64, 50, 99] {
        assert_eq!(
            fs::read(m.dir.join(format!("blob/f{i:03}"))).unwrap(),
            noise(i, 1 << 20)
        );
    }
    assert_eq!(fs::read(m.dir.join("etc/conf7")).unwrap(), b"setting 7\n");
    m.unmount().unwrap();
    let reg = TestRegistry::start(&tmp.join("registry"), None).unwrap();
    let remote = remote.replace(&remote_reg_addr, &reg.addr);

    // `pull` stores metadata only; `images` lists it; `rmi` forgets it.
    let pulled = tmp.join("pulled");
    strata_ok(&pulled, &["pull", &remote]);
    assert!(strata_ok(&pulled, &["images"]).contains("test/lazy"));
    let blobs = fs::read_dir(pulled.join("blobs/sha256")).unwrap().count();
    assert_eq!(
        blobs, 2,
        "pull should store only the manifest and the config"
    );
    strata_ok(&pulled, &["tag", &remote, "copy:v1"]);
    strata_ok(&pulled, &["rmi", &remote]);
    assert!(!strata_ok(&pulled, &["images"]).contains("test/lazy"));
    assert!(strata_ok(&pulled, &["images"]).contains("copy"));
    fs::remove_dir_all(&tmp).ok();
}

#[test]
fn basic_auth_login_push_and_lazy_mount() {
    let tmp = scratch("auth").unwrap();
    let local = tmp.join("local");
    let mut l = LayerBuilder::new();
    l.file("hello", 0o644, b"hello through basic auth\n")
        .unwrap();
    convert_one_layer(
        &tmp,
        &local,
        l.finish().unwrap(),
        Compression::Gzip,
        "test/auth:v1",
    );
    let reg = TestRegistry::start(&tmp.join("registry"), Some(("tester", "s3cret"))).unwrap();
    let remote = format!("{}/test/auth:v1", reg.addr);
    let docker = tmp.join("docker");
    let env = [("DOCKER_CONFIG", docker.as_path())];

    let out = strata_with(&local, &env, &["push", "test/auth:v1", &remote], None);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("authentication required"));

    let bad = strata_with(
        &local,
        &env,
        &["login", "-u", "tester", "--password-stdin", &reg.addr],
        Some(b"wrong\n"),
    );
    assert!(!bad.status.success(), "a wrong password must not log in");
    let ok = strata_with(
        &local,
        &env,
        &["login", "-u", "tester", "--password-stdin", &reg.addr],
        Some(b"s3cret\n"),
    );
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let config: serde_json::Value =
        serde_json::from_slice(&fs::read(docker.join("config.json")).unwrap()).unwrap();
    assert!(config["auths"][&reg.addr]["auth"].is_string());

    let out = strata_with(&local, &env, &["push", "test/auth:v1", &remote], None);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let fresh = tmp.join("fresh");
    let mnt = tmp.join("mnt");
    fs::create_dir_all(&mnt).unwrap();
    let out = strata_with(
        &fresh,
        &env,
        &["mount", &remote, &mnt.display().to_string()],
        None,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        fs::read(mnt.join("hello")).unwrap(),
        b"hello through basic auth\n"
    );
    strata_ok(&fresh, &["umount", &mnt.display().to_string()]);

    let out = strata_with(&local, &env, &["logout", &reg.addr], None);
    assert!(out.status.success());
    let out = strata_with(&tmp.join("other"), &env, &["pull", &remote], None);
    assert!(
        !out.status.success(),
        "pull after logout must need credentials"
    );
    let _ = strata(&local, &["images"]);
    fs::remove_dir_all(&tmp).ok();
}

/// A plain OCI image (gzip layers, pushed by skopeo) still mounts: its layers are fetched whole,
/// verified, indexed on the node, then served, and strata says the image is not lazily pullable.
#[test]
fn plain_oci_image_mounts_after_a_whole_fetch() {
    let tmp = scratch("plain").unwrap();
    let mut l = LayerBuilder::new();
    l.dir("app", 0o755)
        .unwrap()
        .file("app/data", 0o644, &noise(7, 3 << 20))
        .unwrap();
    let mut l2 = LayerBuilder::new();
    l2.file("app/.wh.data", 0o644, b"")
        .unwrap()
        .file("app/new", 0o600, b"new\n")
        .unwrap();
    let src = tmp.join("src");
    write_oci_layout(
        &src,
        "v1",
        &[
            Layer {
                tar: l.finish().unwrap(),
                compression: Compression::Gzip,
            },
            Layer {
                tar: l2.finish().unwrap(),
                compression: Compression::None,
            },
        ],
    )
    .unwrap();
    let reg = TestRegistry::start(&tmp.join("registry"), None).unwrap();
    let remote = format!("{}/test/plain:v1", reg.addr);
    strata_tests::util::run(
        std::process::Command::new("skopeo")
            .args(["copy", "--dest-tls-verify=false"])
            .arg(format!("oci:{}:v1", src.display()))
            .arg(format!("docker://{remote}")),
    )
    .unwrap();
    let fresh = tmp.join("fresh");
    let mnt = tmp.join("mnt");
    fs::create_dir_all(&mnt).unwrap();
    let out = strata(&fresh, &["mount", &remote, &mnt.display().to_string()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not lazily pullable"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!mnt.join("app/data").exists());
    assert_eq!(fs::read(mnt.join("app/new")).unwrap(), b"new\n");
    strata_ok(&fresh, &["umount", &mnt.display().to_string()]);

    // `strata convert` from a registry reference to a registry reference: the result is lazy.
    let converted = format!("{}/test/plain:v1-strata", reg.addr);
    strata_ok(&tmp.join("converter"), &["convert", &remote, &converted]);
    let fresh2 = tmp.join("fresh2");
    let out = strata(&fresh2, &["mount", &converted, &mnt.display().to_string()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!String::from_utf8_lossy(&out.stderr).contains("not lazily pullable"));
    assert_eq!(fs::read(mnt.join("app/new")).unwrap(), b"new\n");
    assert!(!mnt.join("app/data").exists());
    strata_ok(&fresh2, &["umount", &mnt.display().to_string()]);
    fs::remove_dir_all(&tmp).ok();
}

/// A registry under `tmp` serving the image `name` of the store at `local`, and its reference.
fn serve(tmp: &Path, local: &Path, name: &str) -> (TestRegistry, String) {
    let reg = TestRegistry::start(&tmp.join("registry"), None).unwrap();
    let remote = format!("{}/{name}", reg.addr);
    strata_ok(local, &["push", name, &remote]);
    (reg, remote)
}

/// A lazy mount of `remote` (no prefetch) recording an access profile into `tmp/profile.txt`.
fn recording(tmp: &Path, remote: &str) -> (std::path::PathBuf, Mounted) {
    let profile = tmp.join("profile.txt");
    let p = profile.display().to_string();
    let m = Mounted::with_args(
        &tmp.join("rec"),
        remote,
        &tmp.join("mnt"),
        &["--no-prefetch", "--record-profile", &p],
    )
    .unwrap();
    (profile, m)
}

/// `--record-profile` writes the order of first reads; a later mount with `--profile` prefetches
/// those files first, before the rest of the image.
#[test]
fn recorded_profile_is_prefetched_first() {
    let tmp = scratch("profile").unwrap();
    let local = tmp.join("local");
    big_image(&tmp, &local, "test/profile:v1");
    let (reg, remote) = serve(&tmp, &local, "test/profile:v1");
    let (profile, m) = recording(&tmp, &remote);
    let p = profile.display().to_string();
    for f in ["etc/conf3", "blob/f010", "etc/conf3", "blob/f020"] {
        fs::read(m.dir.join(f)).unwrap();
    }
    m.unmount().unwrap();
    assert_eq!(
        fs::read_to_string(&profile).unwrap(),
        "etc/conf3\nblob/f010\nblob/f020\n"
    );

    // The manifest's second layer holds etc/; without a profile the prefetch starts with the
    // first layer.
    let inspected: serde_json::Value =
        serde_json::from_str(&strata_ok(&local, &["inspect", "test/profile:v1"])).unwrap();
    let etc_layer = inspected["layers"][1]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    // Published next to the image, the profile is found by a fresh mount on its own.
    strata_ok(&local, &["push-profile", &p, &remote]);
    let before = reg.log_lines().len();
    let m = Mounted::with_args(&tmp.join("replay"), &remote, &tmp.join("mnt"), &[]).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let first_chunk_fetch = loop {
        let lines = reg.log_lines();
        // Range reads after the TOCs (one per layer, fetched while pulling).
        let ranged: Vec<String> = lines[before..]
            .iter()
            .filter(|l| l.contains("\" 206 "))
            .cloned()
            .collect();
        if ranged.len() > 2 {
            break ranged[2].clone();
        }
        assert!(std::time::Instant::now() < deadline, "no prefetch traffic");
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    assert!(
        first_chunk_fetch.contains(&etc_layer),
        "first prefetch was {first_chunk_fetch}"
    );
    // Found by the image's manifest digest: the referrers API (which docker-registry 2.8
    // lacks), then the referrers tag schema.
    let lines = reg.log_lines();
    assert!(
        lines[before..]
            .iter()
            .any(|l| l.contains("/manifests/sha256-")),
        "profile not looked up by digest"
    );
    m.unmount().unwrap();
    fs::remove_dir_all(&tmp).ok();
}

/// A profile recorded while a workload reads part of a file names the byte ranges it read; a
/// fresh mount with that profile published fetches the chunk they fall in first, alone and at
/// once (not the whole file, not after the prefetch's pause for readers).
#[test]
fn ranged_profiles_fetch_the_chunks_read_first() {
    use std::io::{Read, Seek, SeekFrom};
    let tmp = scratch("ranged-profile").unwrap();
    let local = tmp.join("local");
    // 4 MiB of noise with 2 MiB of zeros in the middle: the chunk that holds offset 2.5 MiB is
    // all zeros (its frame is tiny), every other chunk holds noise.
    let mut data = noise(7, 4 << 20);
    data[3 << 19..7 << 19].fill(0);
    let mut l = LayerBuilder::new();
    l.file("big", 0o755, &data).unwrap();
    convert_one_layer(
        &tmp,
        &local,
        l.finish().unwrap(),
        Compression::Gzip,
        "test/ranged:v1",
    );
    let (reg, remote) = serve(&tmp, &local, "test/ranged:v1");
    let (profile, m) = recording(&tmp, &remote);
    let p = profile.display().to_string();
    let mut f = fs::File::open(m.dir.join("big")).unwrap();
    f.seek(SeekFrom::Start(5 << 19)).unwrap();
    let mut buf = [0u8; 100];
    f.read_exact(&mut buf).unwrap();
    assert_eq!(buf, [0u8; 100]);
    drop(f);
    m.unmount().unwrap();
    let text = fs::read_to_string(&profile).unwrap();
    let (path, ranges) = text
        .trim_end()
        .split_once('\t')
        .unwrap_or_else(|| panic!("no ranges in {text:?}"));
    assert_eq!(path, "big");
    for r in ranges.split(',') {
        let (off, len) = r.split_once('+').unwrap();
        let (off, len): (u64, u64) = (off.parse().unwrap(), len.parse().unwrap());
        assert!(
            off <= 5 << 19 && off + len > 5 << 19 && off + len <= 7 << 19,
            "range {r} is not what was read ({text:?})"
        );
    }

    strata_ok(&local, &["push-profile", &p, &remote]);
    let before = reg.log_lines().len();
    let m = Mounted::with_args(&tmp.join("replay"), &remote, &tmp.join("mnt"), &[]).unwrap();
    // Response sizes of the range reads since the mount began: the TOC's, then the prefetch's.
    let ranged = || -> Vec<u64> {
        reg.log_lines()[before..]
            .iter()
            .filter_map(|l| {
                l.split_once("\" 206 ")?
                    .1
                    .split_whitespace()
                    .next()?
                    .parse()
                    .ok()
            })
            .collect()
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while ranged().len() < 3 {
        assert!(
            std::time::Instant::now() < deadline,
            "no prefetch traffic: {:?}",
            ranged()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let sizes = ranged();
    // First after the TOC: the zeros chunk alone; then the rest, each with noise in it.
    assert!(
        sizes[1] < 4096,
        "first prefetch read was {} bytes: {sizes:?}",
        sizes[1]
    );
    assert!(sizes[2] >= 16 << 10, "{sizes:?}");
    let read = fs::read(m.dir.join("big")).unwrap();
    assert!(read == data, "the file read back differs");
    m.unmount().unwrap();
    fs::remove_dir_all(&tmp).ok();
}

/// Mirrors from a containerd-style `hosts.toml`: an image named after an unreachable upstream
/// pulls and mounts lazily through the mirror listed for it.
#[test]
fn hosts_toml_mirror_serves_pulls() {
    let tmp = scratch("mirror").unwrap();
    let local = tmp.join("local");
    let mut l = LayerBuilder::new();
    l.file("hello", 0o644, b"from the mirror\n").unwrap();
    convert_one_layer(
        &tmp,
        &local,
        l.finish().unwrap(),
        Compression::Gzip,
        "test/mirror:v1",
    );
    let mirror = TestRegistry::start(&tmp.join("registry"), None).unwrap();
    strata_ok(
        &local,
        &[
            "push",
            "test/mirror:v1",
            &format!("{}/test/mirror:v1", mirror.addr),
        ],
    );
    let hosts = tmp.join("certs.d");
    fs::create_dir_all(hosts.join("127.0.0.1:1")).unwrap();
    fs::write(
        hosts.join("127.0.0.1:1/hosts.toml"),
        format!("server = \"http://127.0.0.1:1\"\n[host.\"http://{}\"]\n  capabilities = [\"pull\", \"resolve\"]\n", mirror.addr),
    )
    .unwrap();
    let h = hosts.display().to_string();
    let m = Mounted::with_args(
        &tmp.join("fresh"),
        "127.0.0.1:1/test/mirror:v1",
        &tmp.join("mnt"),
        &["--hosts-dir", &h, "--registry-attempts", "1"],
    )
    .unwrap();
    assert_eq!(fs::read(m.dir.join("hello")).unwrap(), b"from the mirror\n");
    m.unmount().unwrap();
    assert!(
        mirror.log_lines().iter().any(|l| l.contains("\" 206 ")),
        "range reads went to the mirror"
    );
    fs::remove_dir_all(&tmp).ok();
}
