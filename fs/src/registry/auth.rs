//! Registry credentials (Docker's `config.json`) and `WWW-Authenticate` challenges.
//!
//! Credentials for a registry host come from, in order:
//!
//! 1. `credHelpers` (`{"registry.example.com": "NAME"}`): the per-host credential helper;
//! 2. `credsStore` (`"NAME"`): the helper for every other host;
//! 3. `auths.<host>.auth` (base64 `user:password`, or `identitytoken`), as `strata login` writes
//!    them when no helper is configured.
//!
//! A helper is Docker's protocol: `docker-credential-NAME get` (found in `PATH`) reads the server
//! (`host[:port]`, or `https://index.docker.io/v1/` for Docker Hub) on standard input and prints
//! `{"ServerURL": …, "Username": …, "Secret": …}`. A `Username` of `<token>` means `Secret` is an
//! identity (refresh) token, exchanged for a bearer token with an OAuth2 `refresh_token` grant.
//! A helper that answers "credentials not found" falls back to the `auths` entry (or anonymous
//! access); a helper that is missing or fails is an error naming it. Each helper runs at most
//! once per host for a [`CredentialStore`] (the answer is remembered). `strata login`/`logout`
//! store and erase through the helper (`store`/`erase`) when one is configured for the host.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use parking_lot::Mutex;

/// The `Username` a credential helper answers when `Secret` is an identity token.
pub const IDENTITY_TOKEN_USER: &str = "<token>";

/// How long a credential helper may take to answer.
const HELPER_TIMEOUT: Duration = Duration::from_secs(30);

/// A username and password (or identity token) for one registry.
#[derive(Clone, PartialEq, Eq)]
pub struct Credential {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Credential({}, <redacted>)", self.username)
    }
}

impl Credential {
    /// `Basic <base64(user:password)>`.
    pub fn basic_header(&self) -> String {
        let raw = format!("{}:{}", self.username, self.password);
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(raw)
        )
    }

    /// The password is an identity (OAuth2 refresh) token, not a password.
    pub fn is_identity_token(&self) -> bool {
        self.username == IDENTITY_TOKEN_USER
    }
}

/// Why credentials could not be had from a credential helper.
#[derive(Clone, Debug, thiserror::Error)]
pub enum CredentialError {
    #[error(
        "credential helper docker-credential-{helper} (configured for {host} in {config}) is not \
         installed: {reason}"
    )]
    HelperMissing {
        helper: String,
        host: String,
        config: String,
        reason: String,
    },
    #[error("credential helper docker-credential-{helper} {action} for {host} failed ({status}): {message}")]
    HelperFailed {
        helper: String,
        action: &'static str,
        host: String,
        status: String,
        message: String,
    },
    #[error(
        "credential helper docker-credential-{helper} for {host}: unreadable answer: {reason}"
    )]
    HelperOutput {
        helper: String,
        host: String,
        reason: String,
    },
}

/// The key Docker uses for a registry host in `config.json`.
pub fn config_key(host: &str) -> String {
    if host == "docker.io" {
        "https://index.docker.io/v1/".to_string()
    } else {
        host.to_string()
    }
}

/// Docker's client configuration file: `$DOCKER_CONFIG/config.json` or `~/.docker/config.json`.
pub fn docker_config_path() -> PathBuf {
    if let Some(dir) = std::env::var_os("DOCKER_CONFIG") {
        return PathBuf::from(dir).join("config.json");
    }
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("/root"), PathBuf::from);
    home.join(".docker/config.json")
}

/// A `config.json` key as a bare `host[:port]`.
fn normalize_key(key: &str) -> String {
    key.trim_start_matches("https://")
        .trim_start_matches("http://")
        .trim_end_matches("/v1/")
        .trim_end_matches('/')
        .to_string()
}

/// The keys a host's settings may be stored under (Docker Hub has several names).
fn keys_of(host: &str) -> Vec<&str> {
    if host == "docker.io" {
        vec!["docker.io", "index.docker.io", "registry-1.docker.io"]
    } else {
        vec![host]
    }
}

