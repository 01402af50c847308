//! An OCI distribution client: manifests and indexes, blobs and byte ranges of blobs, uploads,
//! with anonymous, basic and bearer-token auth and retries with backoff.
//!
//! TLS trusts the system's CA bundle plus, per host, what its `hosts.toml` says (`ca`, `client`,
//! `skip_verify`; see [`hosts`]): one agent per distinct TLS setting. Blob range reads follow a
//! registry's redirect (to object storage or a CDN) once and reuse the final URL for later ranges
//! of the same blob for a few minutes, without the registry's `Authorization` header.
//!
//! It is synchronous on purpose: FUSE requests are served on a pool of threads, and a range read
//! is one blocking request on the thread that needs the bytes (no async runtime in between).

pub mod auth;
mod blob;
pub mod hosts;
mod manifest;
mod push;
mod request;
#[cfg(test)]
mod testutil;
mod tls;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::reference::Reference;
use auth::CredentialStore;
use hosts::{Endpoint, TlsSettings};
use request::{status_error, Body};

pub use blob::RegistryBlob;
pub use manifest::{artifact_type_of, Resolved};

/// Redirects followed by hand for a range read.
const MAX_REDIRECTS: u32 = 5;

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("{method} {url}: HTTP {status}{detail}")]
    Status {
        method: &'static str,
        url: String,
        status: u16,
        detail: String,
    },
    #[error("{method} {url}: {reason}")]
    Transport {
        method: &'static str,
        url: String,
        reason: String,
    },
    #[error("{host}: authentication required (run `strata login {host}`)")]
    Unauthorized { host: String },
    #[error(
        "{url}: the TLS certificate of {authority} is not trusted ({reason}); add the CA that \
         signed it with `ca = \"ca.pem\"` in {hosts_toml} (or set `skip_verify = true` there)"
    )]
    UntrustedCertificate {
        url: String,
        authority: String,
        reason: String,
        hosts_toml: String,
    },
    #[error(
        "{url}: {authority} refused the TLS client certificate or requires one ({reason}); set \
         `client = [[\"client.pem\", \"client.key\"]]` in {hosts_toml}"
    )]
    ClientCertificate {
        url: String,
        authority: String,
        reason: String,
        hosts_toml: String,
    },
    #[error("TLS settings of {authority} (hosts.toml): {reason}")]
    TlsSettings { authority: String, reason: String },
    #[error(transparent)]
    Credentials(#[from] auth::CredentialError),
    #[error("{what} digest mismatch: expected {expected}, got {actual}")]
    DigestMismatch {
        what: String,
        expected: String,
        actual: String,
    },
    #[error("{0}")]
    Invalid(String),
}

pub type Result<T, E = RegistryError> = std::result::Result<T, E>;

/// Client settings.
#[derive(Clone, Debug)]
pub struct RegistryConfig {
    /// Hosts reached over plain HTTP besides localhost and 127.0.0.0/8.
    pub insecure_hosts: Vec<String>,
    /// Attempts per request for connection errors, 5xx and 429.
    pub attempts: u32,
    /// First backoff delay (doubles each retry).
    pub backoff: Duration,
    /// Connect timeout.
    pub connect_timeout: Duration,
    /// Time allowed without progress while reading a response.
    pub read_timeout: Duration,
    /// Directory of per-host `hosts.toml` files (mirrors, TLS settings), containerd's `certs.d`
    /// layout.
    pub hosts_dir: Option<std::path::PathBuf>,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        RegistryConfig {
            insecure_hosts: Vec::new(),
            attempts: 4,
            backoff: Duration::from_millis(200),
            connect_timeout: Duration::from_secs(10),
            read_timeout: Duration::from_secs(30),
            hosts_dir: None,
        }
    }
}

