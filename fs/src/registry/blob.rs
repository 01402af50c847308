//! Reading blobs: whole, streamed or by byte range. Range reads follow a registry's redirect by
//! hand and reuse where it led for later ranges of the same blob for a few minutes.

use std::io::Read;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ureq::http::{Response, StatusCode};

use super::hosts::{self, Endpoint};
use super::request::{io_err, location, retryable, status_error, transport_err, Body};
use super::{At, Registry, RegistryError, Result, MAX_REDIRECTS};
use crate::blob::BlobSource;
use crate::format::Sha256Digest;
use crate::reference::Reference;

/// How long the URL a blob's range read was redirected to is reused.
const REDIRECT_TTL: Duration = Duration::from_secs(300);

impl Registry {
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

    /// How long a range read waits for its answer's headers, on average over this client's
    /// range reads after its first (which also pays for connecting and signing in); `None`
    /// before that: the price of one more request.
    pub fn range_latency(&self) -> Option<std::time::Duration> {
        match self
            .range_latency_us
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            0 => None,
            us => Some(std::time::Duration::from_micros(us)),
        }
    }

    /// How fast 206 answers of 64 KiB and more arrived, on average (`None` before the first
    /// such read): smaller ones say more about buffers than about the link.
    pub fn range_rate(&self) -> Option<u64> {
        match self
            .range_ns_per_kib
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            0 => None,
            ns => Some((1024u128 * 1_000_000_000 / u128::from(ns)).max(1) as u64),
        }
    }

    fn note_range_rate(&self, len: u64, took: std::time::Duration) {
        if len < 64 << 10 {
            return;
        }
        let sample = (took.as_nanos() * 1024 / u128::from(len)).max(1) as u64;
        // Averaged as time per byte, so one fast answer does not make the link look fast, and
        // a sample may make it at most 4 times faster than it was.
        moving_average(&self.range_ns_per_kib, |old| sample.max(old / 4));
    }

    fn note_range_latency(&self, took: std::time::Duration) {
        use std::sync::atomic::Ordering;
        if self.range_reads.fetch_add(1, Ordering::Relaxed) == 0 {
            return;
        }
        let sample = (took.as_micros() as u64).max(1);
        moving_average(&self.range_latency_us, |_| sample);
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
        let mut sent = Instant::now();
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
                    return self.read_timed_range(resp, &target, offset, len, sent);
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
            sent = Instant::now();
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
        if resp.status() == StatusCode::PARTIAL_CONTENT || resp.status() == StatusCode::OK {
            return self.read_timed_range(resp, &current, offset, len, sent);
        }
        read_range_body(resp, &current, offset, len)
    }

    /// Reads a range answer (206, or a 200 from a server that ignores Range) of the request
    /// sent at `sent`, noting how long its headers took and, for a 206, the rate of its body
    /// (a 200 skips to the offset inside the read: no rate from it).
    fn read_timed_range(
        &self,
        resp: Response<ureq::Body>,
        url: &str,
        offset: u64,
        len: u64,
        sent: Instant,
    ) -> Result<Vec<u8>> {
        self.note_range_latency(sent.elapsed());
        let partial = resp.status() == StatusCode::PARTIAL_CONTENT;
        let started = Instant::now();
        let body = read_range_body(resp, url, offset, len)?;
        if partial {
            self.note_range_rate(len, started.elapsed());
        }
        Ok(body)
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
}

/// Folds a sample into `cell`, a moving average that weighs the newest sample 1/4 (one odd
/// answer does not decide); `sample(old)` gives it from the current average (0: none yet, and
/// the sample is taken whole).
fn moving_average(cell: &std::sync::atomic::AtomicU64, sample: impl Fn(u64) -> u64) {
    use std::sync::atomic::Ordering;
    let _ = cell.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |old| {
        let s = sample(old).max(1);
        Some(if old == 0 {
            s
        } else {
            ((old * 3 + s) / 4).max(1)
        })
    });
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
    fn request_latency(&self) -> Option<std::time::Duration> {
        self.registry.range_latency()
    }
    fn transfer_rate(&self) -> Option<u64> {
        self.registry.range_rate()
    }
}

#[cfg(test)]
mod tests {
    use super::super::auth::{Credential, CredentialStore};
    use super::super::testutil::{client, count, resp, serve};
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    #[test]
    fn range_reads_measure_the_registrys_latency() {
        let data: Arc<Vec<u8>> = Arc::new(vec![7u8; 4096]);
        let (addr, _log) = {
            let data = data.clone();
            serve(move |req| {
                if req.path == "/v2/" {
                    return resp(200, vec![], b"{}");
                }
                std::thread::sleep(std::time::Duration::from_millis(40));
                resp(
                    206,
                    vec![("Content-Range", format!("bytes 0-99/{}", data.len()))],
                    &data[..100],
                )
            })
        };
        let registry = client(CredentialStore::default());
        assert_eq!(registry.range_latency(), None);
        let r = Reference::parse(&format!("{addr}/test/repo:v1")).unwrap();
        for _ in 0..2 {
            assert_eq!(
                registry.get_range(&r, "sha256:0000", 0, 100).unwrap(),
                data[..100]
            );
        }
        let latency = registry.range_latency().unwrap();
        assert!(
            latency >= std::time::Duration::from_millis(40)
                && latency < std::time::Duration::from_secs(5),
            "{latency:?}"
        );
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