type HelperAnswer = Result<Option<Credential>, CredentialError>;

/// Credentials from a Docker `config.json`: credential helpers (`credHelpers`, `credsStore`)
/// and inline `auths`.
#[derive(Debug, Default)]
pub struct CredentialStore {
    path: PathBuf,
    auths: BTreeMap<String, Credential>,
    /// Added with [`CredentialStore::insert`]: win over everything else.
    overrides: BTreeMap<String, Credential>,
    /// `credHelpers`: host → helper name.
    helpers: BTreeMap<String, String>,
    /// `credsStore`: the helper for every other host.
    default_helper: Option<String>,
    /// Where helper programs are (tests); `None`: looked up in `PATH`.
    helper_dir: Option<PathBuf>,
    /// Answers of helpers, per host (each helper runs at most once per host).
    answers: Arc<Mutex<HashMap<String, HelperAnswer>>>,
}

impl Clone for CredentialStore {
    /// A copy with the same settings that asks helpers afresh.
    fn clone(&self) -> Self {
        CredentialStore {
            path: self.path.clone(),
            auths: self.auths.clone(),
            overrides: self.overrides.clone(),
            helpers: self.helpers.clone(),
            default_helper: self.default_helper.clone(),
            helper_dir: self.helper_dir.clone(),
            answers: Arc::default(),
        }
    }
}

