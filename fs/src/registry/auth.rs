//! Registry credentials (Docker's `config.json`) and `WWW-Authenticate` challenges.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::PathBuf;

use base64::Engine as _;

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

/// Credentials read from a Docker `config.json` (`auths.<host>.auth` = base64 `user:password`).
#[derive(Clone, Debug, Default)]
pub struct CredentialStore {
    path: PathBuf,
    auths: BTreeMap<String, Credential>,
}

impl CredentialStore {
    /// Loads `path`; a missing file is an empty store.
    pub fn load(path: PathBuf) -> io::Result<Self> {
        let mut store = CredentialStore {
            path,
            auths: BTreeMap::new(),
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
                if let Some((u, p)) = decoded.as_deref().and_then(|s| s.split_once(':')) {
                    store.auths.insert(
                        host.trim_start_matches("https://")
                            .trim_start_matches("http://")
                            .trim_end_matches("/v1/")
                            .trim_end_matches('/')
                            .to_string(),
                        Credential {
                            username: u.to_string(),
                            password: p.to_string(),
                        },
                    );
                }
            }
        }
        Ok(store)
    }

    /// Credentials for `host` (`docker.io` also matches Docker Hub's legacy key).
    pub fn get(&self, host: &str) -> Option<&Credential> {
        self.auths.get(host).or_else(|| {
            (host == "docker.io")
                .then(|| self.auths.get("index.docker.io"))
                .flatten()
        })
    }

    /// Adds credentials in memory (not saved).
    pub fn insert(&mut self, host: &str, cred: Credential) {
        self.auths.insert(host.to_string(), cred);
    }

    /// Stores (or with `None`, removes) credentials for `host` and rewrites the file atomically,
    /// keeping every other setting in it.
    pub fn save(&self, host: &str, cred: Option<&Credential>) -> io::Result<()> {
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
        fs::write(&path, br#"{"credsStore":"x","auths":{}}"#).unwrap();
        let store = CredentialStore::load(path.clone()).unwrap();
        let c = Credential {
            username: "u".into(),
            password: "p:w".into(),
        };
        store.save("localhost:5000", Some(&c)).unwrap();
        store.save("docker.io", Some(&c)).unwrap();
        let again = CredentialStore::load(path.clone()).unwrap();
        assert_eq!(again.get("localhost:5000"), Some(&c));
        assert_eq!(again.get("docker.io"), Some(&c));
        let v: serde_json::Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
        assert_eq!(v["credsStore"], "x");
        again.save("localhost:5000", None).unwrap();
        assert!(CredentialStore::load(path)
            .unwrap()
            .get("localhost:5000")
            .is_none());
    }
}
