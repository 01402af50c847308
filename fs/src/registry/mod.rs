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
pub mod hosts;
mod tls;

use std::collections::HashMap;
use std::io::Read;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use ureq::http::{Response, StatusCode};

use crate::blob::BlobSource;
use crate::format::Sha256Digest;
use crate::oci::{self, Index, Manifest};
use crate::reference::Reference;
use auth::{parse_challenge, Challenge, Credential, CredentialStore};
use hosts::{Endpoint, TlsSettings};

/// Media types a manifest request accepts.
const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.manifest.v1+json, \
application/vnd.oci.image.index.v1+json, \
application/vnd.docker.distribution.manifest.v2+json, \
application/vnd.docker.distribution.manifest.list.v2+json";

/// Largest manifest or config accepted.
const MAX_METADATA: u64 = 16 << 20;

/// How long the URL a blob's range read was redirected to is reused.
const REDIRECT_TTL: Duration = Duration::from_secs(300);

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

/// The resolved manifest of an image.
#[derive(Clone, Debug)]
pub struct Resolved {
    pub digest: String,
    pub media_type: String,
    pub bytes: Vec<u8>,
    pub manifest: Manifest,
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

enum Body<'a> {
    None,
    Bytes(&'a [u8]),
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

    /// Sends a request with auth and retries; returns the final response (any status).
    fn send(
        &self,
        method: &'static str,
        url: &str,
        at: &At,
        scope: &str,
        headers: &[(&str, String)],
        body: Body<'_>,
    ) -> Result<Response<ureq::Body>> {
        self.send_attempts(
            method,
            url,
            at,
            scope,
            headers,
            body,
            self.config.attempts,
            true,
        )
    }

    /// Sends a request, answering one 401 by authenticating (again: a token that expired is
    /// replaced once) and retrying transport errors, 5xx and 429 up to `attempts` times. With
    /// `follow` false, redirects are returned rather than followed.
    #[allow(clippy::too_many_arguments)]
    fn send_attempts(
        &self,
        method: &'static str,
        url: &str,
        at: &At,
        scope: &str,
        headers: &[(&str, String)],
        body: Body<'_>,
        attempts: u32,
        follow: bool,
    ) -> Result<Response<ureq::Body>> {
        let host = at.host.as_str();
        let key = format!("{host} {scope}");
        let agent = if follow {
            &at.agents.follow
        } else {
            &at.agents.manual
        };
        let mut authed_once = false;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let auth = self.tokens.lock().get(&key).cloned();
            let result = self.send_once(agent, at, method, url, headers, auth.as_deref(), &body);
            let retry = match &result {
                Ok(resp) => {
                    let s = resp.status();
                    if s == StatusCode::UNAUTHORIZED && !authed_once {
                        authed_once = true;
                        let challenge = resp
                            .headers()
                            .get("www-authenticate")
                            .and_then(|v| v.to_str().ok())
                            .and_then(parse_challenge);
                        let header = self.authorize(at, scope, challenge)?;
                        self.tokens.lock().insert(key.clone(), header);
                        attempt -= 1;
                        continue;
                    }
                    if s == StatusCode::UNAUTHORIZED {
                        // Forget what was refused: the next request authenticates afresh.
                        self.tokens.lock().remove(&key);
                        return Err(RegistryError::Unauthorized {
                            host: host.to_string(),
                        });
                    }
                    s.is_server_error() || s == StatusCode::TOO_MANY_REQUESTS
                }
                Err(e) => retryable(e),
            };
            if !retry || attempt >= attempts {
                return result;
            }
            let delay = self.config.backoff * 2u32.pow(attempt - 1);
            tracing::debug!(url, attempt, "retrying in {delay:?}");
            std::thread::sleep(delay);
        }
    }

    /// Where the hosts.toml of `registry` is (for error messages).
    fn hosts_toml(&self, registry: &str) -> String {
        match &self.config.hosts_dir {
            Some(d) => format!("{}/{registry}/hosts.toml", d.display()),
            None => format!("DIR/{registry}/hosts.toml (with --hosts-dir DIR)"),
        }
    }