impl CredentialStore {
    /// Loads `path`; a missing file is an empty store.
    pub fn load(path: PathBuf) -> io::Result<Self> {
        let mut store = CredentialStore {
            path,
            ..CredentialStore::default()
        };
        let data = match fs::read(&store.path) {
            Ok(d) => d,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(store),
            Err(e) => return Err(e),
        };
        let v: serde_json::Value = serde_json::from_slice(&data).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: {e}", store.path.display()),
            )
        })?;
        if let Some(auths) = v.get("auths").and_then(|a| a.as_object()) {
            for (host, entry) in auths {
                let decoded = entry
                    .get("auth")
                    .and_then(|a| a.as_str())
                    .and_then(|a| base64::engine::general_purpose::STANDARD.decode(a).ok())
                    .and_then(|b| String::from_utf8(b).ok());
                let identity = entry
                    .get("identitytoken")
                    .and_then(|t| t.as_str())
                    .filter(|t| !t.is_empty());
                let cred = if let Some(token) = identity {
                    Some(Credential {
                        username: IDENTITY_TOKEN_USER.to_string(),
                        password: token.to_string(),
                    })
                } else {
                    decoded
                        .as_deref()
                        .and_then(|s| s.split_once(':'))
                        .map(|(u, p)| Credential {
                            username: u.to_string(),
                            password: p.to_string(),
                        })
                };
                if let Some(cred) = cred {
                    store.auths.insert(normalize_key(host), cred);
                }
            }
        }
        if let Some(helpers) = v.get("credHelpers").and_then(|h| h.as_object()) {
            for (host, name) in helpers {
                if let Some(name) = name.as_str().filter(|n| !n.is_empty()) {
                    store.helpers.insert(normalize_key(host), name.to_string());
                }
            }
        }
        store.default_helper = v
            .get("credsStore")
            .and_then(|s| s.as_str())
            .filter(|s| !s.is_empty())
            .map(str::to_string);
        Ok(store)
    }

    /// Runs helper programs from `dir` instead of looking them up in `PATH`.
    pub fn with_helper_dir(mut self, dir: PathBuf) -> Self {
        self.helper_dir = Some(dir);
        self
    }

    /// The credential helper configured for `host`, if any (`credHelpers`, then `credsStore`).
    pub fn helper_for(&self, host: &str) -> Option<&str> {
        keys_of(host)
            .into_iter()
            .find_map(|k| self.helpers.get(k))
            .or(self.default_helper.as_ref())
            .map(String::as_str)
    }

    /// Credentials for `host`: from its credential helper if one is configured (run once per
    /// host, then remembered), else (or if the helper has none) from `auths`.
    pub fn get(&self, host: &str) -> Result<Option<Credential>, CredentialError> {
        if let Some(c) = keys_of(host)
            .into_iter()
            .find_map(|k| self.overrides.get(k))
        {
            return Ok(Some(c.clone()));
        }
        if let Some(helper) = self.helper_for(host) {
            let answer = {
                // Held while the helper runs: concurrent lookups wait for its one answer.
                let mut answers = self.answers.lock();
                answers
                    .entry(host.to_string())
                    .or_insert_with(|| self.helper_get(helper, host))
                    .clone()
            };
            if let Some(c) = answer? {
                return Ok(Some(c));
            }
        }
        Ok(keys_of(host)
            .into_iter()
            .find_map(|k| self.auths.get(k))
            .cloned())
    }

    /// Adds credentials in memory (not saved); they win over helpers and `auths`.
    pub fn insert(&mut self, host: &str, cred: Credential) {
        self.overrides.insert(host.to_string(), cred);
    }

    /// `docker-credential-NAME get` for `host`: `None` when it has no credentials for it.
    fn helper_get(&self, helper: &str, host: &str) -> HelperAnswer {
        let server = config_key(host);
        let out = self.run_helper(helper, "get", host, server.as_bytes())?;
        let text = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            if is_not_found(&text) || is_not_found(&err) {
                tracing::debug!(helper, host, "the credential helper has no credentials");
                return Ok(None);
            }
            return Err(helper_failed(helper, "get", host, &out));
        }
        let v: serde_json::Value =
            serde_json::from_str(text.trim()).map_err(|e| CredentialError::HelperOutput {
                helper: helper.to_string(),
                host: host.to_string(),
                reason: e.to_string(),
            })?;
        let field = |k: &str| v.get(k).and_then(|x| x.as_str()).unwrap_or("").to_string();
        let (username, password) = (field("Username"), field("Secret"));
        if password.is_empty() {
            return Ok(None);
        }
        Ok(Some(Credential { username, password }))
    }

    /// Runs `docker-credential-NAME ACTION` with `input` on standard input, within a time limit.
    fn run_helper(
        &self,
        helper: &str,
        action: &'static str,
        host: &str,
        input: &[u8],
    ) -> Result<std::process::Output, CredentialError> {
        let program = format!("docker-credential-{helper}");
        let program = match &self.helper_dir {
            Some(d) => d.join(program),
            None => PathBuf::from(program),
        };
        let failed = |status: String, message: String| CredentialError::HelperFailed {
            helper: helper.to_string(),
            action,
            host: host.to_string(),
            status,
            message,
        };
        let mut child = Command::new(&program)
            .arg(action)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| {
                if e.kind() == io::ErrorKind::NotFound {
                    CredentialError::HelperMissing {
                        helper: helper.to_string(),
                        host: host.to_string(),
                        config: self.path.display().to_string(),
                        reason: format!("{} not found in PATH", program.display()),
                    }
                } else {
                    failed("not started".into(), e.to_string())
                }
            })?;
        // Standard input, output and error on their own threads: a helper that writes a lot
        // before reading (or never reads) cannot block us.
        let stdin = child.stdin.take().map(|mut w| {
            let data = input.to_vec();
            std::thread::spawn(move || {
                use std::io::Write;
                let _ = w.write_all(&data);
            })
        });
        let reader = |r: Option<Box<dyn io::Read + Send>>| {
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                if let Some(mut r) = r {
                    let _ = io::Read::read_to_end(&mut io::Read::take(&mut r, 1 << 20), &mut buf);
                }
                buf
            })
        };
        let stdout = reader(
            child
                .stdout
                .take()
                .map(|r| Box::new(r) as Box<dyn io::Read + Send>),
        );
        let stderr = reader(
            child
                .stderr
                .take()
                .map(|r| Box::new(r) as Box<dyn io::Read + Send>),
        );
        let deadline = Instant::now() + HELPER_TIMEOUT;
        let status = loop {
            match child.try_wait() {
                Ok(Some(s)) => break s,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5));
                }
                Ok(None) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(failed(
                        "timed out".into(),
                        format!("no answer within {}s", HELPER_TIMEOUT.as_secs()),
                    ));
                }
                Err(e) => return Err(failed("wait failed".into(), e.to_string())),
            }
        };
        if let Some(t) = stdin {
            let _ = t.join();
        }
        Ok(std::process::Output {
            status,
            stdout: stdout.join().unwrap_or_default(),
            stderr: stderr.join().unwrap_or_default(),
        })
    }

    /// Stores (or with `None`, removes) credentials for `host`. With a credential helper
    /// configured for it, through the helper (`store`/`erase`), and any inline entry is dropped;
    /// otherwise in `auths`. The file is rewritten atomically, keeping every other setting in it.
    pub fn save(&self, host: &str, cred: Option<&Credential>) -> Result<(), SaveError> {
        let mut inline = cred;
        if let Some(helper) = self.helper_for(host) {
            let server = config_key(host);
            match cred {
                Some(c) => {
                    let body = serde_json::json!({
                        "ServerURL": server,
                        "Username": c.username,
                        "Secret": c.password,
                    })
                    .to_string();
                    let out = self.run_helper(helper, "store", host, body.as_bytes())?;
                    if !out.status.success() {
                        return Err(helper_failed(helper, "store", host, &out).into());
                    }
                }
                None => {
                    let out = self.run_helper(helper, "erase", host, server.as_bytes())?;
                    let text = String::from_utf8_lossy(&out.stdout);
                    let err = String::from_utf8_lossy(&out.stderr);
                    if !out.status.success() && !is_not_found(&text) && !is_not_found(&err) {
                        return Err(helper_failed(helper, "erase", host, &out).into());
                    }
                }
            }
            inline = None;
        }
        self.save_inline(host, inline)?;
        Ok(())
    }

    fn save_inline(&self, host: &str, cred: Option<&Credential>) -> io::Result<()> {
        let mut v: serde_json::Value = match fs::read(&self.path) {
            Ok(d) => serde_json::from_slice(&d).map_err(|e| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{}: {e}", self.path.display()),
                )
            })?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => serde_json::json!({}),
            Err(e) => return Err(e),
        };
        if !v.is_object() {
            v = serde_json::json!({});
        }
        let key = config_key(host);
        let auths = v
            .as_object_mut()
            .map(|o| o.entry("auths").or_insert_with(|| serde_json::json!({})));
        if let Some(auths) = auths.and_then(|a| a.as_object_mut()) {
            match cred {
                Some(c) => {
                    let raw = format!("{}:{}", c.username, c.password);
                    auths.insert(
                        key,
                        serde_json::json!({"auth": base64::engine::general_purpose::STANDARD.encode(raw)}),
                    );
                }
                None => {
                    auths.remove(&key);
                    auths.remove(host);
                }
            }
        }
        let dir = self.path.parent().map(PathBuf::from).unwrap_or_default();
        fs::create_dir_all(&dir)?;
        let tmp = dir.join(format!(".config.json.{}", std::process::id()));
        let body = serde_json::to_vec_pretty(&v)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
        {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            let mut f = fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(&body)?;
            f.sync_all()?;
        }
        fs::rename(&tmp, &self.path)
    }
}

