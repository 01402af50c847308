//! `strata metrics`: every live mount's counters in the Prometheus text format, printed once
//! (for node_exporter's textfile collector) or served over HTTP at `/metrics` with `--listen`.

use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Duration;

use anyhow::Context;

use strata_fs::service::protocol::Request;

use crate::GlobalArgs;

#[derive(clap::Args)]
pub struct MetricsArgs {
    /// Serve the metrics over HTTP at ADDR (e.g. 127.0.0.1:9464) instead of printing them once.
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,
    /// Print once even when the config file sets `metrics.address`.
    #[arg(long)]
    pub print: bool,
}

pub fn run(g: &GlobalArgs, a: MetricsArgs) -> anyhow::Result<()> {
    let Some(addr) = a.listen.filter(|_| !a.print) else {
        print!("{}", render(g)?);
        return Ok(());
    };
    let listener = TcpListener::bind(&addr).with_context(|| format!("listening on {addr}"))?;
    eprintln!("serving metrics on http://{addr}/metrics");
    for conn in listener.incoming() {
        match conn {
            // A thread per connection: a slow client holds up only itself.
            Ok(stream) => {
                let g = g.clone();
                std::thread::spawn(move || {
                    if let Err(e) = serve(&g, stream) {
                        tracing::debug!("metrics request: {e}");
                    }
                });
            }
            Err(e) => tracing::warn!("accepting a metrics connection: {e}"),
        }
    }
    Ok(())
}

/// Answers one HTTP request: `GET /metrics` gets the metrics, anything else 404.
fn serve(g: &GlobalArgs, mut stream: TcpStream) -> anyhow::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;
    // A request is a line and some headers: anything longer is cut off.
    let mut reader = BufReader::new(stream.try_clone()?.take(16 << 10));
    let mut request = String::new();
    reader.read_line(&mut request)?;
    // Skip the headers.
    let mut line = String::new();
    while reader.read_line(&mut line)? > 2 {
        line.clear();
    }
    let path = request.split_whitespace().nth(1).unwrap_or("");
    let (status, body) = if request.starts_with("GET ") && (path == "/metrics" || path == "/") {
        match render(g) {
            Ok(b) => ("200 OK", b),
            Err(e) => ("500 Internal Server Error", format!("{e:#}\n")),
        }
    } else {
        ("404 Not Found", "not found\n".to_string())
    };
    write!(
        stream,
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    )?;
    Ok(())
}

