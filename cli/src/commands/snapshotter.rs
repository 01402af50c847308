//! `strata snapshotter`: containerd's proxy snapshotter, with strata layers mounted lazily by
//! the node daemon (started on demand, like every other command's).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use strata_fs::service::protocol::Request;
use strata_fs::service::{MountRequest, RegistryOptions};
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
}

impl LayerMounter for DaemonLayers {
    fn mount(&self, layer: &RemoteLayer, dir: &Path) -> Result<(), String> {
        let mut req = MountRequest::new(layer.image.clone(), dir);
        req.layer = Some(layer.layer.clone());
        req.setuid = true;
        req.prefetch = self.prefetch;
        req.registry = self.registry.clone();
        daemon::call(&self.global, &self.settings, &Request::Mount(Box::new(req)))
            .map(|_| ())
            .map_err(|e| format!("{e:#}"))
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
    let layers: Option<Arc<dyn LayerMounter>> = (!a.no_lazy).then(|| {
        Arc::new(DaemonLayers {
            global: g.clone(),
            settings: a.daemon.clone(),
            registry: a.registry.options(),
            prefetch: !a.no_prefetch,
        }) as Arc<dyn LayerMounter>
    });
    strata_snapshotter::server::serve(&g.root.join("snapshotter"), &a.address, layers)
}