/// Why credentials could not be saved.
#[derive(Debug, thiserror::Error)]
pub enum SaveError {
    #[error(transparent)]
    Helper(#[from] CredentialError),
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// Docker's helpers say "credentials not found in native keychain" when they have none.
fn is_not_found(s: &str) -> bool {
    s.to_ascii_lowercase().contains("credentials not found")
}

fn helper_failed(
    helper: &str,
    action: &'static str,
    host: &str,
    out: &std::process::Output,
) -> CredentialError {
    let mut message = String::from_utf8_lossy(&out.stderr).trim().to_string();
    if message.is_empty() {
        message = String::from_utf8_lossy(&out.stdout).trim().to_string();
    }
    message.truncate(500);
    CredentialError::HelperFailed {
        helper: helper.to_string(),
        action,
        host: host.to_string(),
        status: out.status.to_string(),
        message,
    }
}

/// A parsed `WWW-Authenticate` challenge.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Challenge {
    Basic,
    Bearer {
        realm: String,
        service: Option<String>,
        scope: Option<String>,
    },
}

/// Parses `Basic realm="…"` or `Bearer realm="…",service="…",scope="…"`.
pub fn parse_challenge(header: &str) -> Option<Challenge> {
    let header = header.trim();
    let (scheme, rest) = header
        .split_once(char::is_whitespace)
        .unwrap_or((header, ""));
    let params = parse_params(rest);
    match scheme.to_ascii_lowercase().as_str() {
        "basic" => Some(Challenge::Basic),
        "bearer" => Some(Challenge::Bearer {
            realm: params.get("realm")?.clone(),
            service: params.get("service").cloned(),
            scope: params.get("scope").cloned(),
        }),
        _ => None,
    }
}

fn parse_params(s: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        while i < b.len() && (b[i] == b',' || b[i].is_ascii_whitespace()) {
            i += 1;
        }
        let k0 = i;
        while i < b.len() && b[i] != b'=' {
            i += 1;
        }
        let key = s[k0..i].trim().to_ascii_lowercase();
        i += 1;
        let mut value = String::new();
        if i < b.len() && b[i] == b'"' {
            i += 1;
            while i < b.len() && b[i] != b'"' {
                if b[i] == b'\\' && i + 1 < b.len() {
                    i += 1;
                }
                value.push(b[i] as char);
                i += 1;
            }
            i += 1;
        } else {
            let v0 = i;
            while i < b.len() && b[i] != b',' {
                i += 1;
            }
            value = s[v0.min(s.len())..i.min(s.len())].trim().to_string();
        }
        if !key.is_empty() {
            out.insert(key, value);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenges() {
        assert_eq!(
            parse_challenge(
                r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/alpine:pull,push""#
            ),
            Some(Challenge::Bearer {
                realm: "https://auth.docker.io/token".into(),
                service: Some("registry.docker.io".into()),
                scope: Some("repository:library/alpine:pull,push".into()),
            })
        );
        assert_eq!(
            parse_challenge(r#"Basic realm="Registry Realm""#),
            Some(Challenge::Basic)
        );
        assert_eq!(parse_challenge("Negotiate"), None);
    }

    #[test]
    fn config_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        fs::write(&path, br#"{"credsFormat":"x","auths":{}}"#).unwrap();
        let store = CredentialStore::load(path.clone()).unwrap();
        let c = Credential {
            username: "u".into(),
            password: "p:w".into(),
        };
        store.save("localhost:5000", Some(&c)).unwrap();
        store.save("docker.io", Some(&c)).unwrap();
        let again = CredentialStore::load(path.clone()).unwrap();
        assert_eq!(again.get("localhost:5000").unwrap(), Some(c.clone()));
        assert_eq!(again.get("docker.io").unwrap(), Some(c.clone()));
        let v: serde_json::Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
        assert_eq!(v["credsFormat"], "x");
        again.save("localhost:5000", None).unwrap();
        assert!(CredentialStore::load(path)
            .unwrap()
            .get("localhost:5000")
            .unwrap()
            .is_none());
    }

    /// A helper script answering from `DIR/store.json` (what `store` wrote), counting `get`s.
    fn helper(dir: &std::path::Path, name: &str) {
        use std::os::unix::fs::PermissionsExt;
        let script = dir.join(format!("docker-credential-{name}"));
        fs::write(
            &script,
            format!(
                r#"#!/bin/sh
d={d}
case "$1" in
get)
  echo x >> "$d/gets"
  server=$(cat)
  [ "$server" = broken ] && {{ echo "keychain locked" >&2; exit 3; }}
  if [ -f "$d/store.json" ]; then cat "$d/store.json"; else echo "credentials not found in native keychain"; exit 1; fi ;;
store) cat > "$d/store.json" ;;
erase) cat > /dev/null; rm -f "$d/store.json" ;;
esac
"#,
                d = dir.display()
            ),
        )
        .unwrap();
        fs::set_permissions(&script, fs::Permissions::from_mode(0o755)).unwrap();
    }

