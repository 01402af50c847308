//! Image references in Docker's grammar: `[registry[:port]/]path[:tag][@digest]`, with Docker's
//! defaults (`alpine` → `docker.io/library/alpine:latest`).

use std::fmt;

pub const DEFAULT_REGISTRY: &str = "docker.io";
pub const DEFAULT_TAG: &str = "latest";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid image reference {input:?}: {reason}")]
pub struct ReferenceError {
    pub input: String,
    pub reason: &'static str,
}

/// A fully qualified image reference.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Reference {
    /// Registry host, with port if any (`docker.io`, `localhost:5000`).
    pub registry: String,
    /// Repository path (`library/alpine`).
    pub repository: String,
    /// Tag; `None` only when a digest is given without a tag.
    pub tag: Option<String>,
    /// Digest (`sha256:…`), if pinned.
    pub digest: Option<String>,
}

fn is_path_component(c: &str) -> bool {
    // [a-z0-9]+ ((\.|_|__|-+)[a-z0-9]+)*
    let b = c.as_bytes();
    if b.is_empty() || !b[0].is_ascii_lowercase() && !b[0].is_ascii_digit() {
        return false;
    }
    let alnum = |x: u8| x.is_ascii_lowercase() || x.is_ascii_digit();
    let mut i = 0;
    while i < b.len() {
        if alnum(b[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < b.len() && !alnum(b[i]) {
            i += 1;
        }
        let sep = &c[start..i];
        let ok = sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|x| x == b'-');
        if !ok || i == b.len() {
            return false;
        }
    }
    true
}

fn is_tag(t: &str) -> bool {
    let b = t.as_bytes();
    !b.is_empty()
        && b.len() <= 128
        && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
        && b.iter()
            .all(|&x| x.is_ascii_alphanumeric() || x == b'_' || x == b'.' || x == b'-')
}

fn is_digest(d: &str) -> bool {
    match d.split_once(':') {
        Some((algo, hex)) => {
            !algo.is_empty()
                && algo
                    .bytes()
                    .all(|x| x.is_ascii_lowercase() || x.is_ascii_digit() || b"+._-".contains(&x))
                && hex.len() >= 32
                && hex.bytes().all(|x| x.is_ascii_hexdigit())
                && (algo != "sha256" || hex.len() == 64)
        }
        None => false,
    }
}

fn is_domain(d: &str) -> bool {
    let (host, port) = match d.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || d.starts_with('[') => (h, Some(p)),
        _ => (d, None),
    };
    if let Some(p) = port {
        if p.is_empty() || !p.bytes().all(|x| x.is_ascii_digit()) {
            return false;
        }
    }
    if host.starts_with('[') && host.ends_with(']') {
        return true; // IPv6 literal
    }
    !host.is_empty()
        && host.split('.').all(|l| {
            !l.is_empty()
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes().all(|x| x.is_ascii_alphanumeric() || x == b'-')
        })
}

impl Reference {
    /// Parses a reference, applying Docker's defaults.
    pub fn parse(input: &str) -> Result<Self, ReferenceError> {
        let err = |reason| ReferenceError {
            input: input.to_string(),
            reason,
        };
        if input.is_empty() {
            return Err(err("empty"));
        }
        if input.len() > 4096 {
            return Err(err("too long"));
        }
        let (rest, digest) = match input.split_once('@') {
            Some((r, d)) => {
                if !is_digest(d) {
                    return Err(err("malformed digest"));
                }
                (r, Some(d.to_string()))
            }
            None => (input, None),
        };
        // A tag is after the last ':' that follows the last '/'.
        let last_slash = rest.rfind('/').map_or(0, |i| i + 1);
        let (name, tag) = match rest[last_slash..].rfind(':') {
            Some(i) => {
                let t = &rest[last_slash + i + 1..];
                if !is_tag(t) {
                    return Err(err("malformed tag"));
                }
                (&rest[..last_slash + i], Some(t.to_string()))
            }
            None => (rest, None),
        };
        let (registry, path) = match name.split_once('/') {
            Some((first, p))
                if first.contains('.') || first.contains(':') || first == "localhost" =>
            {
                if !is_domain(first) {
                    return Err(err("malformed registry host"));
                }
                (first.to_string(), p.to_string())
            }
            _ => (DEFAULT_REGISTRY.to_string(), name.to_string()),
        };
        let registry = if registry == "index.docker.io" || registry == "registry-1.docker.io" {
            DEFAULT_REGISTRY.to_string()
        } else {
            registry
        };
        if path.is_empty() || !path.split('/').all(is_path_component) {
            return Err(err(
                "repository must be lowercase components of [a-z0-9] joined by '.', '_', '__' or '-'",
            ));
        }
        let repository = if registry == DEFAULT_REGISTRY && !path.contains('/') {
            format!("library/{path}")
        } else {
            path
        };
        if registry.len() + repository.len() + 1 > 255 {
            return Err(err("repository name longer than 255 characters"));
        }
        let tag = match (&tag, &digest) {
            (None, None) => Some(DEFAULT_TAG.to_string()),
            _ => tag,
        };
        Ok(Reference {
            registry,
            repository,
            tag,
            digest,
        })
    }

    /// `registry/repository` without tag or digest.
    pub fn name(&self) -> String {
        format!("{}/{}", self.registry, self.repository)
    }

    /// The shortest form Docker would print (`alpine:latest`, `localhost:5000/app:v1`).
    pub fn familiar(&self) -> String {
        let mut name = if self.registry == DEFAULT_REGISTRY {
            self.repository
                .strip_prefix("library/")
                .unwrap_or(&self.repository)
                .to_string()
        } else {
            self.name()
        };
        if let Some(t) = &self.tag {
            name.push(':');
            name.push_str(t);
        }
        if let Some(d) = &self.digest {
            name.push('@');
            name.push_str(d);
        }
        name
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.name())?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

impl std::str::FromStr for Reference {
    type Err = ReferenceError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Reference::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn full(s: &str) -> String {
        Reference::parse(s).unwrap().to_string()
    }

    #[test]
    fn docker_defaults() {
        assert_eq!(full("alpine"), "docker.io/library/alpine:latest");
        assert_eq!(full("user/app:v1"), "docker.io/user/app:v1");
        assert_eq!(full("localhost:5000/app"), "localhost:5000/app:latest");
        assert_eq!(full("localhost/app:1.0"), "localhost/app:1.0");
        assert_eq!(full("ghcr.io/org/sub/app:v2"), "ghcr.io/org/sub/app:v2");
        assert_eq!(
            full("index.docker.io/library/x"),
            "docker.io/library/x:latest"
        );
        let d = format!("sha256:{}", "a".repeat(64));
        assert_eq!(
            full(&format!("alpine@{d}")),
            format!("docker.io/library/alpine@{d}")
        );
        assert_eq!(
            full(&format!("127.0.0.1:5000/a/b:t@{d}")),
            format!("127.0.0.1:5000/a/b:t@{d}")
        );
        assert_eq!(
            Reference::parse("alpine").unwrap().familiar(),
            "alpine:latest"
        );
    }

    #[test]
    fn rejects_bad_references() {
        for bad in [
            "",
            "Upper/case",
            "app:",
            "app:-bad",
            "a//b",
            "app@sha256:zz",
            "-app",
            "app:t:t",
            "a/b:tag/x",
        ] {
            assert!(Reference::parse(bad).is_err(), "{bad:?} should be refused");
        }
    }
}
