//! `pull`, `push`, `login`, `logout`: talking to registries.

use std::io::{IsTerminal, Read};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context};
use strata_fs::reference::Reference;
use strata_fs::registry::auth::{docker_config_path, Credential, CredentialStore};
use strata_fs::registry::{Registry, RegistryConfig};
use strata_fs::transfer::{self, Progress};

use super::{human_bytes, open_store};
use crate::GlobalArgs;

/// Flags for commands that reach a registry.
#[derive(clap::Args, Clone, Debug)]
pub struct RegistryArgs {
    /// Registry host reached over plain HTTP (besides localhost and 127.0.0.0/8); repeatable.
    #[arg(
        long = "insecure-registry",
        env = "STRATA_INSECURE_REGISTRIES",
        value_delimiter = ','
    )]
    pub insecure: Vec<String>,
    /// Seconds a registry may stay silent before a request fails (then retried).
    #[arg(long, env = "STRATA_REGISTRY_TIMEOUT", default_value_t = 15)]
    pub registry_timeout: u64,
    /// Attempts per registry request (connection errors, 5xx and 429 are retried with backoff).
    #[arg(long, env = "STRATA_REGISTRY_ATTEMPTS", default_value_t = 3)]
    pub registry_attempts: u32,
    /// Directory of per-registry `HOST/hosts.toml` files (mirrors; containerd's format).
    #[arg(long, env = "STRATA_HOSTS_DIR", default_value = "/etc/strata/certs.d")]
    pub hosts_dir: std::path::PathBuf,
}

impl RegistryArgs {
    pub fn config(&self) -> RegistryConfig {
        let timeout = std::time::Duration::from_secs(self.registry_timeout.max(1));
        RegistryConfig {
            insecure_hosts: self.insecure.clone(),
            attempts: self.registry_attempts.max(1),
            connect_timeout: timeout,
            read_timeout: timeout,
            hosts_dir: self.hosts_dir.is_dir().then(|| self.hosts_dir.clone()),
            ..RegistryConfig::default()
        }
    }

    /// The same settings as a request to the daemon.
    pub fn options(&self) -> strata_fs::service::RegistryOptions {
        strata_fs::service::RegistryOptions {
            insecure: self.insecure.clone(),
            timeout_secs: self.registry_timeout.max(1),
            attempts: self.registry_attempts.max(1),
            hosts_dir: Some(
                std::path::absolute(&self.hosts_dir).unwrap_or_else(|_| self.hosts_dir.clone()),
            ),
            passed: None,
            passed_for: None,
        }
    }

    pub fn client(&self) -> anyhow::Result<Arc<Registry>> {
        let path = docker_config_path();
        let creds = CredentialStore::load(path.clone())
            .with_context(|| format!("reading credentials from {}", path.display()))?;
        Ok(Arc::new(Registry::new(self.config(), creds)))
    }
}

/// `--platform os/arch`, defaulting to the host's.
pub fn platform(p: Option<&str>) -> anyhow::Result<(String, String)> {
    match p {
        Some(p) => {
            let mut parts = p.split('/');
            match (parts.next(), parts.next()) {
                (Some(os), Some(arch)) if !os.is_empty() && !arch.is_empty() => {
                    Ok((os.to_string(), arch.to_string()))
                }
                _ => bail!("--platform must be OS/ARCH, e.g. linux/amd64"),
            }
        }
        None => {
            let (os, arch) = strata_fs::oci::host_platform();
            Ok((os.to_string(), arch.to_string()))
        }
    }
}

/// Shows transfer progress: a progress bar per blob on a terminal, plain lines otherwise.
pub fn progress_printer() -> impl FnMut(Progress<'_>) {
    let tty = std::io::stderr().is_terminal();
    let mut bar: Option<indicatif::ProgressBar> = None;
    let mut current = String::new();
    let mut size = 0u64;
    let mut moved = 0u64;
    move |p| match p {
        Progress::Blob {
            what,
            digest,
            size: s,
        } => {
            current = format!("{what} {}", &digest[..digest.len().min(19)]);
            size = s;
            moved = 0;
            if tty {
                let b = indicatif::ProgressBar::new(s);
                if let Ok(style) = indicatif::ProgressStyle::with_template(
                    "{msg:32} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}",
                ) {
                    b.set_style(style.progress_chars("=> "));
                }
                b.set_message(current.clone());
                bar = Some(b);
            }
        }
        Progress::Bytes(n) => {
            moved = n;
            if let Some(b) = &bar {
                b.set_position(n);
            }
        }
        Progress::Done { moved: m } => {
            let what = if m { "done" } else { "already there" };
            match bar.take() {
                Some(b) => b.finish_with_message(format!("{current}: {what}")),
                None => eprintln!("{current}: {what} ({})", human_bytes(size.max(moved))),
            }
        }
    }
}