/// A registry client shared by every request of a process.
pub struct Registry {
    /// Agents with the system trust store and no client certificate.
    agents: Agents,
    /// Agents for endpoints with their own TLS settings, built on first use.
    tls_agents: Mutex<HashMap<TlsSettings, Agents>>,
    /// The system's CA certificates, if a bundle was found.
    system_roots: Option<Arc<Vec<ureq::tls::Certificate<'static>>>>,
    config: RegistryConfig,
    creds: CredentialStore,
    /// Authorization header per (host, repository, actions).
    tokens: Mutex<HashMap<String, String>>,
    /// Endpoints per registry host (hosts.toml is read once).
    endpoint_cache: Mutex<HashMap<String, Vec<Endpoint>>>,
    /// Where a blob's range reads were redirected to, and when: per (endpoint, repository, digest).
    redirects: Mutex<HashMap<String, (String, Instant)>>,
    /// Time from sending a range read to its answer's headers, in microseconds: a moving
    /// average over this client's range reads after its first (0 before).
    range_latency_us: std::sync::atomic::AtomicU64,
    /// Range reads answered so far.
    range_reads: std::sync::atomic::AtomicU64,
    /// Nanoseconds per KiB of 206 bodies of 64 KiB and more: a moving average (0 before the
    /// first).
    range_ns_per_kib: std::sync::atomic::AtomicU64,
}

/// Two agents with the same TLS settings: one following redirects, one returning them (range
/// reads follow them by hand to remember where they led).
#[derive(Clone)]
struct Agents {
    follow: ureq::Agent,
    manual: ureq::Agent,
}

/// Where a request goes: the agents for its endpoint, and whose credentials and tokens it uses.
struct At {
    agents: Agents,
    /// Host credentials and tokens are kept under.
    host: String,
    /// The registry host (names its hosts.toml in error messages).
    registry: String,
}

fn is_loopback(host: &str) -> bool {
    let h = host.rsplit_once(':').map_or(host, |(h, p)| {
        if p.bytes().all(|b| b.is_ascii_digit()) {
            h
        } else {
            host
        }
    });
    h == "localhost" || h.starts_with("127.") || h == "[::1]"
}

impl Agents {
    fn new(config: &RegistryConfig, tls: ureq::tls::TlsConfig) -> Self {
        let agent = |redirects: u32| -> ureq::Agent {
            ureq::Agent::config_builder()
                .http_status_as_error(false)
                .timeout_connect(Some(config.connect_timeout))
                .timeout_recv_response(Some(config.read_timeout))
                .timeout_recv_body(Some(config.read_timeout))
                .timeout_send_body(Some(config.read_timeout))
                .max_redirects(redirects)
                .user_agent(concat!("strata/", env!("CARGO_PKG_VERSION")))
                .max_idle_connections_per_host(16)
                .tls_config(tls.clone())
                .build()
                .into()
        };
        Agents {
            follow: agent(MAX_REDIRECTS),
            manual: agent(0),
        }
    }
}

