//! An OCI distribution client: manifests and indexes, blobs and byte ranges of blobs, uploads,
//! with anonymous, basic and bearer-token auth and retries with backoff.
//!
//! It is synchronous on purpose: FUSE requests are served on a pool of threads, and a range read
//! is one blocking request on the thread that needs the bytes (no async runtime in between).

pub mod auth;
pub mod hosts;

use std::collections::HashMap;
use std::io::Read;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use ureq::http::{Response, StatusCode};

use crate::blob::BlobSource;
use crate::format::Sha256Digest;
use crate::oci::{self, Index, Manifest};
use crate::reference::Reference;
use auth::{parse_challenge, Challenge, Credential, CredentialStore};
use hosts::Endpoint;

/// Media types a manifest request accepts.
const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.manifest.v1+json, \
application/vnd.oci.image.index.v1+json, \
application/vnd.docker.distribution.manifest.v2+json, \
application/vnd.docker.distribution.manifest.list.v2+json";

/// Largest manifest or config accepted.
const MAX_METADATA: u64 = 16 << 20;

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
    /// Directory of per-host `hosts.toml` files (mirrors), containerd's `certs.d` layout.
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
    agent: ureq::Agent,
    config: RegistryConfig,
    creds: CredentialStore,
    /// Authorization header per (host, repository, actions).
    tokens: Mutex<HashMap<String, String>>,
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

impl Registry {
    pub fn new(config: RegistryConfig, creds: CredentialStore) -> Self {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(config.connect_timeout))
            .timeout_recv_response(Some(config.read_timeout))
            .timeout_recv_body(Some(config.read_timeout))
            .timeout_send_body(Some(config.read_timeout))
            .max_redirects(5)
            .user_agent(concat!("strata/", env!("CARGO_PKG_VERSION")))
            .max_idle_connections_per_host(16)
            .build()
            .into();
        Registry {
            agent,
            config,
            creds,
            tokens: Mutex::new(HashMap::new()),
        }
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

    /// Where to send requests for `host`: mirrors from hosts.toml, then the server.
    pub fn endpoints(&self, host: &str, push: bool) -> Vec<Endpoint> {
        let all = hosts::endpoints(self.config.hosts_dir.as_deref(), host, &self.base_url(host));
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
        host: &str,
        scope: &str,
        headers: &[(&str, String)],
        body: Body<'_>,
    ) -> Result<Response<ureq::Body>> {
        self.send_attempts(
            method,
            url,
            host,
            scope,
            headers,
            body,
            self.config.attempts,
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn send_attempts(
        &self,
        method: &'static str,
        url: &str,
        host: &str,
        scope: &str,
        headers: &[(&str, String)],
        body: Body<'_>,
        attempts: u32,
    ) -> Result<Response<ureq::Body>> {
        let key = format!("{host} {scope}");
        let mut authed_once = false;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let auth = self.tokens.lock().get(&key).cloned();
            let result = self.send_once(method, url, headers, auth.as_deref(), &body);
            let retryable = match &result {
                Ok(resp) => {
                    let s = resp.status();
                    if s == StatusCode::UNAUTHORIZED && !authed_once {
                        authed_once = true;
                        let challenge = resp
                            .headers()
                            .get("www-authenticate")
                            .and_then(|v| v.to_str().ok())
                            .and_then(parse_challenge);
                        let header = self.authorize(host, scope, challenge)?;
                        self.tokens.lock().insert(key.clone(), header);
                        attempt -= 1;
                        continue;
                    }
                    if s == StatusCode::UNAUTHORIZED {
                        return Err(RegistryError::Unauthorized {
                            host: host.to_string(),
                        });
                    }
                    s.is_server_error() || s == StatusCode::TOO_MANY_REQUESTS
                }
                Err(_) => true,
            };
            if !retryable || attempt >= attempts {
                return result;
            }
            let delay = self.config.backoff * 2u32.pow(attempt - 1);
            tracing::debug!(url, attempt, "retrying in {delay:?}");
            std::thread::sleep(delay);
        }
    }

    fn send_once(
        &self,
        method: &'static str,
        url: &str,
        headers: &[(&str, String)],
        auth: Option<&str>,
        body: &Body<'_>,
    ) -> Result<Response<ureq::Body>> {
        let transport = |e: ureq::Error| RegistryError::Transport {
            method,
            url: url.to_string(),
            reason: e.to_string(),
        };
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
            ("GET", _) => with_headers!(self.agent.get(url)).call().map_err(transport),
            ("HEAD", _) => with_headers!(self.agent.head(url))
                .call()
                .map_err(transport),
            ("DELETE", _) => with_headers!(self.agent.delete(url))
                .call()
                .map_err(transport),
            ("POST", Body::None) => with_headers!(self.agent.post(url))
                .send_empty()
                .map_err(transport),
            ("POST", Body::Bytes(b)) => with_headers!(self.agent.post(url))
                .send(*b)
                .map_err(transport),
            ("PUT", Body::None) => with_headers!(self.agent.put(url))
                .send_empty()
                .map_err(transport),
            ("PUT", Body::Bytes(b)) => with_headers!(self.agent.put(url))
                .send(*b)
                .map_err(transport),
            ("PATCH", Body::None) => with_headers!(self.agent.patch(url))
                .send_empty()
                .map_err(transport),
            ("PATCH", Body::Bytes(b)) => with_headers!(self.agent.patch(url))
                .send(*b)
                .map_err(transport),
            _ => Err(RegistryError::Invalid(format!(
                "unsupported method {method}"
            ))),
        }
    }

