//! Per-registry host settings in containerd's `hosts.toml` format: mirrors tried in order before
//! the upstream server, with capabilities, and the TLS settings of each.
//!
//! ```toml
//! # DIR/docker.io/hosts.toml   (DIR/_default/hosts.toml applies to hosts without their own)
//! server = "https://registry-1.docker.io"
//! # TLS settings of the server (paths relative to this file's directory):
//! ca = "ca.pem"                          # or ["ca1.pem", "ca2.pem"]: trusted besides the system's
//! client = [["client.pem", "client.key"]] # mTLS; or "both.pem" (cert and key in one file)
//! skip_verify = false                    # true: do not verify the server certificate at all
//!
//! [host."https://mirror.example.com"]
//!   capabilities = ["pull", "resolve"]
//!   ca = "/etc/ssl/mirror-ca.pem"        # the same keys in a mirror section apply to the mirror
//! [host."http://10.0.0.5:5000"]
//!   capabilities = ["pull", "resolve"]
//!   override_path = false
//! ```
//!
//! `ca` adds CA certificates (PEM) to the system trust store for that endpoint; `client` takes
//! containerd's forms: `"cert.pem"` (a PEM file holding the certificate and its key),
//! `["a.pem", …]`, or `[["cert.pem", "key.pem"], …]` (only the first client certificate is
//! used). Without a `hosts.toml`, a `DIR/<host>/` directory in Docker's `certs.d` layout is
//! read instead: `*.crt` CA files and `NAME.cert`/`NAME.key` client certificates apply to the
//! server. An explicit `https://` URL (`server` or a `[host]` section) is reached over HTTPS even
//! for loopback and `--insecure-registry` hosts, which otherwise use plain HTTP.

use std::path::{Path, PathBuf};

/// TLS settings of one endpoint (`ca`, `client`, `skip_verify`), with absolute paths.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct TlsSettings {
    /// PEM files of CA certificates trusted besides the system's.
    pub ca: Vec<PathBuf>,
    /// Client certificates: a PEM certificate file and its key file (`None`: in the same file).
    pub client: Vec<(PathBuf, Option<PathBuf>)>,
    /// Do not verify the server's certificate.
    pub skip_verify: bool,
}

impl TlsSettings {
    /// No setting beyond the defaults (the system trust store, no client certificate).
    pub fn is_default(&self) -> bool {
        *self == TlsSettings::default()
    }

    /// Reads `ca`, `client` and `skip_verify` from a `hosts.toml` table; relative paths are
    /// relative to `base` (the file's directory). Values of the wrong type are ignored with a
    /// warning.
    fn parse(table: &toml::Table, base: &Path, what: &str) -> TlsSettings {
        let abs = |p: &str| {
            let p = Path::new(p);
            if p.is_absolute() {
                p.to_path_buf()
            } else {
                base.join(p)
            }
        };
        let mut out = TlsSettings::default();
        match table.get("ca") {
            None => {}
            Some(toml::Value::String(s)) => out.ca.push(abs(s)),
            Some(toml::Value::Array(a)) => {
                for v in a {
                    match v.as_str() {
                        Some(s) => out.ca.push(abs(s)),
                        None => tracing::warn!(what, "hosts.toml: ignoring a `ca` entry: {v}"),
                    }
                }
            }
            Some(v) => tracing::warn!(what, "hosts.toml: `ca` must be a path or paths, not {v}"),
        }
        match table.get("client") {
            None => {}
            Some(toml::Value::String(s)) => out.client.push((abs(s), None)),
            Some(toml::Value::Array(a)) => {
                for v in a {
                    match v {
                        toml::Value::String(s) => out.client.push((abs(s), None)),
                        toml::Value::Array(pair) => {
                            let files: Vec<&str> =
                                pair.iter().filter_map(toml::Value::as_str).collect();
                            match files.as_slice() {
                                [cert] => out.client.push((abs(cert), None)),
                                [cert, key] => out.client.push((abs(cert), Some(abs(key)))),
                                _ => tracing::warn!(
                                    what,
                                    "hosts.toml: a `client` pair must be [\"cert\", \"key\"], not {v}"
                                ),
                            }
                        }
                        _ => tracing::warn!(what, "hosts.toml: ignoring a `client` entry: {v}"),
                    }
                }
            }
            Some(v) => tracing::warn!(what, "hosts.toml: ignoring `client` = {v}"),
        }
        match table.get("skip_verify") {
            None => {}
            Some(toml::Value::Boolean(b)) => out.skip_verify = *b,
            Some(v) => tracing::warn!(
                what,
                "hosts.toml: `skip_verify` must be true or false, not {v}"
            ),
        }
        out
    }
}

