#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failure should abort loudly
//! Registries as they are in production: HTTPS with a private CA trusted through containerd's
//! `hosts.toml` (`ca`), mutual TLS (`client`), `skip_verify`, and credentials from Docker
//! credential helpers (`credHelpers`, `credsStore`). Real docker-registry processes, real
//! certificates made with openssl, a lazy mount through the node daemon over TLS.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Output;

use strata_tests::image::{noise, scratch, Compression, LayerBuilder};
use strata_tests::registry::TestRegistry;
use strata_tests::tls::{credential_helper, write_hosts_toml, Pki, TlsRegistry};
use strata_tests::util::{convert_one_layer, strata, strata_ok, strata_with, Mounted};

/// A two-file image (one of them 4 MB, so a read of it is a range read) converted as `name`.
fn image(tmp: &Path, root: &Path, name: &str) {
    let mut l = LayerBuilder::new();
    l.file("hello", 0o644, b"hello over TLS\n")
        .unwrap()
        .file("big", 0o644, &noise(5, 4 << 20))
        .unwrap();
    convert_one_layer(tmp, root, l.finish().unwrap(), Compression::Gzip, name);
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn assert_ok(out: &Output, what: &str) {
    assert!(
        out.status.success(),
        "{what} failed:\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        stderr(out)
    );
}

/// Runs strata with `--hosts-dir DIR` appended and few attempts (failures are not retried long).
fn with_hosts(root: &Path, hosts: &Path, args: &[&str]) -> Output {
    let h = hosts.display().to_string();
    let mut all: Vec<&str> = args.to_vec();
    all.extend(["--hosts-dir", &h, "--registry-attempts", "1"]);
    strata(root, &all)
}

#[test]
fn private_ca_from_hosts_toml_push_pull_and_lazy_mount() {
    let tmp = scratch("tls").unwrap();
    let pki = Pki::generate(&tmp.join("pki")).unwrap();
    let local = tmp.join("local");
    image(&tmp, &local, "test/tls:v1");
    let reg = TlsRegistry::start(&tmp.join("registry"), &pki, false).unwrap();
    let remote = format!("{}/test/tls:v1", reg.addr);
    let hosts = tmp.join("certs.d");

    // hosts.toml names the https server but not its CA: the certificate is not trusted.
    let hd = write_hosts_toml(
        &hosts,
        &reg.addr,
        &format!("server = \"https://{}\"\n", reg.addr),
    )
    .unwrap();
    let out = with_hosts(&local, &hosts, &["push", "test/tls:v1", &remote]);
    assert!(
        !out.status.success(),
        "push to an untrusted registry worked"
    );
    let err = stderr(&out);
    assert!(
        err.contains("not trusted") && err.contains(&reg.addr) && err.contains("`ca"),
        "unclear error: {err}"
    );
    // Without hosts.toml a loopback registry is plain HTTP, which a TLS server refuses.
    let out = strata(
        &local,
        &["push", "test/tls:v1", &remote, "--registry-attempts", "1"],
    );
    assert!(!out.status.success());

    // `ca` relative to the hosts.toml's directory.
    fs::copy(&pki.ca, hd.join("ca.pem")).unwrap();
    write_hosts_toml(
        &hosts,
        &reg.addr,
        &format!("server = \"https://{}\"\nca = \"ca.pem\"\n", reg.addr),
    )
    .unwrap();
    assert_ok(
        &with_hosts(&local, &hosts, &["push", "test/tls:v1", &remote]),
        "push with the CA",
    );
    assert_ok(
        &with_hosts(&tmp.join("pulled"), &hosts, &["pull", &remote]),
        "pull with the CA",
    );

    // A lazy mount through the daemon: range reads over TLS.
    let before = reg.log_lines().len();
    let h = hosts.display().to_string();
    let m = Mounted::with_args(
        &tmp.join("fresh"),
        &remote,
        &tmp.join("mnt"),
        &["--hosts-dir", &h, "--no-prefetch"],
    )
    .unwrap();
    assert_eq!(fs::read(m.dir.join("hello")).unwrap(), b"hello over TLS\n");
    assert_eq!(fs::read(m.dir.join("big")).unwrap(), noise(5, 4 << 20));
    m.unmount().unwrap();
    let ranged = reg.log_lines()[before..]
        .iter()
        .filter(|l| l.contains("\" 206 "))
        .count();
    assert!(ranged >= 2, "expected range reads over TLS");

    // skip_verify: no CA needed (and none given).
    write_hosts_toml(
        &hosts,
        &reg.addr,
        &format!("server = \"https://{}\"\nskip_verify = true\n", reg.addr),
    )
    .unwrap();
    assert_ok(
        &with_hosts(&tmp.join("skip"), &hosts, &["pull", &remote]),
        "pull with skip_verify",
    );

    // The same settings in a [host] mirror section apply to that mirror.
    write_hosts_toml(
        &hosts,
        "127.0.0.1:1",
        &format!(
            "server = \"http://127.0.0.1:1\"\n[host.\"https://{}\"]\n  capabilities = [\"pull\", \"resolve\"]\n  ca = \"{}\"\n",
            reg.addr,
            pki.ca.display()
        ),
    )
    .unwrap();
    assert_ok(
        &with_hosts(
            &tmp.join("mirrored"),
            &hosts,
            &["pull", "127.0.0.1:1/test/tls:v1"],
        ),
        "pull through an https mirror with its own CA",
    );
    drop(reg);
    fs::remove_dir_all(&tmp).ok();
}

#[test]
fn mutual_tls_needs_the_client_certificate() {
    let tmp = scratch("mtls").unwrap();
    let pki = Pki::generate(&tmp.join("pki")).unwrap();
    let local = tmp.join("local");
    image(&tmp, &local, "test/mtls:v1");
    let reg = TlsRegistry::start(&tmp.join("registry"), &pki, true).unwrap();
    let remote = format!("{}/test/mtls:v1", reg.addr);
    let hosts = tmp.join("certs.d");
    let ca = pki.ca.display().to_string();

    write_hosts_toml(
        &hosts,
        &reg.addr,
        &format!("server = \"https://{}\"\nca = \"{ca}\"\n", reg.addr),
    )
    .unwrap();
    let out = with_hosts(&local, &hosts, &["push", "test/mtls:v1", &remote]);
    assert!(
        !out.status.success(),
        "push without a client certificate worked"
    );
    let err = stderr(&out);
    assert!(
        err.contains("client certificate") && err.contains("`client"),
        "unclear error: {err}"
    );

    // containerd's pair form, paths relative to the hosts.toml.
    let hd = hosts.join(&reg.addr);
    fs::copy(&pki.client_cert, hd.join("client.pem")).unwrap();
    fs::copy(&pki.client_key, hd.join("client.key")).unwrap();
    write_hosts_toml(
        &hosts,
        &reg.addr,
        &format!(
            "server = \"https://{}\"\nca = \"{ca}\"\nclient = [[\"client.pem\", \"client.key\"]]\n",
            reg.addr
        ),
    )
    .unwrap();
    assert_ok(
        &with_hosts(&local, &hosts, &["push", "test/mtls:v1", &remote]),
        "push with the client certificate",
    );

    // The single-file form: certificate and key in one PEM.
    let both: PathBuf = hd.join("both.pem");
    let mut pem = fs::read(&pki.client_cert).unwrap();
    pem.extend(fs::read(&pki.client_key).unwrap());
    fs::write(&both, pem).unwrap();
    write_hosts_toml(
        &hosts,
        &reg.addr,
        &format!(
            "server = \"https://{}\"\nca = [\"{ca}\"]\nclient = \"both.pem\"\n",
            reg.addr
        ),
    )
    .unwrap();
    assert_ok(
        &with_hosts(&tmp.join("pulled"), &hosts, &["pull", &remote]),
        "pull with a combined client PEM",
    );
    let h = hosts.display().to_string();
    let m = Mounted::with_args(
        &tmp.join("fresh"),
        &remote,
        &tmp.join("mnt"),
        &["--hosts-dir", &h, "--no-prefetch"],
    )
    .unwrap();
    assert_eq!(fs::read(m.dir.join("big")).unwrap(), noise(5, 4 << 20));
    m.unmount().unwrap();
    drop(reg);
    fs::remove_dir_all(&tmp).ok();
}

#[test]
fn credential_helpers_supply_registry_credentials() {
    let tmp = scratch("credhelper").unwrap();
    let local = tmp.join("local");
    image(&tmp, &local, "test/helper:v1");
    let reg = TestRegistry::start(&tmp.join("registry"), Some(("tester", "s3cret"))).unwrap();
    let remote = format!("{}/test/helper:v1", reg.addr);
    let bin = tmp.join("bin");
    credential_helper(&bin, "strtest", "tester").unwrap();
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let docker = tmp.join("docker");
    fs::create_dir_all(&docker).unwrap();
    let config = docker.join("config.json");
    let env = [
        ("DOCKER_CONFIG", docker.as_path()),
        ("PATH", Path::new(&path)),
    ];
    let gets = bin.join("strtest.gets");
    let set_config = |v: serde_json::Value| fs::write(&config, v.to_string()).unwrap();
    set_config(serde_json::json!({"credHelpers": {reg.addr.clone(): "strtest"}}));

    // The helper has nothing: anonymous, which this registry refuses.
    let out = strata_with(&local, &env, &["push", "test/helper:v1", &remote], None);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("authentication required"),
        "{}",
        stderr(&out)
    );
    assert_eq!(
        fs::read_to_string(&gets).unwrap(),
        format!("{}\n", reg.addr)
    );

    // The helper answers: push, pull and a lazy mount (the daemon inherits PATH and
    // DOCKER_CONFIG) all authenticate; the helper runs once per process and host.
    fs::write(bin.join("strtest.secret"), "s3cret").unwrap();
    fs::remove_file(&gets).unwrap();
    let out = strata_with(&local, &env, &["push", "test/helper:v1", &remote], None);
    assert_ok(&out, "push with the credential helper");
    assert_eq!(
        fs::read_to_string(&gets).unwrap().lines().count(),
        1,
        "the helper ran more than once"
    );
    let out = strata_with(&tmp.join("pulled"), &env, &["pull", &remote], None);
    assert_ok(&out, "pull with the credential helper");
    let fresh = tmp.join("fresh");
    let mnt = tmp.join("mnt");
    fs::create_dir_all(&mnt).unwrap();
    let out = strata_with(
        &fresh,
        &env,
        &[
            "mount",
            &remote,
            &mnt.display().to_string(),
            "--no-prefetch",
        ],
        None,
    );
    assert_ok(&out, "mount with the credential helper");
    let big = fs::read(mnt.join("big"));
    strata_ok(&fresh, &["umount", &mnt.display().to_string()]);
    assert_eq!(big.unwrap(), noise(5, 4 << 20));

    // A wrong secret is an authentication error.
    fs::write(bin.join("strtest.secret"), "wrong").unwrap();
    let out = strata_with(&tmp.join("wrong"), &env, &["pull", &remote], None);
    assert!(!out.status.success(), "pull with a wrong secret worked");
    assert!(
        stderr(&out).contains("authentication required"),
        "{}",
        stderr(&out)
    );

    // credsStore applies to every host; a per-host credHelpers entry wins over it, and a
    // missing helper is an error naming it.
    fs::write(bin.join("strtest.secret"), "s3cret").unwrap();
    set_config(serde_json::json!({"credsStore": "strtest"}));
    let out = strata_with(&tmp.join("store"), &env, &["pull", &remote], None);
    assert_ok(&out, "pull with credsStore");
    set_config(serde_json::json!({
        "credsStore": "strtest",
        "credHelpers": {reg.addr.clone(): "absent"},
    }));
    let out = strata_with(&tmp.join("absent"), &env, &["pull", &remote], None);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("docker-credential-absent"),
        "{}",
        stderr(&out)
    );

    // `strata login` with a helper configured stores through it, not in config.json.
    set_config(serde_json::json!({"credHelpers": {reg.addr.clone(): "strtest"}}));
    let out = strata_with(
        &local,
        &env,
        &["login", "-u", "tester", "--password-stdin", &reg.addr],
        Some(b"s3cret\n"),
    );
    assert_ok(&out, "login through the helper");
    let stored = fs::read_to_string(bin.join("strtest.stored")).unwrap();
    assert!(stored.contains("\"Secret\":\"s3cret\""), "{stored}");
    let saved: serde_json::Value = serde_json::from_slice(&fs::read(&config).unwrap()).unwrap();
    assert_eq!(saved["credHelpers"][&reg.addr], "strtest");
    assert!(saved["auths"].get(&reg.addr).is_none(), "{saved}");
    let out = strata_with(&local, &env, &["logout", &reg.addr], None);
    assert_ok(&out, "logout through the helper");
    assert!(!bin.join("strtest.stored").exists());
    drop(reg);
    fs::remove_dir_all(&tmp).ok();
}