    /// A transport error, explained when it is about certificates.
    fn transport_error(
        &self,
        at: &At,
        method: &'static str,
        url: &str,
        e: ureq::Error,
    ) -> RegistryError {
        let reason = e.to_string();
        let tls_reason = || reason.trim_start_matches("io: ").to_string();
        match tls::classify(&e) {
            Some(tls::Failure::Untrusted) => RegistryError::UntrustedCertificate {
                url: url.to_string(),
                authority: hosts::authority_of(url),
                reason: tls_reason(),
                hosts_toml: self.hosts_toml(&at.registry),
            },
            Some(tls::Failure::ClientCert) => RegistryError::ClientCertificate {
                url: url.to_string(),
                authority: hosts::authority_of(url),
                reason: tls_reason(),
                hosts_toml: self.hosts_toml(&at.registry),
            },
            None => RegistryError::Transport {
                method,
                url: url.to_string(),
                reason,
            },
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn send_once(
        &self,
        agent: &ureq::Agent,
        at: &At,
        method: &'static str,
        url: &str,
        headers: &[(&str, String)],
        auth: Option<&str>,
        body: &Body<'_>,
    ) -> Result<Response<ureq::Body>> {
        let transport = |e: ureq::Error| self.transport_error(at, method, url, e);
        macro_rules! with_headers {
            ($b:expr) => {{
                let mut b = $b;
                for (k, v) in headers {
                    b = b.header(*k, v.as_str());
                }
                if let Some(a) = auth {
                    b = b.header("Authorization", a);
                }
                b
            }};
        }
        match (method, body) {
            ("GET", _) => with_headers!(agent.get(url)).call().map_err(transport),
            ("HEAD", _) => with_headers!(agent.head(url)).call().map_err(transport),
            ("DELETE", _) => with_headers!(agent.delete(url)).call().map_err(transport),
            ("POST", Body::None) => with_headers!(agent.post(url))
                .send_empty()
                .map_err(transport),
            ("POST", Body::Bytes(b)) => with_headers!(agent.post(url)).send(*b).map_err(transport),
            ("PUT", Body::None) => with_headers!(agent.put(url))
                .send_empty()
                .map_err(transport),
            ("PUT", Body::Bytes(b)) => with_headers!(agent.put(url)).send(*b).map_err(transport),
            ("PATCH", Body::None) => with_headers!(agent.patch(url))
                .send_empty()
                .map_err(transport),
            ("PATCH", Body::Bytes(b)) => {
                with_headers!(agent.patch(url)).send(*b).map_err(transport)
            }
            _ => Err(RegistryError::Invalid(format!(
                "unsupported method {method}"
            ))),
        }
    }

    /// Answers a 401 challenge: basic credentials, or a bearer token from the realm (asked with
    /// basic credentials, or an OAuth2 refresh-token grant for an identity token).
    fn authorize(&self, at: &At, scope: &str, challenge: Option<Challenge>) -> Result<String> {
        let host = at.host.as_str();
        let cred = self.creds.get(host)?;
        let unauthorized = || RegistryError::Unauthorized {
            host: host.to_string(),
        };
        match challenge {
            Some(Challenge::Basic) | None => cred
                .as_ref()
                .map(Credential::basic_header)
                .ok_or_else(unauthorized),
            Some(Challenge::Bearer {
                realm,
                service,
                scope: offered,
            }) => {
                let scope = if scope.is_empty() {
                    offered.unwrap_or_default()
                } else {
                    scope.to_string()
                };
                let agent = &at.agents.follow;
                let (url, resp) = match cred.as_ref().filter(|c| c.is_identity_token()) {
                    Some(c) => {
                        // Docker's OAuth2 flow for identity tokens.
                        let mut form = vec![
                            ("grant_type", "refresh_token".to_string()),
                            ("client_id", "strata".to_string()),
                            ("refresh_token", c.password.clone()),
                        ];
                        if let Some(s) = &service {
                            form.push(("service", s.clone()));
                        }
                        if !scope.is_empty() {
                            form.push(("scope", scope.clone()));
                        }
                        let body = form
                            .iter()
                            .map(|(k, v)| format!("{k}={}", encode(v)))
                            .collect::<Vec<_>>()
                            .join("&");
                        let resp = agent
                            .post(&realm)
                            .header("Content-Type", "application/x-www-form-urlencoded")
                            .send(body.as_bytes());
                        (realm.clone(), resp)
                    }
                    None => {
                        let mut url = realm.clone();
                        let mut sep = if url.contains('?') { '&' } else { '?' };
                        if let Some(s) = &service {
                            url.push_str(&format!("{sep}service={}", encode(s)));
                            sep = '&';
                        }
                        // Several scopes are several `scope` parameters.
                        for s in scope.split_whitespace() {
                            url.push_str(&format!("{sep}scope={}", encode(s)));
                            sep = '&';
                        }
                        let mut req = agent.get(&url);
                        if let Some(c) = &cred {
                            req = req.header("Authorization", c.basic_header());
                        }
                        let resp = req.call();
                        (url, resp)
                    }
                };
                let mut resp = resp.map_err(|e| self.transport_error(at, "GET", &url, e))?;
                if !resp.status().is_success() {
                    return Err(if resp.status() == StatusCode::UNAUTHORIZED {
                        unauthorized()
                    } else {
                        status_error("GET", &url, &mut resp)
                    });
                }
                let body = resp
                    .body_mut()
                    .with_config()
                    .limit(1 << 20)
                    .read_to_vec()
                    .map_err(|e| RegistryError::Invalid(format!("token response: {e}")))?;
                let v: serde_json::Value = serde_json::from_slice(&body)
                    .map_err(|e| RegistryError::Invalid(format!("token response: {e}")))?;
                let token = v
                    .get("token")
                    .or_else(|| v.get("access_token"))
                    .and_then(|t| t.as_str())
                    .ok_or_else(|| RegistryError::Invalid("token response has no token".into()))?;
                Ok(format!("Bearer {token}"))
            }
        }
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

    /// Resolves a reference to a single-platform manifest (`os`/`arch` picked from an index).
    pub fn resolve(&self, r: &Reference, os: &str, arch: &str) -> Result<Resolved> {
        let target = r
            .digest
            .clone()
            .or_else(|| r.tag.clone())
            .unwrap_or_default();
        let mut resolved = self.get_manifest(r, &target, r.digest.as_deref())?;
        for _ in 0..4 {
            if !oci::is_index(&resolved.media_type) {
                return Ok(resolved);
            }
            let index: Index = serde_json::from_slice(&resolved.bytes)
                .map_err(|e| RegistryError::Invalid(format!("image index: {e}")))?;
            let d = oci::select_platform(&index.manifests, os, arch).ok_or_else(|| {
                RegistryError::Invalid(format!("{r} has no manifest for {os}/{arch}"))
            })?;
            let digest = d.digest.clone();
            resolved = self.get_manifest(r, &digest, Some(&digest))?;
        }
        Err(RegistryError::Invalid(format!(
            "{r}: indexes nested too deep"
        )))
    }

    fn get_manifest(&self, r: &Reference, target: &str, expect: Option<&str>) -> Result<Resolved> {
        self.on_pull_endpoints(r, |ep| self.get_manifest_at(ep, r, target, expect))
    }

    fn get_manifest_at(
        &self,
        ep: &Endpoint,
        r: &Reference,
        target: &str,
        expect: Option<&str>,
    ) -> Result<Resolved> {
        let url = Self::url(ep, r, &format!("manifests/{target}"));
        let scope = format!("repository:{}:pull", r.repository);
        let at = self.at(ep, r)?;
        let mut resp = self.send(
            "GET",
            &url,
            &at,
            &scope,
            &[("Accept", MANIFEST_ACCEPT.to_string())],
            Body::None,
        )?;
        if !resp.status().is_success() {
            return Err(status_error("GET", &url, &mut resp));
        }
        let header_digest = resp
            .headers()
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let content_type = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .map(|s| s.split(';').next().unwrap_or("").trim().to_string());
        let bytes = resp
            .body_mut()
            .with_config()
            .limit(MAX_METADATA)
            .read_to_vec()
            .map_err(|e| transport_err("GET", &url, e))?;
        let digest = Sha256Digest::of(&bytes).oci();
        if let Some(want) = expect.map(str::to_string).or(header_digest) {
            if want.starts_with("sha256:") && want != digest {
                return Err(RegistryError::DigestMismatch {
                    what: format!("manifest {target}"),
                    expected: want,
                    actual: digest,
                });
            }
        }
        let v: serde_json::Value = serde_json::from_slice(&bytes)
            .map_err(|e| RegistryError::Invalid(format!("manifest {target}: {e}")))?;
        let media_type = v
            .get("mediaType")
            .and_then(|m| m.as_str())
            .map(str::to_string)
            .or(content_type)
            .unwrap_or_else(|| oci::MEDIA_TYPE_MANIFEST.to_string());
        let manifest = if oci::is_index(&media_type) || v.get("manifests").is_some() {
            let media_type = if oci::is_index(&media_type) {
                media_type
            } else {
                oci::MEDIA_TYPE_INDEX.to_string()
            };
            return Ok(Resolved {
                digest,
                media_type,
                bytes,
                manifest: Manifest {
                    schema_version: 2,
                    media_type: None,
                    config: oci::Descriptor::new("", String::new(), 0),
                    layers: Vec::new(),
                    annotations: Default::default(),
                    extra: Default::default(),
                },
            });
        } else {
            serde_json::from_value(v)
                .map_err(|e| RegistryError::Invalid(format!("manifest {target}: {e}")))?
        };
        Ok(Resolved {
            digest,
            media_type,
            bytes,
            manifest,
        })
    }

    /// Fetches a whole (small) blob and verifies it.
    pub fn get_blob(&self, r: &Reference, digest: &str, max: u64) -> Result<Vec<u8>> {
        self.on_pull_endpoints(r, |ep| self.get_blob_at(ep, r, digest, max))
    }

    fn get_blob_at(&self, ep: &Endpoint, r: &Reference, digest: &str, max: u64) -> Result<Vec<u8>> {
        let url = Self::url(ep, r, &format!("blobs/{digest}"));
        let scope = format!("repository:{}:pull", r.repository);
        let at = self.at(ep, r)?;
        let mut resp = self.send("GET", &url, &at, &scope, &[], Body::None)?;
        if !resp.status().is_success() {
            return Err(status_error("GET", &url, &mut resp));
        }
        let bytes = resp
            .body_mut()
            .with_config()
            .limit(max)
            .read_to_vec()
            .map_err(|e| transport_err("GET", &url, e))?;
        let actual = Sha256Digest::of(&bytes).oci();
        if actual != digest {
            return Err(RegistryError::DigestMismatch {
                what: format!("blob from {url}"),
                expected: digest.to_string(),
                actual,
            });
        }
        Ok(bytes)
    }

    /// Opens a blob for streaming (the caller verifies its digest).
    pub fn open_blob(&self, r: &Reference, digest: &str) -> Result<Box<dyn Read + Send>> {
        self.on_pull_endpoints(r, |ep| self.open_blob_at(ep, r, digest))
    }

    fn open_blob_at(
        &self,
        ep: &Endpoint,
        r: &Reference,
        digest: &str,
    ) -> Result<Box<dyn Read + Send>> {
        let url = Self::url(ep, r, &format!("blobs/{digest}"));
        let scope = format!("repository:{}:pull", r.repository);
        let at = self.at(ep, r)?;
        let mut resp = self.send("GET", &url, &at, &scope, &[], Body::None)?;
        if !resp.status().is_success() {
            return Err(status_error("GET", &url, &mut resp));
        }
        Ok(Box::new(resp.into_body().into_reader()))
    }

    /// Fetches `len` bytes at `offset` of a blob with an HTTP range request.
    pub fn get_range(&self, r: &Reference, digest: &str, offset: u64, len: u64) -> Result<Vec<u8>> {
        self.on_pull_endpoints(r, |ep| self.get_range_at(ep, r, digest, offset, len))
    }

    fn get_range_at(
        &self,
        ep: &Endpoint,
        r: &Reference,
        digest: &str,
        offset: u64,
        len: u64,
    ) -> Result<Vec<u8>> {
        if len == 0 {
            return Ok(Vec::new());
        }
        let url = Self::url(ep, r, &format!("blobs/{digest}"));
        let scope = format!("repository:{}:pull", r.repository);
        let at = self.at(ep, r)?;
        let headers = [("Range", format!("bytes={offset}-{}", offset + len - 1))];
        // This loop owns the retries: a failure can come from the request or from a body cut
        // short, and each attempt is one request.
        let attempts = self.config.attempts.max(1);
        let mut last = None;
        for attempt in 1..=attempts {
            match self.range_once(&at, &url, &scope, &headers, offset, len) {
                Ok(b) => return Ok(b),
                Err(e) if attempt < attempts && retryable(&e) => {
                    tracing::debug!("range read failed, retrying: {e}");
                    std::thread::sleep(self.config.backoff * 2u32.pow(attempt - 1));
                    last = Some(e);
                }
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| RegistryError::Invalid("range read failed".into())))
    }

    /// One range read of the blob at `url`: from where the registry last redirected it if that
    /// was recent (without the registry's credentials), else from the registry, following and
    /// remembering its redirects by hand.
    fn range_once(
        &self,
        at: &At,
        url: &str,
        scope: &str,
        headers: &[(&str, String)],
        offset: u64,
        len: u64,
    ) -> Result<Vec<u8>> {
        let cached = self
            .redirects
            .lock()
            .get(url)
            .filter(|(_, when)| when.elapsed() < REDIRECT_TTL)
            .map(|(target, _)| target.clone());
        if let Some(target) = cached {
            let resp = self.send_once(
                &at.agents.manual,
                at,
                "GET",
                &target,
                headers,
                None,
                &Body::None,
            );
            match resp {
                Ok(resp)
                    if resp.status() == StatusCode::PARTIAL_CONTENT
                        || resp.status() == StatusCode::OK =>
                {
                    return read_range_body(resp, &target, offset, len);
                }
                Ok(resp) => {
                    // Expired or revoked (401/403/404…): ask the registry again.
                    tracing::debug!(
                        url,
                        status = resp.status().as_u16(),
                        "the redirected blob URL no longer answers; resolving it again"
                    );
                    self.redirects.lock().remove(url);
                }
                Err(e) => {
                    self.redirects.lock().remove(url);
                    return Err(e);
                }
            }
        }
        let mut resp = self.send_attempts("GET", url, at, scope, headers, Body::None, 1, false)?;
        let mut current = url.to_string();
        let mut hops = 0;
        while matches!(resp.status().as_u16(), 301 | 302 | 303 | 307 | 308) {
            hops += 1;
            if hops > MAX_REDIRECTS {
                return Err(RegistryError::Invalid(format!(
                    "GET {url}: more than {MAX_REDIRECTS} redirects"
                )));
            }
            let loc = location(&resp).ok_or_else(|| {
                RegistryError::Invalid(format!("GET {current}: redirect without a Location"))
            })?;
            current = join_url(&current, &loc);
            // Never the registry's Authorization: the target is object storage or a CDN, and
            // the redirect URL carries its own authorization.
            resp = self.send_once(
                &at.agents.manual,
                at,
                "GET",
                &current,
                headers,
                None,
                &Body::None,
            )?;
        }
        if current != url
            && (resp.status() == StatusCode::PARTIAL_CONTENT || resp.status() == StatusCode::OK)
        {
            let mut redirects = self.redirects.lock();
            redirects.retain(|_, (_, when)| when.elapsed() < REDIRECT_TTL);
            redirects.insert(url.to_string(), (current.clone(), Instant::now()));
        }
        read_range_body(resp, &current, offset, len)
    }

    /// The size of a blob if the repository has it.
    pub fn blob_size(&self, r: &Reference, digest: &str) -> Result<Option<u64>> {
        self.on_pull_endpoints(r, |ep| self.blob_size_at(ep, r, digest))
    }

    fn blob_size_at(&self, ep: &Endpoint, r: &Reference, digest: &str) -> Result<Option<u64>> {
        let url = Self::url(ep, r, &format!("blobs/{digest}"));
        let scope = format!("repository:{}:pull", r.repository);
        let at = self.at(ep, r)?;
        let mut resp = self.send("HEAD", &url, &at, &scope, &[], Body::None)?;
        match resp.status() {
            s if s.is_success() => Ok(resp
                .headers()
                .get("content-length")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok())),
            StatusCode::NOT_FOUND => Ok(None),
            _ => Err(status_error("HEAD", &url, &mut resp)),
        }
    }

    /// Asks the registry to mount a blob from another repository; true if it did.
    pub fn mount_blob(&self, r: &Reference, digest: &str, from: &str) -> Result<bool> {
        let ep = self.push_endpoint(r)?;
        let url = Self::url(
            &ep,
            r,
            &format!("blobs/uploads/?mount={digest}&from={}", encode(from)),
        );
        let scope = format!(
            "repository:{}:pull,push repository:{from}:pull",
            r.repository
        );
        let at = self.at(&ep, r)?;
        let mut resp = self.send("POST", &url, &at, &scope, &[], Body::None)?;
        match resp.status() {
            StatusCode::CREATED => Ok(true),
            StatusCode::ACCEPTED => {
                // Not mounted; an upload session was opened instead. Cancel it.
                if let Some(loc) = location(&resp) {
                    let u = Self::absolute(&ep, &loc);
                    let _ = self.send("DELETE", &u, &at, &scope, &[], Body::None);
                }
                Ok(false)
            }
            _ => Err(status_error("POST", &url, &mut resp)),
        }
    }

    fn absolute(ep: &Endpoint, loc: &str) -> String {
        if loc.starts_with("http://") || loc.starts_with("https://") {
            loc.to_string()
        } else {
            format!("{}{loc}", ep.origin())
        }
    }

    /// Uploads a blob in chunks (`POST`, `PATCH`…, `PUT ?digest=`), reading it from `data`.
    pub fn upload_blob(
        &self,
        r: &Reference,
        digest: &str,
        data: &mut dyn Read,
        chunk: usize,
        progress: &mut dyn FnMut(u64),
    ) -> Result<()> {
        let ep = self.push_endpoint(r)?;
        let scope = format!("repository:{}:pull,push", r.repository);
        let at = self.at(&ep, r)?;
        let url = Self::url(&ep, r, "blobs/uploads/");
        let mut resp = self.send("POST", &url, &at, &scope, &[], Body::None)?;
        if resp.status() != StatusCode::ACCEPTED {
            return Err(status_error("POST", &url, &mut resp));
        }
        let mut loc = location(&resp)
            .map(|l| Self::absolute(&ep, &l))
            .ok_or_else(|| RegistryError::Invalid("upload without Location".into()))?;
        let mut buf = vec![0u8; chunk.max(1)];
        let mut sent = 0u64;
        loop {
            let n = read_full(data, &mut buf).map_err(|e| io_err("PATCH", &loc, e))?;
            if n == 0 {
                break;
            }
            let headers = [
                ("Content-Type", "application/octet-stream".to_string()),
                ("Content-Range", format!("{sent}-{}", sent + n as u64 - 1)),
            ];
            let mut resp =
                self.send("PATCH", &loc, &at, &scope, &headers, Body::Bytes(&buf[..n]))?;
            if resp.status() != StatusCode::ACCEPTED {
                return Err(status_error("PATCH", &loc, &mut resp));
            }
            loc = location(&resp).map_or(loc, |l| Self::absolute(&ep, &l));
            sent += n as u64;
            progress(sent);
        }
        let sep = if loc.contains('?') { '&' } else { '?' };
        let put = format!("{loc}{sep}digest={}", encode(digest));
        let mut resp = self.send(
            "PUT",
            &put,
            &at,
            &scope,
            &[("Content-Type", "application/octet-stream".to_string())],
            Body::None,
        )?;
        if resp.status() != StatusCode::CREATED {
            return Err(status_error("PUT", &put, &mut resp));
        }
        Ok(())
    }

    /// Uploads a manifest under `tag_or_digest`.
    pub fn put_manifest(
        &self,
        r: &Reference,
        tag_or_digest: &str,
        media_type: &str,
        bytes: &[u8],
    ) -> Result<()> {
        let ep = self.push_endpoint(r)?;
        let url = Self::url(&ep, r, &format!("manifests/{tag_or_digest}"));
        let scope = format!("repository:{}:pull,push", r.repository);
        let at = self.at(&ep, r)?;
        let mut resp = self.send(
            "PUT",
            &url,
            &at,
            &scope,
            &[("Content-Type", media_type.to_string())],
            Body::Bytes(bytes),
        )?;
        if resp.status() != StatusCode::CREATED && !resp.status().is_success() {
            return Err(status_error("PUT", &url, &mut resp));
        }
        Ok(())
    }
}

/// Reads `len` bytes at `offset` from the answer to a range request (a 200 is skipped into).
fn read_range_body(
    mut resp: Response<ureq::Body>,
    url: &str,
    offset: u64,
    len: u64,
) -> Result<Vec<u8>> {
    let status = resp.status();
    let mut reader = resp.body_mut().with_config().limit(u64::MAX).reader();
    let mut buf = vec![0u8; len as usize];
    match status {
        StatusCode::PARTIAL_CONTENT => {}
        StatusCode::OK => {
            // A server that ignores Range: skip to the offset.
            std::io::copy(&mut (&mut reader).take(offset), &mut std::io::sink())
                .map_err(|e| io_err("GET", url, e))?;
        }
        _ => {
            drop(reader);
            return Err(status_error("GET", url, &mut resp));
        }
    }
    reader
        .read_exact(&mut buf)
        .map_err(|e| io_err("GET", url, e))?;
    // Read to the end so the connection goes back to the pool for the next range.
    let _ = std::io::copy(&mut reader.take(64 << 10), &mut std::io::sink());
    Ok(buf)
}

/// `loc` (a `Location` header) made absolute against the URL it answered.
fn join_url(base: &str, loc: &str) -> String {
    if loc.starts_with("http://") || loc.starts_with("https://") {
        return loc.to_string();
    }
    let scheme = base.split_once("://").map_or("https", |(s, _)| s);
    if let Some(rest) = loc.strip_prefix("//") {
        return format!("{scheme}://{rest}");
    }
    let origin = format!("{scheme}://{}", hosts::authority_of(base));
    if loc.starts_with('/') {
        return format!("{origin}{loc}");
    }
    let path = base
        .split_once("://")
        .map_or(base, |(_, r)| r)
        .split(['?', '#'])
        .next()
        .unwrap_or("");
    let dir = path.find('/').map_or("/", |i| {
        let p = &path[i..];
        &p[..p.rfind('/').map_or(1, |j| j + 1)]
    });
    format!("{origin}{dir}{loc}")
}

/// Errors worth another attempt: transport failures (including bodies cut short), 5xx, 429.
fn retryable(e: &RegistryError) -> bool {
    match e {
        RegistryError::Transport { .. } => true,
        RegistryError::Status { status, .. } => *status >= 500 || *status == 429,
        _ => false,
    }
}

fn location(resp: &Response<ureq::Body>) -> Option<String> {
    resp.headers()
        .get("location")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

fn read_full(r: &mut dyn Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// Percent-encodes a query value.
fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn status_error(method: &'static str, url: &str, resp: &mut Response<ureq::Body>) -> RegistryError {
    let status = resp.status().as_u16();
    let body = resp
        .body_mut()
        .with_config()
        .limit(4096)
        .lossy_utf8(true)
        .read_to_string()
        .unwrap_or_default();
    let detail = serde_json::from_str::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| {
            v.get("errors")?.as_array()?.first().map(|e| {
                format!(
                    " {}: {}",
                    e.get("code").and_then(|c| c.as_str()).unwrap_or(""),
                    e.get("message").and_then(|c| c.as_str()).unwrap_or("")
                )
            })
        })
        .unwrap_or_default();
    RegistryError::Status {
        method,
        url: url.to_string(),
        status,
        detail,
    }
}

fn transport_err(method: &'static str, url: &str, e: ureq::Error) -> RegistryError {
    RegistryError::Transport {
        method,
        url: url.to_string(),
        reason: e.to_string(),
    }
}

fn io_err(method: &'static str, url: &str, e: std::io::Error) -> RegistryError {
    RegistryError::Transport {
        method,
        url: url.to_string(),
        reason: e.to_string(),
    }
}

/// A layer blob in a registry, read by range.
pub struct RegistryBlob {
    registry: Arc<Registry>,
    reference: Reference,
    digest: String,
    size: u64,
}

impl RegistryBlob {
    pub fn new(registry: Arc<Registry>, reference: Reference, digest: String, size: u64) -> Self {
        RegistryBlob {
            registry,
            reference,
            digest,
            size,
        }
    }
}

impl BlobSource for RegistryBlob {
    fn size(&self) -> u64 {
        self.size
    }
    fn read_range(&self, offset: u64, len: u64) -> std::io::Result<Vec<u8>> {
        if offset.checked_add(len).is_none_or(|e| e > self.size) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!(
                    "range {offset}+{len} is past the end of a {}-byte blob",
                    self.size
                ),
            ));
        }
        self.registry
            .get_range(&self.reference, &self.digest, offset, len)
            .map_err(std::io::Error::other)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader, Write};
    use std::net::TcpListener;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    /// A request as the test server saw it (header names in lower case).
    #[derive(Clone, Debug)]
    struct Req {
        method: String,
        path: String,
        headers: HashMap<String, String>,
        body: String,
    }