    /// Answers a 401 challenge: basic credentials, or a bearer token from the realm.
    fn authorize(&self, host: &str, scope: &str, challenge: Option<Challenge>) -> Result<String> {
        let cred = self.creds.get(host);
        match challenge {
            Some(Challenge::Basic) | None => {
                cred.map(Credential::basic_header)
                    .ok_or_else(|| RegistryError::Unauthorized {
                        host: host.to_string(),
                    })
            }
            Some(Challenge::Bearer {
                realm,
                service,
                scope: offered,
            }) => {
                let mut url = realm.clone();
                let mut sep = if url.contains('?') { '&' } else { '?' };
                if let Some(s) = service {
                    url.push_str(&format!("{sep}service={}", encode(&s)));
                    sep = '&';
                }
                let scope = if scope.is_empty() {
                    offered.unwrap_or_default()
                } else {
                    scope.to_string()
                };
                if !scope.is_empty() {
                    url.push_str(&format!("{sep}scope={}", encode(&scope)));
                }
                let mut req = self.agent.get(&url);
                if let Some(c) = cred {
                    req = req.header("Authorization", c.basic_header());
                }
                let mut resp = req.call().map_err(|e| RegistryError::Transport {
                    method: "GET",
                    url: url.clone(),
                    reason: e.to_string(),
                })?;
                if !resp.status().is_success() {
                    return Err(if resp.status() == StatusCode::UNAUTHORIZED {
                        RegistryError::Unauthorized {
                            host: host.to_string(),
                        }
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

    /// Checks that the registry answers and the credentials (if any) are accepted.
    pub fn ping(&self, host: &str) -> Result<()> {
        let url = format!("{}/v2/", self.base_url(host));
        let mut resp = self.send("GET", &url, host, "", &[], Body::None)?;
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
        let mut resp = self.send(
            "GET",
            &url,
            &Self::auth_host(ep, r),
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
        let mut resp = self.send(
            "GET",
            &url,
            &Self::auth_host(ep, r),
            &scope,
            &[],
            Body::None,
        )?;
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
        let mut resp = self.send(
            "GET",
            &url,
            &Self::auth_host(ep, r),
            &scope,
            &[],
            Body::None,
        )?;
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
        let range = format!("bytes={offset}-{}", offset + len - 1);
        // This loop owns the retries: a failure can come from the request or from a body cut
        // short, and each attempt is one request.
        let attempts = self.config.attempts.max(1);
        let mut last = None;
        for attempt in 1..=attempts {
            let result = (|| {
                let mut resp = self.send_attempts(
                    "GET",
                    &url,
                    &Self::auth_host(ep, r),
                    &scope,
                    &[("Range", range.clone())],
                    Body::None,
                    1,
                )?;
                let status = resp.status();
                let mut reader = resp.body_mut().with_config().limit(u64::MAX).reader();
                let mut buf = vec![0u8; len as usize];
                match status {
                    StatusCode::PARTIAL_CONTENT => {}
                    StatusCode::OK => {
                        // A server that ignores Range: skip to the offset.
                        std::io::copy(&mut (&mut reader).take(offset), &mut std::io::sink())
                            .map_err(|e| io_err("GET", &url, e))?;
                    }
                    _ => return Err(status_error("GET", &url, &mut resp)),
                }
                reader
                    .read_exact(&mut buf)
                    .map_err(|e| io_err("GET", &url, e))?;
                // Read to the end so the connection goes back to the pool for the next range.
                let _ = std::io::copy(&mut reader.take(64 << 10), &mut std::io::sink());
                Ok(buf)
            })();
            match result {
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

    /// The size of a blob if the repository has it.
    pub fn blob_size(&self, r: &Reference, digest: &str) -> Result<Option<u64>> {
        self.on_pull_endpoints(r, |ep| self.blob_size_at(ep, r, digest))
    }

    fn blob_size_at(&self, ep: &Endpoint, r: &Reference, digest: &str) -> Result<Option<u64>> {
        let url = Self::url(ep, r, &format!("blobs/{digest}"));
        let scope = format!("repository:{}:pull", r.repository);
        let mut resp = self.send(
            "HEAD",
            &url,
            &Self::auth_host(ep, r),
            &scope,
            &[],
            Body::None,
        )?;
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
        let mut resp = self.send(
            "POST",
            &url,
            &Self::auth_host(&ep, r),
            &scope,
            &[],
            Body::None,
        )?;
        match resp.status() {
            StatusCode::CREATED => Ok(true),
            StatusCode::ACCEPTED => {
                // Not mounted; an upload session was opened instead. Cancel it.
                if let Some(loc) = location(&resp) {
                    let u = Self::absolute(&ep, &loc);
                    let _ = self.send(
                        "DELETE",
                        &u,
                        &Self::auth_host(&ep, r),
                        &scope,
                        &[],
                        Body::None,
                    );
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
        let url = Self::url(&ep, r, "blobs/uploads/");
        let mut resp = self.send(
            "POST",
            &url,
            &Self::auth_host(&ep, r),
            &scope,
            &[],
            Body::None,
        )?;
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
            let mut resp = self.send(
                "PATCH",
                &loc,
                &Self::auth_host(&ep, r),
                &scope,
                &headers,
                Body::Bytes(&buf[..n]),
            )?;
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
            &Self::auth_host(&ep, r),
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
        let mut resp = self.send(
            "PUT",
            &url,
            &Self::auth_host(&ep, r),
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
