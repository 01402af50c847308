//! Per-registry host settings in containerd's `hosts.toml` format: mirrors tried in order before
//! the upstream server, with capabilities.
//!
//! ```toml
//! # DIR/docker.io/hosts.toml   (DIR/_default/hosts.toml applies to hosts without their own)
//! server = "https://registry-1.docker.io"
//!
//! [host."https://mirror.example.com"]
//!   capabilities = ["pull", "resolve"]
//! [host."http://10.0.0.5:5000"]
//!   capabilities = ["pull", "resolve"]
//!   override_path = false
//! ```

use std::path::{Path, PathBuf};

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

fn authority_of(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    rest.split('/').next().unwrap_or("").to_string()
}

fn api_base(url: &str, override_path: bool) -> String {
    let url = url.trim_end_matches('/');
    if override_path || url.ends_with("/v2") {
        url.to_string()
    } else {
        format!("{url}/v2")
    }
}

/// Reads `DIR/<host>/hosts.toml` (or `DIR/_default/hosts.toml`) and returns the endpoints in
/// the order to try them: mirrors first, then the server (`default_server` unless overridden).
pub fn endpoints(dir: Option<&Path>, host: &str, default_server: &str) -> Vec<Endpoint> {
    let server = |url: &str| Endpoint {
        base: api_base(url, false),
        authority: authority_of(url),
        pull: true,
        push: true,
        server: true,
    };
    let Some(dir) = dir else {
        return vec![server(default_server)];
    };
    let file: Option<PathBuf> = [
        dir.join(host).join("hosts.toml"),
        dir.join("_default/hosts.toml"),
    ]
    .into_iter()
    .find(|p| p.exists());
    let Some(file) = file else {
        return vec![server(default_server)];
    };
    let parsed = std::fs::read_to_string(&file)
        .map_err(|e| e.to_string())
        .and_then(|t| t.parse::<toml::Table>().map_err(|e| e.to_string()));
    let table = match parsed {
        Ok(t) => t,
        Err(e) => {
            tracing::warn!(file = %file.display(), "ignoring unreadable hosts.toml: {e}");
            return vec![server(default_server)];
        }
    };
    let mut out = Vec::new();
    if let Some(hosts) = table.get("host").and_then(|h| h.as_table()) {
        for (url, settings) in hosts {
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
            if settings.get("skip_verify").and_then(|v| v.as_bool()) == Some(true) {
                tracing::warn!(url, "skip_verify is not supported; TLS is verified");
            }
            out.push(Endpoint {
                base: api_base(url, override_path),
                authority: authority_of(url),
                pull: caps.iter().any(|c| c == "pull" || c == "resolve"),
                push: caps.iter().any(|c| c == "push"),
                server: false,
            });
        }
    }
    let upstream = table
        .get("server")
        .and_then(|s| s.as_str())
        .unwrap_or(default_server);
    out.push(server(upstream));
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
            }]
        );
    }
}
