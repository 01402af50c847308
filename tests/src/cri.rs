//! A client of the CRI image service (the kubelet's side of containerd's CRI plugin), for
//! pulling images as Kubernetes does.

#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod api {
    tonic::include_proto!("runtime.v1");
}

use std::path::Path;

use anyhow::Result;

/// Pulls `image` through the CRI plugin of the containerd at `socket`; answers the image ref
/// containerd reports.
pub fn pull(socket: &Path, image: &str) -> Result<String> {
    pull_with_auth(socket, image, None)
}

/// [`pull`] with a username and password, as the kubelet passes a pull secret.
pub fn pull_with_auth(socket: &Path, image: &str, user: Option<(&str, &str)>) -> Result<String> {
    let auth = user.map(|(u, p)| api::AuthConfig {
        username: u.to_string(),
        password: p.to_string(),
        ..Default::default()
    });
    call(socket, |mut c| {
        let image = image.to_string();
        async move {
            let r = c
                .pull_image(api::PullImageRequest {
                    image: Some(api::ImageSpec {
                        image,
                        annotations: Default::default(),
                    }),
                    auth,
                })
                .await?;
            Ok(r.into_inner().image_ref)
        }
    })
}

/// Removes `image` through the CRI plugin.
pub fn remove(socket: &Path, image: &str) -> Result<()> {
    call(socket, |mut c| {
        let image = image.to_string();
        async move {
            c.remove_image(api::RemoveImageRequest {
                image: Some(api::ImageSpec {
                    image,
                    annotations: Default::default(),
                }),
            })
            .await?;
            Ok(())
        }
    })
}

type Client = api::image_service_client::ImageServiceClient<tonic::transport::Channel>;

fn call<T, F, Fut>(socket: &Path, f: F) -> Result<T>
where
    F: FnOnce(Client) -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let path = socket.to_path_buf();
    rt.block_on(async move {
        let channel = tonic::transport::Endpoint::try_from("http://containerd.sock")?
            .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
                let path = path.clone();
                async move {
                    let s = tokio::net::UnixStream::connect(path).await?;
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(s))
                }
            }))
            .await?;
        f(Client::new(channel)).await
    })
}
