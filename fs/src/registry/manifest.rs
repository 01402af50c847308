//! Manifests: resolving a reference (an index to the manifest of one platform) and fetching a
//! manifest by tag or digest, verified against the digest expected.

use super::hosts::Endpoint;
use super::request::{encode, status_error, transport_err, Body};
use super::{Registry, RegistryError, Result};
use crate::format::Sha256Digest;
use crate::oci::{self, Index, Manifest};
use crate::reference::Reference;

/// Media types a manifest request accepts.
const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.manifest.v1+json, \
application/vnd.oci.image.index.v1+json, \
application/vnd.docker.distribution.manifest.v2+json, \
application/vnd.docker.distribution.manifest.list.v2+json";

/// Largest manifest or config accepted.
const MAX_METADATA: u64 = 16 << 20;

/// The resolved manifest of an image.
#[derive(Clone, Debug)]
pub struct Resolved {
    pub digest: String,
    pub media_type: String,
    pub bytes: Vec<u8>,
    pub manifest: Manifest,
}

impl Registry {
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

    /// Fetches the manifest or index at `target` (a tag or digest) of `r`'s repository as it
    /// is, without resolving a platform; verified against `target` when it is a digest.
    pub fn fetch_manifest(&self, r: &Reference, target: &str) -> Result<Resolved> {
        let expect = target.starts_with("sha256:").then_some(target);
        self.get_manifest(r, target, expect)
    }

    /// The manifests that refer to `digest` (their `subject`) with `artifact_type`, through
    /// the OCI 1.1 referrers API; `None` when the registry does not offer it (404), so the
    /// caller falls back to the tag schema (`sha256-HEX`).
    pub fn referrers(
        &self,
        r: &Reference,
        digest: &str,
        artifact_type: &str,
    ) -> Result<Option<Vec<oci::Descriptor>>> {
        self.on_pull_endpoints(r, |ep| {
            let url = Self::url(
                ep,
                r,
                &format!("referrers/{digest}?artifactType={}", encode(artifact_type)),
            );
            let scope = format!("repository:{}:pull", r.repository);
            let at = self.at(ep, r)?;
            let mut resp = self.send(
                "GET",
                &url,
                &at,
                &scope,
                &[("Accept", oci::MEDIA_TYPE_INDEX.to_string())],
                Body::None,
            )?;
            if resp.status().as_u16() == 404 {
                return Ok(None);
            }
            if !resp.status().is_success() {
                return Err(status_error("GET", &url, &mut resp));
            }
            let bytes = resp
                .body_mut()
                .with_config()
                .limit(MAX_METADATA)
                .read_to_vec()
                .map_err(|e| transport_err("GET", &url, e))?;
            let index: Index = serde_json::from_slice(&bytes)
                .map_err(|e| RegistryError::Invalid(format!("referrers of {digest}: {e}")))?;
            Ok(Some(
                index
                    .manifests
                    .into_iter()
                    .filter(|d| artifact_type_of(d) == Some(artifact_type))
                    .collect(),
            ))
        })
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
}

/// The `artifactType` a descriptor carries (OCI 1.1), if any.
pub fn artifact_type_of(d: &oci::Descriptor) -> Option<&str> {
    d.extra.get("artifactType").and_then(|v| v.as_str())
}
