//! A proxy of the CRI image service that remembers the credentials the kubelet pulls with.
//!
//! containerd never hands a snapshotter the credentials the CRI passes with `PullImage` (a
//! Kubernetes pull secret): the snapshotter sees only the image reference in the layer labels.
//! So, as the stargz snapshotter does, the kubelet talks to this proxy
//! (`--image-service-endpoint`), which forwards every `runtime.v1.ImageService` call to
//! containerd's CRI socket byte for byte, and on `PullImage` keeps the request's `AuthConfig` in
//! memory, keyed by registry and repository. The snapshotter's layer mounts for that image then
//! reach the registry with it. Nothing is written to disk.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Instant;

use base64::Engine as _;
use bytes::{Buf, BufMut, Bytes};
use prost::Message as _;
use strata_fs::reference::Reference;
use strata_fs::service::PassedCredential;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::{http, BoxFuture, Service, StdError};
use tonic::transport::{Channel, Endpoint, Uri};
use tonic::Status;

/// How many image repositories' credentials are remembered (the oldest go first).
const MAX_REMEMBERED: usize = 1024;

/// The part of the CRI's `PullImageRequest` the proxy reads (field numbers of
/// k8s.io/cri-api runtime/v1 api.proto); the request is forwarded as it came.
#[derive(Clone, PartialEq, prost::Message)]
struct PullImageRequest {
    #[prost(message, optional, tag = "1")]
    image: Option<ImageSpec>,
    #[prost(message, optional, tag = "2")]
    auth: Option<AuthConfig>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct ImageSpec {
    #[prost(string, tag = "1")]
    image: String,
}

#[derive(Clone, PartialEq, prost::Message)]
#[prost(skip_debug)]
struct AuthConfig {
    #[prost(string, tag = "1")]
    username: String,
    #[prost(string, tag = "2")]
    password: String,
    #[prost(string, tag = "3")]
    auth: String,
    #[prost(string, tag = "4")]
    server_address: String,
    #[prost(string, tag = "5")]
    identity_token: String,
    #[prost(string, tag = "6")]
    registry_token: String,
}

impl std::fmt::Debug for AuthConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AuthConfig({}, <redacted>)", self.username)
    }
}

impl AuthConfig {
    /// The username and password (or identity token) this config carries for `registry`, in
    /// containerd's order (username, identity token, `auth`); none when `server_address` names
    /// another host (containerd withholds the credential then too).
    fn credential(&self, registry: &str) -> Option<(String, String)> {
        if !self.server_address.is_empty() && server_host(&self.server_address) != registry {
            return None;
        }
        if !self.username.is_empty() {
            return Some((self.username.clone(), self.password.clone()));
        }
        if !self.identity_token.is_empty() {
            return Some((
                strata_fs::registry::auth::IDENTITY_TOKEN_USER.into(),
                self.identity_token.clone(),
            ));
        }
        if !self.auth.is_empty() {
            let raw = base64::engine::general_purpose::STANDARD
                .decode(self.auth.trim())
                .ok()?;
            let text = String::from_utf8(raw).ok()?;
            let (user, pass) = text.split_once(':')?;
            return Some((user.to_string(), pass.trim_end_matches('\0').to_string()));
        }
        None
    }
}

/// The registry host a CRI `server_address` names (`https://host/v1/` → `host`), with Docker
/// Hub's aliases folded into `docker.io` as image references fold them.
fn server_host(address: &str) -> String {
    let rest = address
        .strip_prefix("https://")
        .or_else(|| address.strip_prefix("http://"))
        .unwrap_or(address);
    let host = rest
        .split('/')
        .next()
        .unwrap_or_default()
        .to_ascii_lowercase();
    match host.as_str() {
        "index.docker.io" | "registry-1.docker.io" | "registry.hub.docker.com" => {
            "docker.io".into()
        }
        _ => host,
    }
}

/// Where the proxy listens and what it forwards to.
pub struct CriProxy {
    /// The socket the kubelet's `--image-service-endpoint` names.
    pub listen: PathBuf,
    /// containerd's socket (its CRI plugin).
    pub upstream: PathBuf,
    pub creds: Arc<CriCredentials>,
}

/// Credentials the kubelet pulled with, by `registry/repository`.
#[derive(Default)]
pub struct CriCredentials {
    by_repo: Mutex<HashMap<String, (PassedCredential, Instant)>>,
    /// Credentials of pulls under way (containerd prepares the layers inside the pull), by
    /// repository, with the id of their pull.
    pulling: Mutex<HashMap<String, (u64, PassedCredential)>>,
    next_pull: std::sync::atomic::AtomicU64,
}

fn repo_key(r: &Reference) -> String {
    format!("{}/{}", r.registry, r.repository)
}