    #[test]
    fn credential_helpers_win_over_auths_and_run_once() {
        let dir = tempfile::tempdir().unwrap();
        helper(dir.path(), "t");
        let path = dir.path().join("config.json");
        let inline = Credential {
            username: "inline".into(),
            password: "pw".into(),
        };
        fs::write(
            &path,
            serde_json::json!({
                "auths": {
                    "reg.example:5000": {"auth": base64::engine::general_purpose::STANDARD.encode("inline:pw")},
                    "tok.example": {"auth": "", "identitytoken": "refresh-me"},
                },
                "credHelpers": {"reg.example:5000": "t", "broken": "t", "missing.example": "nope"},
            })
            .to_string(),
        )
        .unwrap();
        let store = CredentialStore::load(path.clone())
            .unwrap()
            .with_helper_dir(dir.path().to_path_buf());
        // The helper has nothing yet: the inline entry is used, and the helper ran once.
        assert_eq!(store.get("reg.example:5000").unwrap(), Some(inline.clone()));
        assert_eq!(store.get("reg.example:5000").unwrap(), Some(inline.clone()));
        assert_eq!(fs::read_to_string(dir.path().join("gets")).unwrap(), "x\n");
        let tok = store.get("tok.example").unwrap().unwrap();
        assert!(tok.is_identity_token());
        assert_eq!(tok.password, "refresh-me");
        assert_eq!(store.get("other.example").unwrap(), None);

        // Saving goes through the helper and drops the inline entry.
        let c = Credential {
            username: "u".into(),
            password: "p".into(),
        };
        store.save("reg.example:5000", Some(&c)).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
        assert!(v["auths"].get("reg.example:5000").is_none());
        assert_eq!(v["credHelpers"]["reg.example:5000"], "t");
        let fresh = CredentialStore::load(path.clone())
            .unwrap()
            .with_helper_dir(dir.path().to_path_buf());
        assert_eq!(fresh.get("reg.example:5000").unwrap(), Some(c.clone()));
        // An in-memory credential (login's check) wins over the helper.
        let mut check = fresh.clone();
        check.insert("reg.example:5000", inline.clone());
        assert_eq!(check.get("reg.example:5000").unwrap(), Some(inline));

        let err = fresh.get("broken").unwrap_err().to_string();
        assert!(
            err.contains("docker-credential-t") && err.contains("keychain locked"),
            "{err}"
        );
        let err = fresh.get("missing.example").unwrap_err().to_string();
        assert!(
            err.contains("docker-credential-nope") && err.contains("not installed"),
            "{err}"
        );

        fresh.save("reg.example:5000", None).unwrap();
        assert!(!dir.path().join("store.json").exists());
    }

    #[test]
    fn creds_store_applies_to_every_host_without_a_helper_of_its_own() {
        let dir = tempfile::tempdir().unwrap();
        helper(dir.path(), "all");
        fs::write(
            dir.path().join("store.json"),
            r#"{"ServerURL":"x","Username":"<token>","Secret":"idt"}"#,
        )
        .unwrap();
        let path = dir.path().join("config.json");
        fs::write(
            &path,
            r#"{"credsStore":"all","credHelpers":{"docker.io":"none"}}"#,
        )
        .unwrap();
        let store = CredentialStore::load(path)
            .unwrap()
            .with_helper_dir(dir.path().to_path_buf());
        assert_eq!(store.helper_for("docker.io"), Some("none"));
        assert_eq!(store.helper_for("quay.io"), Some("all"));
        let c = store.get("quay.io").unwrap().unwrap();
        assert!(c.is_identity_token());
        assert_eq!(c.password, "idt");
    }
}