impl Registry {
    pub fn new(config: RegistryConfig, creds: CredentialStore) -> Self {
        let system_roots = tls::system_roots();
        let agents = Agents::new(&config, tls::default_config(system_roots.as_ref()));
        Registry {
            agents,
            tls_agents: Mutex::new(HashMap::new()),
            system_roots,
            config,
            creds,
            tokens: Mutex::new(HashMap::new()),
            endpoint_cache: Mutex::new(HashMap::new()),
            redirects: Mutex::new(HashMap::new()),
            range_latency_us: std::sync::atomic::AtomicU64::new(0),
            range_reads: std::sync::atomic::AtomicU64::new(0),
            range_ns_per_kib: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// The agents for an endpoint's TLS settings.
    fn agents_for(&self, ep: &Endpoint) -> Result<Agents> {
        if ep.tls.is_default() || !ep.base.starts_with("https://") {
            return Ok(self.agents.clone());
        }
        let mut map = self.tls_agents.lock();
        if let Some(a) = map.get(&ep.tls) {
            return Ok(a.clone());
        }
        let config = tls::config(&ep.tls, self.system_roots.as_ref()).map_err(|reason| {
            RegistryError::TlsSettings {
                authority: ep.authority.clone(),
                reason,
            }
        })?;
        if ep.tls.skip_verify {
            tracing::warn!(
                endpoint = %ep.base,
                "skip_verify: the server's TLS certificate is not verified"
            );
        }
        let agents = Agents::new(&self.config, config);
        map.insert(ep.tls.clone(), agents.clone());
        Ok(agents)
    }

    /// Where requests to `ep` for the image `r` go.
    fn at(&self, ep: &Endpoint, r: &Reference) -> Result<At> {
        Ok(At {
            agents: self.agents_for(ep)?,
            host: Self::auth_host(ep, r),
            registry: r.registry.clone(),
        })
    }

    /// The base URL of a registry host's API.
    pub fn base_url(&self, host: &str) -> String {
        let api_host = if host == "docker.io" {
            "registry-1.docker.io"
        } else {
            host
        };
        let insecure = is_loopback(host) || self.config.insecure_hosts.iter().any(|h| h == host);
        format!("{}://{api_host}", if insecure { "http" } else { "https" })
    }

    /// Every endpoint of `host` from hosts.toml (read once per host), the server last.
    fn all_endpoints(&self, host: &str) -> Vec<Endpoint> {
        if let Some(e) = self.endpoint_cache.lock().get(host) {
            return e.clone();
        }
        let all = hosts::endpoints(self.config.hosts_dir.as_deref(), host, &self.base_url(host));
        self.endpoint_cache
            .lock()
            .insert(host.to_string(), all.clone());
        all
    }

    /// Where to send requests for `host`: mirrors from hosts.toml, then the server.
    pub fn endpoints(&self, host: &str, push: bool) -> Vec<Endpoint> {
        let all = self.all_endpoints(host);
        let chosen: Vec<Endpoint> = all
            .iter()
            .filter(|e| if push { e.push } else { e.pull })
            .cloned()
            .collect();
        if chosen.is_empty() {
            all.into_iter().filter(|e| e.server).collect()
        } else {
            chosen
        }
    }

    fn url(ep: &Endpoint, r: &Reference, path: &str) -> String {
        format!("{}/{}/{path}", ep.base, r.repository)
    }

    /// The host credentials and tokens are kept under for an endpoint.
    fn auth_host(ep: &Endpoint, r: &Reference) -> String {
        if ep.server {
            r.registry.clone()
        } else {
            ep.authority.clone()
        }
    }

    /// Tries a pull-side operation on each endpoint in turn (mirrors first).
    fn on_pull_endpoints<T>(
        &self,
        r: &Reference,
        mut f: impl FnMut(&Endpoint) -> Result<T>,
    ) -> Result<T> {
        let eps = self.endpoints(&r.registry, false);
        let mut last = None;
        for ep in &eps {
            match f(ep) {
                Ok(v) => return Ok(v),
                Err(e @ RegistryError::DigestMismatch { .. }) => return Err(e),
                Err(e) => {
                    if eps.len() > 1 {
                        tracing::debug!(endpoint = %ep.base, "trying the next endpoint after: {e}");
                    }
                    last = Some(e);
                }
            }
        }
        Err(last
            .unwrap_or_else(|| RegistryError::Invalid(format!("no endpoint for {}", r.registry))))
    }

    fn push_endpoint(&self, r: &Reference) -> Result<Endpoint> {
        self.endpoints(&r.registry, true)
            .into_iter()
            .next()
            .ok_or_else(|| RegistryError::Invalid(format!("no push endpoint for {}", r.registry)))
    }

    /// Checks that the registry answers and the credentials (if any) are accepted (at its
    /// server, as hosts.toml names it).
    pub fn ping(&self, host: &str) -> Result<()> {
        let ep = self
            .all_endpoints(host)
            .into_iter()
            .find(|e| e.server)
            .ok_or_else(|| RegistryError::Invalid(format!("no endpoint for {host}")))?;
        let at = At {
            agents: self.agents_for(&ep)?,
            host: host.to_string(),
            registry: host.to_string(),
        };
        let url = format!("{}/", ep.base);
        let mut resp = self.send("GET", &url, &at, "", &[], Body::None)?;
        if resp.status().is_success() {
            Ok(())
        } else {
            Err(status_error("GET", &url, &mut resp))
        }
    }
}
