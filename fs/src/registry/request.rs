//! Sending a request: auth (answering a 401 challenge with basic credentials or a bearer
//! token), retries with backoff, TLS errors explained, and the helpers that read responses.

use ureq::http::{Response, StatusCode};

use super::auth::{parse_challenge, Challenge, Credential};
use super::{hosts, tls, At, Registry, RegistryError, Result};

pub(super) enum Body<'a> {
    None,
    Bytes(&'a [u8]),
}

impl Registry {
    /// Sends a request with auth and retries; returns the final response (any status).
    pub(super) fn send(
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
    pub(super) fn send_attempts(
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
    pub(super) fn send_once(
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
}

/// Errors worth another attempt: transport failures (including bodies cut short), 5xx, 429.
pub(super) fn retryable(e: &RegistryError) -> bool {
    match e {
        RegistryError::Transport { .. } => true,
        RegistryError::Status { status, .. } => *status >= 500 || *status == 429,
        _ => false,
    }
}

pub(super) fn location(resp: &Response<ureq::Body>) -> Option<String> {
    resp.headers()
        .get("location")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

/// Percent-encodes a query value.
pub(super) fn encode(s: &str) -> String {
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

pub(super) fn status_error(
    method: &'static str,
    url: &str,
    resp: &mut Response<ureq::Body>,
) -> RegistryError {
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

pub(super) fn transport_err(method: &'static str, url: &str, e: ureq::Error) -> RegistryError {
    RegistryError::Transport {
        method,
        url: url.to_string(),
        reason: e.to_string(),
    }
}

pub(super) fn io_err(method: &'static str, url: &str, e: std::io::Error) -> RegistryError {
    RegistryError::Transport {
        method,
        url: url.to_string(),
        reason: e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::super::auth::{self, CredentialStore};
    use super::super::testutil::{client, count, resp, serve, Log};
    use super::*;
    use crate::reference::Reference;
    use parking_lot::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

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
}