/// The repository and credential of a `PullImage` request, to remember once the pull succeeds.
pub struct PendingCredential {
    key: String,
    cred: PassedCredential,
}

impl CriCredentials {
    /// The credential of a `PullImage` request (its raw protobuf bytes), if it carries one.
    fn parse_pull(request: &[u8]) -> Option<PendingCredential> {
        let req = PullImageRequest::decode(request).ok()?;
        let (image, auth) = (req.image?, req.auth?);
        let r = Reference::parse(&image.image).ok()?;
        let Some((username, password)) = auth.credential(&r.registry) else {
            if !auth.registry_token.is_empty() {
                tracing::warn!(image = %r, "a CRI registry token cannot be used for lazy pulls (the layers fall back to containerd)");
            }
            return None;
        };
        Some(PendingCredential {
            key: repo_key(&r),
            cred: PassedCredential {
                host: r.registry.clone(),
                username,
                password,
            },
        })
    }

    /// Lends a pull's credential to the layer mounts of its repository while it runs; answers
    /// the pull's id for [`Self::finish`].
    fn start(&self, pending: &PendingCredential) -> u64 {
        let id = self
            .next_pull
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.pulling
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(pending.key.clone(), (id, pending.cred.clone()));
        id
    }

    /// Ends pull `id`: its credential is remembered if containerd pulled with it (a failed
    /// pull's credential may be wrong: the previous one stays).
    fn finish(&self, id: u64, pending: PendingCredential, pulled: bool) {
        {
            let mut pulling = self.pulling.lock().unwrap_or_else(|e| e.into_inner());
            if pulling.get(&pending.key).is_some_and(|(i, _)| *i == id) {
                pulling.remove(&pending.key);
            }
        }
        if pulled {
            self.remember(pending);
        }
    }

    /// Remembers a credential containerd pulled with successfully.
    fn remember(&self, pending: PendingCredential) {
        let PendingCredential { key, cred } = pending;
        let mut map = self.by_repo.lock().unwrap_or_else(|e| e.into_inner());
        if map.len() >= MAX_REMEMBERED && !map.contains_key(&key) {
            if let Some(oldest) = map
                .iter()
                .min_by_key(|(_, (_, at))| *at)
                .map(|(k, _)| k.clone())
            {
                map.remove(&oldest);
            }
        }
        tracing::debug!(repository = %key, "remembering the credentials the CRI pulled with");
        map.insert(key, (cred, Instant::now()));
    }

    /// The credential the kubelet last pulled `image`'s repository with successfully. Only that
    /// repository's: a pod's pull secret is never lent to another image on the same registry.
    pub fn lookup(&self, image: &str) -> Option<PassedCredential> {
        let r = Reference::parse(image).ok()?;
        let key = repo_key(&r);
        if let Some((_, c)) = self
            .pulling
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
        {
            return Some(c.clone());
        }
        let map = self.by_repo.lock().unwrap_or_else(|e| e.into_inner());
        map.get(&key).map(|(c, _)| c.clone())
    }
}

/// Passes protobuf messages through as bytes.
#[derive(Clone, Copy, Default)]
struct RawCodec;

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = RawCodec;
    type Decoder = RawCodec;
    fn encoder(&mut self) -> RawCodec {
        RawCodec
    }
    fn decoder(&mut self) -> RawCodec {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Bytes;
    type Error = Status;
    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put(item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Bytes;
    type Error = Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        let n = src.remaining();
        Ok(Some(src.copy_to_bytes(n)))
    }
}

/// The CRI image service, forwarded to containerd.
#[derive(Clone)]
pub struct ImageServiceProxy {
    upstream: Channel,
    creds: Arc<CriCredentials>,
}

impl ImageServiceProxy {
    /// A proxy to the CRI socket at `upstream` (connected on first use).
    pub fn new(upstream: &Path, creds: Arc<CriCredentials>) -> anyhow::Result<Self> {
        let path: PathBuf = upstream.to_path_buf();
        // The URI is never dialled: the connector opens the unix socket.
        let upstream = Endpoint::try_from("http://cri.sock")?.connect_with_connector_lazy(
            tower::service_fn(move |_: Uri| {
                let path = path.clone();
                async move {
                    let s = tokio::net::UnixStream::connect(path).await?;
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(s))
                }
            }),
        );
        Ok(ImageServiceProxy { upstream, creds })
    }
}

impl tonic::server::NamedService for ImageServiceProxy {
    const NAME: &'static str = "runtime.v1.ImageService";
}

/// One call, forwarded.
struct Forward {
    proxy: ImageServiceProxy,
    path: http::uri::PathAndQuery,
}

impl tonic::server::UnaryService<Bytes> for Forward {
    type Response = Bytes;
    type Future = BoxFuture<tonic::Response<Bytes>, Status>;