    struct Resp {
        status: u16,
        headers: Vec<(&'static str, String)>,
        body: Vec<u8>,
    }

    fn resp(status: u16, headers: Vec<(&'static str, String)>, body: &[u8]) -> Resp {
        Resp {
            status,
            headers,
            body: body.to_vec(),
        }
    }

    type Log = Arc<Mutex<Vec<Req>>>;

    /// A tiny HTTP/1.1 server on a loopback port: one request per connection, answered by
    /// `handler`; every request is logged.
    fn serve(handler: impl Fn(&Req) -> Resp + Send + Sync + 'static) -> (String, Log) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let log: Log = Arc::default();
        let handler = Arc::new(handler);
        let l = log.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let handler = handler.clone();
                let log = l.clone();
                std::thread::spawn(move || {
                    let mut reader = BufReader::new(stream.try_clone().unwrap());
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 {
                        return;
                    }
                    let mut parts = line.split_whitespace();
                    let method = parts.next().unwrap_or("").to_string();
                    let path = parts.next().unwrap_or("").to_string();
                    let mut headers = HashMap::new();
                    loop {
                        let mut h = String::new();
                        if reader.read_line(&mut h).unwrap_or(0) == 0 || h.trim().is_empty() {
                            break;
                        }
                        if let Some((k, v)) = h.split_once(':') {
                            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
                        }
                    }
                    let n: usize = headers
                        .get("content-length")
                        .and_then(|v| v.parse().ok())
                        .unwrap_or(0);
                    let mut body = vec![0; n];
                    let _ = reader.read_exact(&mut body);
                    let req = Req {
                        method,
                        path,
                        headers,
                        body: String::from_utf8_lossy(&body).into_owned(),
                    };
                    log.lock().push(req.clone());
                    let r = handler(&req);
                    let mut out = format!("HTTP/1.1 {} X\r\nConnection: close\r\n", r.status);
                    for (k, v) in &r.headers {
                        out.push_str(&format!("{k}: {v}\r\n"));
                    }
                    if !r.headers.iter().any(|(k, _)| *k == "Content-Length") {
                        out.push_str(&format!("Content-Length: {}\r\n", r.body.len()));
                    }
                    out.push_str("\r\n");
                    let _ = stream.write_all(out.as_bytes());
                    if req.method != "HEAD" {
                        let _ = stream.write_all(&r.body);
                    }
                });
            }
        });
        (addr, log)
    }

    fn client(creds: CredentialStore) -> Registry {
        Registry::new(
            RegistryConfig {
                attempts: 1,
                backoff: Duration::from_millis(1),
                ..RegistryConfig::default()
            },
            creds,
        )
    }

    fn count(log: &Log, f: impl Fn(&Req) -> bool) -> usize {
        log.lock().iter().filter(|r| f(r)).count()
    }

    #[test]
    fn range_reads_reuse_the_redirect_target_without_credentials() {
        let data: Arc<Vec<u8>> = Arc::new((0..8192u32).map(|i| (i % 251) as u8).collect());
        let forbid = Arc::new(AtomicBool::new(false));
        let (obj_addr, obj_log) = {
            let data = data.clone();
            let forbid = forbid.clone();
            serve(move |req| {
                if req.headers.contains_key("authorization") {
                    return resp(400, vec![], b"credentials leaked to the object store");
                }
                if forbid.swap(false, Ordering::SeqCst) {
                    return resp(403, vec![], b"expired");
                }
                let Some(range) = req.headers.get("range") else {
                    return resp(200, vec![], &data);
                };
                let (a, b) = range
                    .trim_start_matches("bytes=")
                    .split_once('-')
                    .map(|(a, b)| (a.parse::<usize>().unwrap(), b.parse::<usize>().unwrap()))
                    .unwrap();
                resp(
                    206,
                    vec![("Content-Range", format!("bytes {a}-{b}/{}", data.len()))],
                    &data[a..=b],
                )
            })
        };
        let signed = Arc::new(AtomicUsize::new(0));
        let (reg_addr, reg_log) = {
            let signed = signed.clone();
            serve(move |req| {
                if req.headers.get("authorization").map(String::as_str) != Some("Basic dTpw") {
                    return resp(
                        401,
                        vec![("WWW-Authenticate", "Basic realm=\"t\"".into())],
                        b"",
                    );
                }
                let n = signed.fetch_add(1, Ordering::SeqCst);
                resp(
                    307,
                    vec![("Location", format!("http://{obj_addr}/bucket/blob?sig={n}"))],
                    b"",
                )
            })
        };
        let mut creds = CredentialStore::default();
        creds.insert(
            &reg_addr,
            Credential {
                username: "u".into(),
                password: "p".into(),
            },
        );
        let registry = client(creds);
        let r = Reference::parse(&format!("{reg_addr}/test/repo:v1")).unwrap();
        let digest = "sha256:0000";
        assert_eq!(
            registry.get_range(&r, digest, 10, 100).unwrap(),
            data[10..110]
        );
        assert_eq!(
            registry.get_range(&r, digest, 1000, 50).unwrap(),
            data[1000..1050]
        );
        assert_eq!(
            registry.get_range(&r, digest, 4000, 1).unwrap(),
            data[4000..4001]
        );
        // One 401 and one redirect from the registry; every range from the object store.
        assert_eq!(reg_log.lock().len(), 2);
        assert_eq!(count(&obj_log, |q| q.path == "/bucket/blob?sig=0"), 3);

        // The signed URL expires: the registry is asked again (credentials already known).
        forbid.store(true, Ordering::SeqCst);
        assert_eq!(
            registry.get_range(&r, digest, 2000, 10).unwrap(),
            data[2000..2010]
        );
        assert_eq!(reg_log.lock().len(), 3);
        assert_eq!(count(&obj_log, |q| q.path == "/bucket/blob?sig=1"), 1);
        assert_eq!(registry.get_range(&r, digest, 0, 8192).unwrap(), *data);
        assert_eq!(reg_log.lock().len(), 3);
        assert_eq!(
            count(&obj_log, |q| q.headers.contains_key("authorization")),
            0
        );

        // Reads of whole blobs follow redirects on their own, without credentials either.
        let mut all = Vec::new();
        registry
            .open_blob(&r, digest)
            .unwrap()
            .read_to_end(&mut all)
            .unwrap();
        assert_eq!(all, *data);
        assert_eq!(
            count(&obj_log, |q| q.headers.contains_key("authorization")),
            0
        );
    }

    #[test]
    fn bearer_tokens_are_reused_per_scope_and_renewed_once_when_refused() {
        let issued = Arc::new(AtomicUsize::new(0));
        // Tokens numbered below this are refused (expired).
        let valid_from = Arc::new(AtomicUsize::new(1));
        let (addr, log) = {
            let issued = issued.clone();
            let valid_from = valid_from.clone();
            let addr = Arc::new(Mutex::new(String::new()));
            let a = addr.clone();
            let (real, log) = serve(move |req| {
                if req.path.starts_with("/token") {
                    let n = issued.fetch_add(1, Ordering::SeqCst) + 1;
                    return resp(200, vec![], format!(r#"{{"token":"t{n}"}}"#).as_bytes());
                }
                let ok = req
                    .headers
                    .get("authorization")
                    .and_then(|h| h.strip_prefix("Bearer t"))
                    .and_then(|n| n.parse::<usize>().ok())
                    .is_some_and(|n| n >= valid_from.load(Ordering::SeqCst));
                if !ok {
                    let challenge = format!(
                        "Bearer realm=\"http://{}/token\",service=\"test\"",
                        a.lock()
                    );
                    return resp(401, vec![("WWW-Authenticate", challenge)], b"");
                }
                resp(200, vec![("Content-Length", "1234".into())], b"")
            });
            *addr.lock() = real.clone();
            (real, log)
        };
        let registry = client(CredentialStore::default());
        let r = Reference::parse(&format!("{addr}/test/repo:v1")).unwrap();
        let tokens = |log: &Log| count(log, |q| q.path.starts_with("/token"));
        assert_eq!(registry.blob_size(&r, "sha256:00").unwrap(), Some(1234));
        assert_eq!(registry.blob_size(&r, "sha256:01").unwrap(), Some(1234));
        assert_eq!(registry.blob_size(&r, "sha256:02").unwrap(), Some(1234));
        assert_eq!(tokens(&log), 1, "one token for one scope");
        assert_eq!(log.lock().len(), 5, "one 401, a token, three answers");
        let token_req = log
            .lock()
            .iter()
            .find(|q| q.path.starts_with("/token"))
            .cloned()
            .unwrap();
        assert!(
            token_req
                .path
                .contains("scope=repository%3Atest%2Frepo%3Apull")
                && token_req.path.contains("service=test"),
            "{}",
            token_req.path
        );

        // The token expires: the next request gets a 401, one new token, and succeeds.
        valid_from.store(2, Ordering::SeqCst);
        assert_eq!(registry.blob_size(&r, "sha256:03").unwrap(), Some(1234));
        assert_eq!(tokens(&log), 2);
        assert_eq!(registry.blob_size(&r, "sha256:04").unwrap(), Some(1234));
        assert_eq!(tokens(&log), 2);

        // A token server whose tokens are refused: one renewal, then a clear error.
        valid_from.store(usize::MAX, Ordering::SeqCst);
        let before = log.lock().len();
        let err = registry.blob_size(&r, "sha256:05").unwrap_err();
        assert!(matches!(err, RegistryError::Unauthorized { .. }), "{err}");
        assert_eq!(tokens(&log), 3);
        assert_eq!(log.lock().len() - before, 3, "401, a token, 401");
    }

    #[test]
    fn identity_tokens_are_exchanged_with_a_refresh_token_grant() {
        let realm = Arc::new(Mutex::new(String::new()));
        let r2 = realm.clone();
        let (addr, log) = serve(move |req| {
            if req.path == "/token" {
                let ok = req.method == "POST"
                    && req.body.contains("grant_type=refresh_token")
                    && req.body.contains("refresh_token=idt%2B1")
                    && req.body.contains("scope=repository%3Atest%2Frepo%3Apull")
                    && req.body.contains("service=svc");
                return if ok {
                    resp(200, vec![], br#"{"access_token":"a1"}"#)
                } else {
                    resp(400, vec![], req.body.as_bytes())
                };
            }
            if req.headers.get("authorization").map(String::as_str) == Some("Bearer a1") {
                return resp(200, vec![("Content-Length", "7".into())], b"");
            }
            let challenge = format!(
                "Bearer realm=\"http://{}/token\",service=\"svc\"",
                r2.lock()
            );
            resp(401, vec![("WWW-Authenticate", challenge)], b"")
        });
        *realm.lock() = addr.clone();
        let mut creds = CredentialStore::default();
        creds.insert(
            &addr,
            Credential {
                username: auth::IDENTITY_TOKEN_USER.into(),
                password: "idt+1".into(),
            },
        );
        let registry = client(creds);
        let r = Reference::parse(&format!("{addr}/test/repo:v1")).unwrap();
        assert_eq!(registry.blob_size(&r, "sha256:00").unwrap(), Some(7));
        let token_reqs = count(&log, |q| q.path == "/token");
        assert_eq!(token_reqs, 1);
        assert!(log
            .lock()
            .iter()
            .all(|q| q.headers.get("authorization").map(String::as_str)
                != Some("Basic PHRva2VuPjppZHQrMQ==")));
    }

    #[test]
    fn location_urls_are_made_absolute() {
        let base = "https://reg.example:5000/v2/a/b/blobs/sha256:1?x=1";
        assert_eq!(join_url(base, "https://cdn/x"), "https://cdn/x");
        assert_eq!(join_url(base, "//cdn/x"), "https://cdn/x");
        assert_eq!(
            join_url(base, "/s3/x?sig=1"),
            "https://reg.example:5000/s3/x?sig=1"
        );
        assert_eq!(
            join_url(base, "other?sig=1"),
            "https://reg.example:5000/v2/a/b/blobs/other?sig=1"
        );
        assert_eq!(join_url("http://h", "x"), "http://h/x");
    }
}
