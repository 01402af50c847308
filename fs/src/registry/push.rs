//! Pushing: blob uploads (chunked), cross-repository blob mounts and manifests.

use std::io::Read;

use ureq::http::StatusCode;

use super::hosts::Endpoint;
use super::request::{encode, io_err, location, status_error, Body};
use super::{Registry, RegistryError, Result};
use crate::reference::Reference;

impl Registry {
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