/// A metric family: name, type, help, and samples (labels, value).
struct Family {
    name: &'static str,
    kind: &'static str,
    help: &'static str,
    /// (name suffix such as `_bucket`, labels, value)
    samples: Vec<(&'static str, String, f64)>,
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The metrics text for the node daemon of this store and each of its mounts (nothing when no
/// daemon runs).
fn render(g: &GlobalArgs) -> anyhow::Result<String> {
    let all = super::daemon::call_running(g, &Request::Metrics)?.unwrap_or_default();
    let empty = Vec::new();
    let mounts = all["mounts"].as_array().unwrap_or(&empty);
    let node = &all["node"];
    let mut families: Vec<Family> = Vec::new();
    let mut add_suffixed = |name, suffix, kind, help, labels: &str, value: f64| {
        let at = match families.iter().position(|f| f.name == name) {
            Some(i) => i,
            None => {
                families.push(Family {
                    name,
                    kind,
                    help,
                    samples: Vec::new(),
                });
                families.len() - 1
            }
        };
        families[at]
            .samples
            .push((suffix, labels.to_string(), value));
    };
    let mut add = |name, kind, help, labels: &str, value: f64| {
        add_suffixed(name, "", kind, help, labels, value)
    };
    if node.is_object() {
        let n = |p: &str| node.pointer(p).and_then(|x| x.as_f64()).unwrap_or(0.0);
        add(
            "strata_daemon_mounts",
            "gauge",
            "Live mounts served by the node daemon.",
            "",
            n("/mounts"),
        );
        add(
            "strata_memory_cache_bytes",
            "gauge",
            "Bytes of decoded chunks in the daemon's memory cache.",
            "",
            n("/memory_cache_bytes"),
        );
        if node["disk_cache"].is_object() {
            for (metric, kind, key, help) in [
                (
                    "strata_disk_cache_bytes",
                    "gauge",
                    "/disk_cache/bytes",
                    "Bytes in the node's chunk cache.",
                ),
                (
                    "strata_disk_cache_capacity_bytes",
                    "gauge",
                    "/disk_cache/capacity",
                    "Size cap of the node's chunk cache.",
                ),
                (
                    "strata_disk_cache_chunks",
                    "gauge",
                    "/disk_cache/entries",
                    "Chunks in the node's chunk cache.",
                ),
                (
                    "strata_disk_cache_evictions_total",
                    "counter",
                    "/disk_cache/evicted",
                    "Chunks evicted from the node's chunk cache.",
                ),
                (
                    "strata_disk_cache_corrupt_total",
                    "counter",
                    "/disk_cache/corrupt",
                    "Damaged chunk files found and dropped.",
                ),
            ] {
                add(metric, kind, help, "", n(key));
            }
        }
    }
    let mut ops: Vec<(String, serde_json::Value)> = Vec::new();
    for v in mounts {
        let n = |p: &str| v.pointer(p).and_then(|x| x.as_f64()).unwrap_or(0.0);
        // A containerd snapshot's mount shows one layer (`layer`); its snapshot is the
        // directory above the mount point.
        let labels = format!(
            "mountpoint=\"{}\",image=\"{}\",layer=\"{}\"",
            escape(v["mountpoint"].as_str().unwrap_or("")),
            escape(v["image"].as_str().unwrap_or("")),
            escape(v["layer"].as_str().unwrap_or(""))
        );
        let with = |extra: &str| format!("{labels},{extra}");
        add(
            "strata_mount_info",
            "gauge",
            "A live strata mount.",
            &labels,
            1.0,
        );
        add(
            "strata_mount_time_to_mount_seconds",
            "gauge",
            "Time from the mount request to a ready mount.",
            &labels,
            n("/time_to_mount_ms") / 1000.0,
        );
        if let Some(ms) = v["time_to_first_byte_ms"].as_f64() {
            add(
                "strata_mount_time_to_first_byte_seconds",
                "gauge",
                "Time from the mount request to the first bytes read from a layer blob.",
                &labels,
                ms / 1000.0,
            );
        }
        add(
            "strata_mount_prefetched",
            "gauge",
            "1 once the background prefetch has every chunk of the mount's remote layers.",
            &labels,
            if v["prefetched"].as_bool() == Some(true) {
                1.0
            } else {
                0.0
            },
        );
        add(
            "strata_mount_profile_chunks",
            "gauge",
            "Chunks of the mount's remote layers that its access profile names (fetched first).",
            &labels,
            n("/profile_chunks"),
        );
        for (source, key) in [
            ("memory", "/fetch/memory_hits"),
            ("disk", "/fetch/disk_hits"),
            ("blob", "/fetch/source_chunks"),
        ] {
            add(
                "strata_chunks_served_total",
                "counter",
                "Chunks served, by where they came from (blob: fetched or read from the layer).",
                &with(&format!("source=\"{source}\"")),
                n(key),
            );
        }
        add(
            "strata_blob_reads_total",
            "counter",
            "Range reads of layer blobs (registry or local).",
            &labels,
            n("/fetch/source_reads"),
        );
        add(
            "strata_blob_read_bytes_total",
            "counter",
            "Bytes read from layer blobs.",
            &labels,
            n("/fetch/source_bytes"),
        );
        add(
            "strata_blob_read_seconds_total",
            "counter",
            "Time spent in range reads of layer blobs.",
            &labels,
            n("/fetch/source_micros") / 1e6,
        );
        add(
            "strata_chunk_failures_total",
            "counter",
            "Chunks that could not be served (fetch or verification failed).",
            &labels,
            n("/fetch/failures"),
        );
        ops.push((labels.clone(), v["ops"].clone()));
        if v["file_cache"].is_object() {
            add(
                "strata_passthrough_opens_total",
                "counter",
                "Opens served by FUSE passthrough from a file's copy.",
                &labels,
                n("/passthrough_opens"),
            );
            add(
                "strata_passthrough_files_written_total",
                "counter",
                "Whole-file copies written for passthrough.",
                &labels,
                n("/file_cache/inserted"),
            );
        }
    }
    // FUSE operation latency, one histogram per mount and operation.
    for (labels, hists) in ops {
        for h in hists.as_array().unwrap_or(&empty) {
            let op = h["op"].as_str().unwrap_or("");
            let labels = format!("{labels},op=\"{}\"", escape(op));
            let help = "Time to answer FUSE requests, by operation.";
            let name = "strata_fuse_op_duration_seconds";
            for b in h["buckets"].as_array().unwrap_or(&empty) {
                let le = match b[0].as_f64() {
                    Some(v) => v.to_string(),
                    None => "+Inf".into(),
                };
                let count = b[1].as_f64().unwrap_or(0.0);
                add_suffixed(
                    name,
                    "_bucket",
                    "histogram",
                    help,
                    &format!("{labels},le=\"{le}\""),
                    count,
                );
            }
            add_suffixed(
                name,
                "_sum",
                "histogram",
                help,
                &labels,
                h["sum_seconds"].as_f64().unwrap_or(0.0),
            );
            add_suffixed(
                name,
                "_count",
                "histogram",
                help,
                &labels,
                h["count"].as_f64().unwrap_or(0.0),
            );
        }
    }
    let mut out = String::new();
    for f in families {
        let _ = writeln!(out, "# HELP {} {}", f.name, f.help);
        let _ = writeln!(out, "# TYPE {} {}", f.name, f.kind);
        for (suffix, labels, value) in f.samples {
            if labels.is_empty() {
                let _ = writeln!(out, "{}{suffix} {value}", f.name);
            } else {
                let _ = writeln!(out, "{}{suffix}{{{labels}}} {value}", f.name);
            }
        }
    }
    Ok(out)
}