    fn call(&mut self, request: tonic::Request<Bytes>) -> Self::Future {
        let proxy = self.proxy.clone();
        let path = self.path.clone();
        Box::pin(async move {
            let (metadata, _, body) = request.into_parts();
            let pending = path
                .path()
                .ends_with("/PullImage")
                .then(|| CriCredentials::parse_pull(&body))
                .flatten();
            // The kubelet's limits (16 MiB) and more: ListImages of a busy node is large.
            let mut client = tonic::client::Grpc::new(proxy.upstream.clone())
                .max_decoding_message_size(usize::MAX)
                .max_encoding_message_size(usize::MAX);
            client
                .ready()
                .await
                .map_err(|e| Status::unavailable(format!("containerd's CRI socket: {e}")))?;
            let forwarded =
                tonic::Request::from_parts(metadata, tonic::Extensions::default(), body);
            let pull = pending.as_ref().map(|p| proxy.creds.start(p));
            let answer = client.unary(forwarded, path, RawCodec).await;
            if let (Some(id), Some(p)) = (pull, pending) {
                proxy.creds.finish(id, p, answer.is_ok());
            }
            answer
        })
    }
}

impl<B> Service<http::Request<B>> for ImageServiceProxy
where
    B: tonic::codegen::Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let path = req
            .uri()
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
        let method = Forward {
            proxy: self.clone(),
            path,
        };
        Box::pin(async move {
            // Every ImageService call is unary.
            let mut grpc = tonic::server::Grpc::new(RawCodec)
                .max_decoding_message_size(usize::MAX)
                .max_encoding_message_size(usize::MAX);
            Ok(grpc.unary(method, req).await)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pull(image: &str, auth: AuthConfig) -> Vec<u8> {
        PullImageRequest {
            image: Some(ImageSpec {
                image: image.into(),
            }),
            auth: Some(auth),
        }
        .encode_to_vec()
    }

    fn user(u: &str, p: &str) -> AuthConfig {
        AuthConfig {
            username: u.into(),
            password: p.into(),
            ..Default::default()
        }
    }

    #[test]
    fn credentials_follow_the_repository_and_successful_pulls() {
        let c = CriCredentials::default();
        let p = CriCredentials::parse_pull(&pull("reg.example:5000/team/app:v1", user("a", "1")));
        assert!(c.lookup("reg.example:5000/team/app:v2").is_none());
        c.remember(p.unwrap());
        // A pull under way lends its credential; failed, the previous one is back.
        let bad = CriCredentials::parse_pull(&pull("reg.example:5000/team/app:v1", user("x", "9")));
        let bad = bad.unwrap();
        let id = c.start(&bad);
        assert_eq!(
            c.lookup("reg.example:5000/team/app:v1").unwrap().username,
            "x"
        );
        c.finish(id, bad, false);
        let got = c.lookup("reg.example:5000/team/app@sha256:0000000000000000000000000000000000000000000000000000000000000000");
        assert_eq!(
            got.map(|g| (g.host, g.username)),
            Some(("reg.example:5000".into(), "a".into()))
        );
        // Another repository of the same registry gets nothing.
        assert!(c.lookup("reg.example:5000/team/other:v1").is_none());
        // Docker Hub's short names are one repository.
        c.remember(CriCredentials::parse_pull(&pull("alpine", user("b", "2"))).unwrap());
        assert_eq!(
            c.lookup("docker.io/library/alpine:3").unwrap().username,
            "b"
        );
    }

    #[test]
    fn auth_configs_decode_as_containerd_reads_them() {
        let basic = AuthConfig {
            auth: base64::engine::general_purpose::STANDARD.encode("u:p\0"),
            ..Default::default()
        };
        assert_eq!(basic.credential("r"), Some(("u".into(), "p".into())));
        let token = AuthConfig {
            identity_token: "tok".into(),
            ..Default::default()
        };
        assert_eq!(
            token.credential("r").unwrap().0,
            strata_fs::registry::auth::IDENTITY_TOKEN_USER
        );
        // Username first, as containerd.
        let both = AuthConfig {
            identity_token: "tok".into(),
            ..user("u", "p")
        };
        assert_eq!(both.credential("r").unwrap().0, "u");
        // A server address naming another host withholds it.
        let elsewhere = AuthConfig {
            server_address: "https://other.example/v1/".into(),
            ..user("u", "p")
        };
        assert!(elsewhere.credential("reg.example").is_none());
        assert!(elsewhere.credential("other.example").is_some());
        let hub = AuthConfig {
            server_address: "https://index.docker.io/v1/".into(),
            ..user("u", "p")
        };
        assert!(hub.credential("docker.io").is_some());
        assert!(AuthConfig::default().credential("r").is_none());
    }
}
