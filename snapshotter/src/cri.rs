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
    /// The username and password (or identity token) this config carries, if any.
    fn credential(&self) -> Option<(String, String)> {
        if !self.identity_token.is_empty() {
            return Some((
                strata_fs::registry::auth::IDENTITY_TOKEN_USER.into(),
                self.identity_token.clone(),
            ));
        }
        if !self.username.is_empty() {
            return Some((self.username.clone(), self.password.clone()));
        }
        if !self.auth.is_empty() {
            let raw = base64::engine::general_purpose::STANDARD
                .decode(self.auth.trim())
                .ok()?;
            let text = String::from_utf8(raw).ok()?;
            let (user, pass) = text.split_once(':')?;
            return Some((user.to_string(), pass.to_string()));
        }
        None
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
}

fn repo_key(r: &Reference) -> String {
    format!("{}/{}", r.registry, r.repository)
}

impl CriCredentials {
    /// Remembers the credential of a `PullImage` request (its raw protobuf bytes).
    fn note_pull(&self, request: &[u8]) {
        let Ok(req) = PullImageRequest::decode(request) else {
            return;
        };
        let (Some(image), Some(auth)) = (req.image, req.auth) else {
            return;
        };
        let Ok(r) = Reference::parse(&image.image) else {
            return;
        };
        let Some((username, password)) = auth.credential() else {
            if !auth.registry_token.is_empty() {
                tracing::warn!(image = %r, "a CRI registry token cannot be used for lazy pulls (the layers fall back to containerd)");
            }
            return;
        };
        let cred = PassedCredential {
            host: r.registry.clone(),
            username,
            password,
        };
        let mut map = self.by_repo.lock().unwrap_or_else(|e| e.into_inner());
        if map.len() >= MAX_REMEMBERED {
            if let Some(oldest) = map
                .iter()
                .min_by_key(|(_, (_, at))| *at)
                .map(|(k, _)| k.clone())
            {
                map.remove(&oldest);
            }
        }
        tracing::debug!(image = %r, "remembering the credentials the CRI pulled with");
        map.insert(repo_key(&r), (cred, Instant::now()));
    }

    /// The credential the kubelet last pulled `image`'s repository with; else the latest one
    /// for its registry.
    pub fn lookup(&self, image: &str) -> Option<PassedCredential> {
        let r = Reference::parse(image).ok()?;
        let map = self.by_repo.lock().unwrap_or_else(|e| e.into_inner());
        map.get(&repo_key(&r))
            .or_else(|| {
                map.values()
                    .filter(|(c, _)| c.host == r.registry)
                    .max_by_key(|(_, at)| *at)
            })
            .map(|(c, _)| c.clone())
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
            if path.path().ends_with("/PullImage") {
                proxy.creds.note_pull(&body);
            }
            let mut client = tonic::client::Grpc::new(proxy.upstream.clone());
            client
                .ready()
                .await
                .map_err(|e| Status::unavailable(format!("containerd's CRI socket: {e}")))?;
            let forwarded =
                tonic::Request::from_parts(metadata, tonic::Extensions::default(), body);
            client.unary(forwarded, path, RawCodec).await
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
            let mut grpc = tonic::server::Grpc::new(RawCodec);
            Ok(grpc.unary(method, req).await)
        })
    }
}
