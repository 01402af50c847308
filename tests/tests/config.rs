#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failure should abort loudly
//! The config file: its settings become the defaults of the binary's flags (a flag or its
//! environment variable still wins), and a bad file is refused with the key and file named.

use std::fs;
use std::path::Path;
use std::process::{Command, Output};

use strata_tests::image::{scratch, Compression, LayerBuilder};
use strata_tests::util::{convert_one_layer, strata_bin, Mounted};

/// Runs strata without `--root`, with `env` set and STRATA_* from the test's own environment
/// removed.
fn run(env: &[(&str, &Path)], args: &[&str]) -> Output {
    let mut cmd = Command::new(strata_bin());
    cmd.args(args)
        .env_remove("STRATA_ROOT")
        .env_remove("STRATA_CONFIG");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("running strata")
}

fn images(out: &Output) -> Vec<String> {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|i| i["reference"].as_str().unwrap_or_default().to_string())
        .collect()
}

#[test]
fn config_file_sets_defaults_and_flags_still_win() {
    let tmp = scratch("config").unwrap();
    let store = tmp.join("configured-store");
    let mut l = LayerBuilder::new();
    l.file("big", 0o644, &vec![7u8; 3 << 20]).unwrap();
    convert_one_layer(
        &tmp,
        &store,
        l.finish().unwrap(),
        Compression::Gzip,
        "cfg/app:v1",
    );
    let cfg = tmp.join("strata.toml");
    fs::write(
        &cfg,
        format!(
            "root = \"{}\"\nlog_level = \"info\"\n[mount]\npassthrough = true\nprefetch = false\n",
            store.display()
        ),
    )
    .unwrap();
    let c = cfg.to_string_lossy().to_string();

    // The store comes from the file, named by flag or by environment.
    let listed = images(&run(&[], &["--config", &c, "images", "--json"]));
    assert!(
        listed.iter().any(|r| r.contains("cfg/app:v1")),
        "{listed:?}"
    );
    let listed = images(&run(&[("STRATA_CONFIG", &cfg)], &["images", "--json"]));
    assert!(
        listed.iter().any(|r| r.contains("cfg/app:v1")),
        "{listed:?}"
    );
    // A flag wins over the file.
    let other = tmp.join("other-store");
    let listed = images(&run(
        &[("STRATA_CONFIG", &cfg)],
        &["--root", &other.to_string_lossy(), "images", "--json"],
    ));
    assert!(listed.is_empty(), "{listed:?}");

    // Mount settings reach the daemon: passthrough from the file shows in its counters.
    let mnt = tmp.join("mnt");
    fs::create_dir_all(&mnt).unwrap();
    let out = run(
        &[("STRATA_CONFIG", &cfg)],
        &["mount", "cfg/app:v1", &mnt.to_string_lossy()],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let m = Mounted {
        root: store.clone(),
        dir: mnt.clone(),
    };
    assert_eq!(fs::read(mnt.join("big")).unwrap(), vec![7u8; 3 << 20]);
    let out = run(
        &[("STRATA_CONFIG", &cfg)],
        &["stats", "--json", &mnt.to_string_lossy()],
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["file_cache"].is_object(), "passthrough not on: {v}");
    m.unmount().unwrap();

    // A bad file is refused before anything runs, naming the key and the file.
    fs::write(&cfg, "[cache]\nsise = \"1G\"\n").unwrap();
    let out = run(&[("STRATA_CONFIG", &cfg)], &["images"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("cache.sise") && err.contains("strata.toml"),
        "{err}"
    );
    let missing = tmp.join("missing.toml");
    let out = run(&[], &["--config", &missing.to_string_lossy(), "images"]);
    assert_eq!(out.status.code(), Some(2));
}