#[derive(clap::Args)]
pub struct PullArgs {
    /// Image reference (`registry/repo:tag`, Docker defaults).
    pub reference: String,
    /// Download every layer, not just the metadata of lazy layers.
    #[arg(long)]
    pub all: bool,
    /// Platform to pick from a multi-platform image (OS/ARCH).
    #[arg(long)]
    pub platform: Option<String>,
    #[command(flatten)]
    pub registry: RegistryArgs,
}

pub fn pull(g: &GlobalArgs, a: PullArgs) -> anyhow::Result<()> {
    let r = Reference::parse(&a.reference)?;
    let store = open_store(g)?;
    let client = a.registry.client()?;
    let (os, arch) = platform(a.platform.as_deref())?;
    let start = Instant::now();
    let d = transfer::pull(
        &store,
        &client,
        &r,
        (&os, &arch),
        a.all,
        &mut progress_printer(),
    )
    .with_context(|| format!("pulling {r}"))?;
    println!(
        "pulled {r} ({}) in {:.2}s",
        d.digest,
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

#[derive(clap::Args)]
pub struct PushArgs {
    /// Local image to push.
    pub image: String,
    /// Destination reference (default: the image's own name).
    pub destination: Option<String>,
    #[command(flatten)]
    pub registry: RegistryArgs,
}

pub fn push(g: &GlobalArgs, a: PushArgs) -> anyhow::Result<()> {
    let store = open_store(g)?;
    let dest = match &a.destination {
        Some(d) => Reference::parse(d)?,
        None => store.resolve(&a.image)?.reference,
    };
    let client = a.registry.client()?;
    let start = Instant::now();
    transfer::push(&store, &client, &a.image, &dest, &mut progress_printer())
        .with_context(|| format!("pushing {} to {dest}", a.image))?;
    println!("pushed {dest} in {:.2}s", start.elapsed().as_secs_f64());
    Ok(())
}

#[derive(clap::Args)]
pub struct LoginArgs {
    /// Registry host (default docker.io).
    pub registry: Option<String>,
    /// Username.
    #[arg(short, long)]
    pub username: Option<String>,
    /// Read the password from standard input.
    #[arg(long)]
    pub password_stdin: bool,
    #[command(flatten)]
    pub args: RegistryArgs,
}

pub fn login(_g: &GlobalArgs, a: LoginArgs) -> anyhow::Result<()> {
    let host = a
        .registry
        .clone()
        .unwrap_or_else(|| "docker.io".to_string());
    let username = a.username.clone().context("--username is required")?;
    if !a.password_stdin {
        bail!("pass the password on standard input with --password-stdin");
    }
    let mut password = String::new();
    std::io::stdin()
        .read_to_string(&mut password)
        .context("reading the password")?;
    let password = password.trim_end_matches(['\n', '\r']).to_string();
    let cred = Credential { username, password };
    let path = docker_config_path();
    let store = CredentialStore::load(path.clone())?;
    // Check the credentials before saving them.
    let mut check = store.clone();
    check.insert(&host, cred.clone());
    let client = Registry::new(a.args.config(), check);
    client
        .ping(&host)
        .with_context(|| format!("logging in to {host}"))?;
    store
        .save(&host, Some(&cred))
        .with_context(|| format!("writing {}", path.display()))?;
    println!("Login Succeeded ({host}, saved in {})", path.display());
    Ok(())
}

#[derive(clap::Args)]
pub struct LogoutArgs {
    /// Registry host (default docker.io).
    pub registry: Option<String>,
}

pub fn logout(_g: &GlobalArgs, a: LogoutArgs) -> anyhow::Result<()> {
    let host = a.registry.unwrap_or_else(|| "docker.io".to_string());
    let path = docker_config_path();
    let store = CredentialStore::load(path.clone())?;
    store
        .save(&host, None)
        .with_context(|| format!("writing {}", path.display()))?;
    println!("Removed login credentials for {host}");
    Ok(())
}

#[derive(clap::Args)]
pub struct PushProfileArgs {
    /// Access profile recorded with `strata mount --record-profile`.
    pub profile: std::path::PathBuf,
    /// Image the profile belongs to: the profile is published as an OCI artifact whose subject
    /// is this image's manifest (found through the referrers API, or the `sha256-HEX` tag).
    pub reference: String,
    #[command(flatten)]
    pub registry: RegistryArgs,
}

pub fn push_profile(_g: &GlobalArgs, a: PushProfileArgs) -> anyhow::Result<()> {
    let r = Reference::parse(&a.reference)?;
    let data =
        std::fs::read(&a.profile).with_context(|| format!("reading {}", a.profile.display()))?;
    let client = a.registry.client()?;
    let (profile, subject) = transfer::push_profile(&client, &r, &data)
        .with_context(|| format!("publishing the profile of {r}"))?;
    println!("pushed profile {profile} for {r} ({subject})");
    Ok(())
}
