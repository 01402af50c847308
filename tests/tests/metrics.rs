#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failure should abort loudly
//! `strata metrics`: live mounts' counters in the Prometheus text format, printed or served.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use strata_tests::image::{noise, scratch, Compression, LayerBuilder};
use strata_tests::util::{convert_one_layer, strata_bin, strata_ok, Mounted};

/// The value of the sample of `metric` whose labels contain `label`.
fn sample(text: &str, metric: &str, label: &str) -> Option<f64> {
    text.lines()
        .filter(|l| l.starts_with(&format!("{metric}{{")) && l.contains(label))
        .find_map(|l| l.rsplit(' ').next()?.parse().ok())
}

#[test]
fn metrics_are_printed_and_served() {
    let tmp = scratch("metrics").unwrap();
    let root = tmp.join("store");
    let mut l = LayerBuilder::new();
    l.file("data", 0o644, &noise(5, 2 << 20)).unwrap();
    convert_one_layer(
        &tmp,
        &root,
        l.finish().unwrap(),
        Compression::Gzip,
        "m/app:v1",
    );
    let mnt = tmp.join("mnt");
    let m = Mounted::new(&root, "m/app:v1", &mnt).unwrap();
    assert_eq!(std::fs::read(mnt.join("data")).unwrap(), noise(5, 2 << 20));
    std::thread::sleep(Duration::from_millis(300)); // counters are published every 100 ms

    let text = strata_ok(&root, &["metrics"]);
    let here = format!("mountpoint=\"{}\"", mnt.display());
    assert_eq!(
        sample(&text, "strata_mount_info", &here),
        Some(1.0),
        "{text}"
    );
    assert!(sample(&text, "strata_chunks_served_total", "source=\"blob\"").unwrap() >= 2.0);
    assert!(sample(&text, "strata_blob_read_bytes_total", &here).unwrap() > 0.0);
    assert!(text.contains("# TYPE strata_chunks_served_total counter"));

    // Served over HTTP: a free loopback port, the server stopped by PID at the end.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let mut server = Command::new(strata_bin())
        .arg("--root")
        .arg(&root)
        .args(["metrics", "--listen", &addr])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut stream = loop {
        match TcpStream::connect(&addr) {
            Ok(s) => break s,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => panic!("metrics server: {e}"),
        }
    };
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut reply = String::new();
    stream.read_to_string(&mut reply).unwrap();
    let mut missing = TcpStream::connect(&addr).unwrap();
    missing.write_all(b"GET /nope HTTP/1.1\r\n\r\n").unwrap();
    let mut not_found = String::new();
    missing.read_to_string(&mut not_found).unwrap();
    server.kill().unwrap();
    server.wait().unwrap();
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    assert_eq!(
        sample(&reply, "strata_mount_info", &here),
        Some(1.0),
        "{reply}"
    );
    assert!(not_found.starts_with("HTTP/1.1 404"), "{not_found}");

    m.unmount().unwrap();
    // An unmounted daemon no longer shows.
    let text = strata_ok(&root, &["metrics"]);
    assert_eq!(sample(&text, "strata_mount_info", &here), None, "{text}");
}