/// One place to send requests for a registry host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    /// API root, ending in `/v2` (e.g. `https://mirror.example.com/v2`).
    pub base: String,
    /// `host[:port]` of the endpoint (credentials and tokens are looked up by it).
    pub authority: String,
    /// May serve pulls and manifest resolution.
    pub pull: bool,
    /// May receive pushes.
    pub push: bool,
    /// The upstream server itself (not a mirror).
    pub server: bool,
    /// How to set up TLS with it (https endpoints only).
    pub tls: TlsSettings,
}

impl Endpoint {
    /// `scheme://authority` of the endpoint.
    pub fn origin(&self) -> String {
        let scheme_end = self.base.find("://").map_or(0, |i| i + 3);
        let rest = &self.base[scheme_end..];
        let end = rest.find('/').map_or(self.base.len(), |i| scheme_end + i);
        self.base[..end].to_string()
    }
}

/// `host[:port]` of a URL.
pub fn authority_of(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    rest.split(['/', '?', '#']).next().unwrap_or("").to_string()
}

fn api_base(url: &str, override_path: bool) -> String {
    let url = url.trim_end_matches('/');
    if override_path || url.ends_with("/v2") {
        url.to_string()
    } else {
        format!("{url}/v2")
    }
}

/// Docker's `certs.d` layout, for a host directory without `hosts.toml`: `*.crt` files are CAs,
/// `NAME.cert` with `NAME.key` a client certificate.
fn legacy_certs(dir: &Path) -> TlsSettings {
    let mut out = TlsSettings::default();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    let mut files: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
    files.sort();
    for f in files {
        match f.extension().and_then(|e| e.to_str()) {
            Some("crt") => out.ca.push(f),
            Some("cert") => {
                let key = f.with_extension("key");
                if key.exists() {
                    out.client.push((f, Some(key)));
                } else {
                    tracing::warn!(cert = %f.display(), "certs.d: client certificate without its .key");
                }
            }
            _ => {}
        }
    }
    out
}

