//! `strata snapshotter`: containerd's proxy snapshotter, with strata layers mounted lazily by
//! the node daemon (started on demand, like every other command's).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use strata_fs::service::protocol::Request;
use strata_fs::service::{MountRequest, RegistryOptions};
use strata_snapshotter::cri::{CriCredentials, CriProxy};
use strata_snapshotter::remote::{LayerMounter, RemoteLayer};

use super::daemon::{self, DaemonSettings};
use crate::GlobalArgs;

#[derive(clap::Args)]
pub struct SnapshotterArgs {
    /// The socket containerd's `[proxy_plugins.strata]` names.
    #[arg(long, default_value = "/run/strata/snapshotter.sock")]
    pub address: PathBuf,
    /// Never mount layers lazily: containerd unpacks every layer (an overlayfs snapshotter).
    #[arg(long)]
    pub no_lazy: bool,
    /// Do not fetch the rest of a lazily mounted layer in the background.
    #[arg(long)]
    pub no_prefetch: bool,
    /// Kernel readahead of each lazily mounted layer, in KiB. Small, because a container's
    /// start pages executables and libraries in here and there and every readahead page of a
    /// lazy layer is fetched; reads of 128 KiB and more still go to the daemon whole.
    #[arg(long, default_value_t = 16)]
    pub read_ahead_kb: u32,
    /// Also serve the CRI image service on this socket, forwarded to containerd, so that the
    /// credentials the kubelet pulls with (pull secrets) reach lazy layers: point the kubelet's
    /// `--image-service-endpoint` here.
    #[arg(long, value_name = "SOCK")]
    pub cri_image_proxy: Option<PathBuf>,
    /// containerd's socket, where the CRI image-service proxy forwards to.
    #[arg(
        long,
        value_name = "SOCK",
        default_value = "/run/containerd/containerd.sock"
    )]
    pub cri_upstream: PathBuf,
    #[command(flatten)]
    pub registry: super::registry::RegistryArgs,
    /// Node-wide settings, used when this command starts the daemon.
    #[command(flatten)]
    pub daemon: DaemonSettings,
}

/// Layers mounted by the node daemon of `--root`.
struct DaemonLayers {
    global: GlobalArgs,
    settings: DaemonSettings,
    registry: RegistryOptions,
    prefetch: bool,
    read_ahead_kb: u32,
    /// What the CRI image-service proxy saw the kubelet pull with.
    creds: Arc<CriCredentials>,
}

impl LayerMounter for DaemonLayers {
    fn mount(&self, layer: &RemoteLayer, dir: &Path) -> Result<(), String> {
        let mut req = MountRequest::new(layer.image.clone(), dir);
        req.layer = Some(layer.layer.clone());
        req.setuid = true;
        req.prefetch = self.prefetch;
        req.read_ahead_kb = self.read_ahead_kb;
        req.registry = self.registry.clone();
        req.registry.passed = self.creds.lookup(&layer.image);
        daemon::call(&self.global, &self.settings, &Request::Mount(Box::new(req)))
            .map(|_| ())
            .map_err(|e| format!("{e:#}"))
    }

    fn chain_id(&self, layer: &RemoteLayer) -> Result<String, String> {
        let store = strata_fs::store::Store::open(&self.global.root).map_err(|e| e.to_string())?;
        let record = store.resolve(&layer.image).map_err(|e| e.to_string())?;
        let manifest = store
            .manifest(&record.descriptor.digest)
            .map_err(|e| e.to_string())?;
        let config: serde_json::Value = serde_json::from_slice(
            &store
                .read_blob(&manifest.config.digest)
                .map_err(|e| e.to_string())?,
        )
        .map_err(|e| format!("config of {}: {e}", layer.image))?;
        let diff_ids = strata_snapshotter::remote::diff_ids(&config);
        let at = manifest
            .layers
            .iter()
            .position(|l| l.digest == layer.layer)
            .filter(|&i| i < diff_ids.len())
            .ok_or_else(|| {
                format!(
                    "{} has no layer {} with a diff ID",
                    layer.image, layer.layer
                )
            })?;
        strata_snapshotter::remote::chain_ids(&diff_ids[..=at])
            .pop()
            .ok_or_else(|| "no chain ID".to_string())
    }

    fn is_local(&self, layer: &RemoteLayer) -> bool {
        use strata_fs::image::{has_toc, is_strata_layer};
        let Ok(store) = strata_fs::store::Store::open(&self.global.root) else {
            return false;
        };
        let Ok(record) = store.resolve(&layer.image) else {
            return false;
        };
        let Ok(manifest) = store.manifest(&record.descriptor.digest) else {
            return false;
        };
        let Some(at) = manifest.layers.iter().position(|l| l.digest == layer.layer) else {
            return false;
        };
        // This layer and every one below it (a layer that lacks parent directories takes them
        // from the layers below) are strata layers whose TOCs are here.
        manifest.layers[..=at]
            .iter()
            .all(|l| is_strata_layer(l) && has_toc(&store, l))
    }

    fn unmount(&self, dir: &Path) -> Result<(), String> {
        let req = Request::Unmount {
            mountpoint: dir.to_path_buf(),
            lazy: true,
        };
        daemon::call_running(&self.global, &req)
            .map(|_| ())
            .map_err(|e| format!("{e:#}"))
    }
}

pub fn serve(g: &GlobalArgs, a: SnapshotterArgs) -> anyhow::Result<()> {
    let creds = Arc::new(CriCredentials::default());
    let layers: Option<Arc<dyn LayerMounter>> = (!a.no_lazy).then(|| {
        Arc::new(DaemonLayers {
            global: g.clone(),
            settings: a.daemon.clone(),
            registry: a.registry.options(),
            prefetch: !a.no_prefetch,
            read_ahead_kb: a.read_ahead_kb,
            creds: creds.clone(),
        }) as Arc<dyn LayerMounter>
    });
    if let Some(listen) = &a.cri_image_proxy {
        if listen == &a.cri_upstream || listen == &a.address {
            anyhow::bail!(
                "--cri-image-proxy {} must differ from --cri-upstream and --address",
                listen.display()
            );
        }
    }
    let cri = a.cri_image_proxy.map(|listen| CriProxy {
        listen,
        upstream: a.cri_upstream,
        creds,
    });
    strata_snapshotter::server::serve(&g.root.join("snapshotter"), &a.address, layers, cri)
}