/// Reads `DIR/<host>/hosts.toml` (or `DIR/_default/hosts.toml`) and returns the endpoints in
/// the order to try them: mirrors first, then the server (`default_server` unless overridden).
pub fn endpoints(dir: Option<&Path>, host: &str, default_server: &str) -> Vec<Endpoint> {
    let server = |url: &str, tls: TlsSettings| Endpoint {
        base: api_base(url, false),
        authority: authority_of(url),
        pull: true,
        push: true,
        server: true,
        tls,
    };
    let Some(dir) = dir else {
        return vec![server(default_server, TlsSettings::default())];
    };
    let file: Option<PathBuf> = [
        dir.join(host).join("hosts.toml"),
        dir.join("_default/hosts.toml"),
    ]
    .into_iter()
    .find(|p| p.exists());
    let Some(file) = file else {
        return vec![server(default_server, legacy_certs(&dir.join(host)))];
    };
    let parsed = std::fs::read_to_string(&file)
        .map_err(|e| e.to_string())
        .and_then(|t| t.parse::<toml::Table>().map_err(|e| e.to_string()));
    let table = match parsed {
        Ok(t) => t,
        Err(e) => {
            tracing::warn!(file = %file.display(), "ignoring unreadable hosts.toml: {e}");
            return vec![server(default_server, TlsSettings::default())];
        }
    };
    let base = file.parent().map(Path::to_path_buf).unwrap_or_default();
    let mut out = Vec::new();
    if let Some(hosts) = table.get("host").and_then(|h| h.as_table()) {
        for (url, settings) in hosts {
            let Some(settings) = settings.as_table() else {
                tracing::warn!(
                    url,
                    "hosts.toml: ignoring a [host] entry that is not a table"
                );
                continue;
            };
            let caps: Vec<String> = settings
                .get("capabilities")
                .and_then(|c| c.as_array())
                .map(|a| {
                    a.iter()
                        .filter_map(|v| v.as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_else(|| vec!["pull".into(), "resolve".into(), "push".into()]);
            let override_path = settings
                .get("override_path")
                .and_then(|v| v.as_bool())
                .unwrap_or(false);
            out.push(Endpoint {
                base: api_base(url, override_path),
                authority: authority_of(url),
                pull: caps.iter().any(|c| c == "pull" || c == "resolve"),
                push: caps.iter().any(|c| c == "push"),
                server: false,
                tls: TlsSettings::parse(settings, &base, url),
            });
        }
    }
    let upstream = table
        .get("server")
        .and_then(|s| s.as_str())
        .unwrap_or(default_server);
    out.push(server(
        upstream,
        TlsSettings::parse(&table, &base, upstream),
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mirrors_then_server() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("docker.io")).unwrap();
        std::fs::write(
            dir.path().join("docker.io/hosts.toml"),
            r#"
server = "https://registry-1.docker.io"
[host."http://127.0.0.1:5001"]
  capabilities = ["pull", "resolve"]
[host."https://mirror.example.com/custom/v2"]
  override_path = true
"#,
        )
        .unwrap();
        let e = endpoints(Some(dir.path()), "docker.io", "https://fallback");
        assert_eq!(e.len(), 3);
        assert_eq!(e[0].base, "http://127.0.0.1:5001/v2");
        assert!(e[0].pull && !e[0].push);
        assert_eq!(e[1].base, "https://mirror.example.com/custom/v2");
        assert_eq!(e[1].origin(), "https://mirror.example.com");
        assert_eq!(e[2].base, "https://registry-1.docker.io/v2");
        assert_eq!(e[2].authority, "registry-1.docker.io");
        let none = endpoints(Some(dir.path()), "quay.io", "https://quay.io");
        assert_eq!(
            none,
            vec![Endpoint {
                base: "https://quay.io/v2".into(),
                authority: "quay.io".into(),
                pull: true,
                push: true,
                server: true,
                tls: TlsSettings::default(),
            }]
        );
    }

    #[test]
    fn docker_certs_d_layout_without_hosts_toml() {
        let dir = tempfile::tempdir().unwrap();
        let hd = dir.path().join("reg.example:5000");
        std::fs::create_dir_all(&hd).unwrap();
        for f in [
            "ca.crt",
            "client.cert",
            "client.key",
            "lonely.cert",
            "notes.txt",
        ] {
            std::fs::write(hd.join(f), "").unwrap();
        }
        let e = endpoints(
            Some(dir.path()),
            "reg.example:5000",
            "https://reg.example:5000",
        );
        assert_eq!(e.len(), 1);
        assert_eq!(
            e[0].tls,
            TlsSettings {
                ca: vec![hd.join("ca.crt")],
                client: vec![(hd.join("client.cert"), Some(hd.join("client.key")))],
                skip_verify: false,
            }
        );
    }

    #[test]
    fn tls_settings_in_containerd_forms() {
        let dir = tempfile::tempdir().unwrap();
        let hd = dir.path().join("127.0.0.1:5443");
        std::fs::create_dir_all(&hd).unwrap();
        std::fs::write(
            hd.join("hosts.toml"),
            r#"
server = "https://127.0.0.1:5443"
ca = "ca.pem"
client = [["client.pem", "/abs/client.key"]]
[host."https://mirror.local"]
  ca = ["a.pem", "/etc/b.pem"]
  client = "both.pem"
  skip_verify = true
[host."https://other.local"]
  client = ["c1.pem", ["c2.pem"]]
"#,
        )
        .unwrap();
        let e = endpoints(Some(dir.path()), "127.0.0.1:5443", "http://127.0.0.1:5443");
        assert_eq!(e.len(), 3);
        assert_eq!(
            e[0].tls,
            TlsSettings {
                ca: vec![hd.join("a.pem"), PathBuf::from("/etc/b.pem")],
                client: vec![(hd.join("both.pem"), None)],
                skip_verify: true,
            }
        );
        assert_eq!(
            e[1].tls.client,
            vec![(hd.join("c1.pem"), None), (hd.join("c2.pem"), None)]
        );
        assert!(e[1].tls.ca.is_empty() && !e[1].tls.skip_verify);
        // The top-level keys belong to the server, and its explicit https URL wins.
        assert!(e[2].server);
        assert_eq!(e[2].base, "https://127.0.0.1:5443/v2");
        assert_eq!(
            e[2].tls,
            TlsSettings {
                ca: vec![hd.join("ca.pem")],
                client: vec![(
                    hd.join("client.pem"),
                    Some(PathBuf::from("/abs/client.key"))
                )],
                skip_verify: false,
            }
        );
    }
}
