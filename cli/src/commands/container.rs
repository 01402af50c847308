//! `strata run`, `ps`, `rm`: containers on lazily mounted images. A container's root is a
//! writable view (kernel overlayfs over the lazy mount) that the node daemon mounts; the OCI
//! runtime (`runc`, or `--runtime`) runs it in the foreground.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};
use strata_builder::container::{default_name, hosts_file, ContainerRecord, Containers};
use strata_builder::runtime::{self, ImageProcess, SpecOptions, Volume};
use strata_fs::service::protocol::Request;
use strata_fs::service::MountRequest;

use super::daemon::{self, DaemonSettings};
use super::open_store;
use crate::GlobalArgs;

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum Network {
    /// The host's network namespace.
    Host,
    /// A network namespace of its own with only loopback.
    None,
}

#[derive(clap::Args)]
pub struct RunArgs {
    /// Keep standard input open.
    #[arg(short = 'i', long)]
    pub interactive: bool,
    /// Give the container a terminal.
    #[arg(short = 't', long)]
    pub tty: bool,
    /// Remove the container (its writable layer too) when it exits.
    #[arg(long)]
    pub rm: bool,
    /// Name of the container (default `strata_` and the start of its id).
    #[arg(long)]
    pub name: Option<String>,
    /// Environment variable `KEY=VALUE` (or `KEY`: this process's value); repeatable.
    #[arg(short = 'e', long = "env")]
    pub env: Vec<String>,
    /// File of `KEY=VALUE` lines; repeatable.
    #[arg(long)]
    pub env_file: Vec<PathBuf>,
    /// Working directory inside the container.
    #[arg(short = 'w', long)]
    pub workdir: Option<String>,
    /// USER[:GROUP] (names or ids) to run as.
    #[arg(short = 'u', long)]
    pub user: Option<String>,
    /// Replace the image's ENTRYPOINT ("" clears it).
    #[arg(long)]
    pub entrypoint: Option<String>,
    /// Bind mount HOST:CONTAINER[:ro]; repeatable.
    #[arg(short = 'v', long = "volume")]
    pub volumes: Vec<String>,
    /// Network of the container.
    #[arg(long, value_enum, default_value = "host")]
    pub network: Network,
    /// Host name inside the container (default: the start of its id).
    #[arg(long)]
    pub hostname: Option<String>,
    /// OCI runtime to run the container with.
    #[arg(long, default_value = "runc")]
    pub runtime: PathBuf,
    #[command(flatten)]
    pub registry: super::registry::RegistryArgs,
    #[command(flatten)]
    pub daemon: DaemonSettings,
    /// Image to run.
    pub image: String,
    /// Command and arguments (replace the image's CMD).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub command: Vec<String>,
}

/// Finds an executable by name in `PATH`, or checks a path.
fn find_program(p: &Path) -> Option<PathBuf> {
    if p.components().count() > 1 {
        return p.is_file().then(|| p.to_path_buf());
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(p))
            .find(|c| c.is_file())
    })
}

fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// `strata run`: create a container from an image and run it in the foreground; the exit code
/// is the container's.
pub fn run(g: &GlobalArgs, a: RunArgs) -> anyhow::Result<()> {
    // Everything that can be checked before anything is created.
    let runtime = find_program(&a.runtime)
        .with_context(|| format!("OCI runtime {} not found", a.runtime.display()))?;
    let volumes: Vec<Volume> = a
        .volumes
        .iter()
        .map(|v| v.parse())
        .collect::<Result<_, _>>()?;
    let mut env = Vec::new();
    for f in &a.env_file {
        let text =
            std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
        env.extend(
            text.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .map(str::to_string),
        );
    }
    env.extend(a.env.iter().cloned());
    let store = open_store(g)?;
    let containers = Containers::new(&store);
    if let Some(n) = &a.name {
        if containers.name_taken(n) {
            bail!("the container name {n:?} is already in use");
        }
    }
    let (id, dir) = containers.create_dir()?;
    let rootfs = dir.rootfs();
    // From here on a failure removes what was made: no half-created container.
    let cleanup = |g: &GlobalArgs| {
        let _ = daemon::call_running(
            g,
            &Request::Unmount {
                mountpoint: rootfs.clone(),
                lazy: true,
            },
        );
        let _ = containers.remove_dir(&id);
    };
    let prepared = (|| -> anyhow::Result<(ContainerRecord, PathBuf)> {
        let mut req = MountRequest::new(a.image.clone(), rootfs.clone());
        req.upper = Some(dir.layer());
        req.setuid = true;
        req.registry = a.registry.options();
        let info = daemon::call(g, &a.daemon, &Request::Mount(Box::new(req)))
            .with_context(|| format!("mounting {}", a.image))?;
        let manifest = info["manifest"].as_str().unwrap_or_default().to_string();
        let m = store.manifest(&manifest)?;
        let config: serde_json::Value = serde_json::from_slice(&store.read_blob(&m.config.digest)?)
            .context("the image config")?;
        let image = ImageProcess::from_config(&config);
        let args = runtime::process_args(&image, a.entrypoint.as_deref(), &a.command)?;
        let read = |p: &str| std::fs::read_to_string(rootfs.join(p)).unwrap_or_default();
        let user_spec = a.user.clone().unwrap_or_else(|| image.user.clone());
        let user = runtime::resolve_user(&user_spec, &read("etc/passwd"), &read("etc/group"))?;
        let hostname = a.hostname.clone().unwrap_or_else(|| id[..12].to_string());
        let etc = [
            ("hosts", hosts_file(&hostname)),
            ("hostname", format!("{hostname}\n")),
            (
                "resolv.conf",
                std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default(),
            ),
        ];
        let mut etc_files = Vec::new();
        for (name, body) in etc {
            let path = dir.etc_file(name);
            std::fs::write(&path, body).with_context(|| format!("writing {}", path.display()))?;
            etc_files.push((path, PathBuf::from("/etc").join(name)));
        }
        let spec = runtime::container_spec(&SpecOptions {
            rootfs: rootfs.clone(),
            env: runtime::environment(&image.env, &env, &hostname, &user.home, a.tty),
            cwd: a
                .workdir
                .clone()
                .unwrap_or_else(|| image.working_dir.clone()),
            args: args.clone(),
            user,
            hostname,
            tty: a.tty,
            host_network: matches!(a.network, Network::Host),
            etc_files,
            volumes,
        })?;
        let mount_points: Vec<PathBuf> = spec
            .mounts()
            .iter()
            .flatten()
            .map(|m| m.destination().clone())
            .collect();
        let bundle = dir.bundle();
        std::fs::write(
            bundle.join("config.json"),
            serde_json::to_vec_pretty(&spec)?,
        )
        .context("writing the runtime bundle")?;
        let record = ContainerRecord {
            id: id.clone(),
            name: a.name.clone().unwrap_or_else(|| default_name(&id)),
            image: a.image.clone(),
            manifest,
            command: args,
            created: now_rfc3339(),
            status: "running".into(),
            exit_code: None,
            auto_remove: a.rm,
            mount_points,
        };
        containers.save(&record)?;
        Ok((record, bundle))
    })();
    let (mut record, bundle) = match prepared {
        Ok(p) => p,
        Err(e) => {
            cleanup(g);
            return Err(e);
        }
    };
    let status = Command::new(&runtime)
        .arg("--root")
        .arg(containers.runtime_root())
        .arg("run")
        .arg("--bundle")
        .arg(&bundle)
        .arg(&id)
        .stdin(if a.interactive || a.tty {
            std::process::Stdio::inherit()
        } else {
            std::process::Stdio::null()
        })
        .status()
        .with_context(|| format!("starting {}", runtime.display()));
    let code = match &status {
        Ok(s) => s
            .code()
            .unwrap_or_else(|| 128 + std::os::unix::process::ExitStatusExt::signal(s).unwrap_or(0)),
        Err(_) => 125,
    };
    record.status = "exited".into();
    record.exit_code = Some(code);
    if a.rm {
        let _ = Command::new(&runtime)
            .arg("--root")
            .arg(containers.runtime_root())
            .args(["delete", "--force", &id])
            .output();
        cleanup(g);
    } else {
        containers.save(&record)?;
    }
    status?;
    if code != 0 {
        std::process::exit(code);
    }
    Ok(())
}

#[derive(clap::Args)]
pub struct PsArgs {
    /// Show every container, not only running ones.
    #[arg(short = 'a', long)]
    pub all: bool,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// `strata ps`: containers, newest first.
pub fn ps(g: &GlobalArgs, a: PsArgs) -> anyhow::Result<()> {
    let store = open_store(g)?;
    let list: Vec<ContainerRecord> = Containers::new(&store)
        .list()
        .into_iter()
        .filter(|r| a.all || r.status == "running")
        .collect();
    if a.json {
        println!("{}", serde_json::to_string_pretty(&list)?);
        return Ok(());
    }
    println!(
        "{:<14} {:<40} {:<30} {:<26} {:<12} NAMES",
        "CONTAINER ID", "IMAGE", "COMMAND", "CREATED", "STATUS"
    );
    for r in list {
        let status = match (r.status.as_str(), r.exit_code) {
            ("exited", Some(c)) => format!("Exited ({c})"),
            (s, _) => s.to_string(),
        };
        let mut cmd = r.command.join(" ");
        if cmd.len() > 28 {
            cmd.truncate(27);
            cmd.push('…');
        }
        println!(
            "{:<14} {:<40} {:<30} {:<26} {:<12} {}",
            &r.id[..12],
            r.image,
            format!("\"{cmd}\""),
            r.created,
            status,
            r.name
        );
    }
    Ok(())
}

#[derive(clap::Args)]
pub struct RmArgs {
    /// Kill a running container first.
    #[arg(short = 'f', long)]
    pub force: bool,
    /// OCI runtime the containers run with.
    #[arg(long, default_value = "runc")]
    pub runtime: PathBuf,
    /// Containers (names, ids or unique id prefixes).
    #[arg(required = true)]
    pub containers: Vec<String>,
}

/// `strata rm`: remove containers, their mounts and writable layers.
pub fn rm(g: &GlobalArgs, a: RmArgs) -> anyhow::Result<()> {
    let store = open_store(g)?;
    let containers = Containers::new(&store);
    let mut failed = false;
    for key in &a.containers {
        let result = (|| -> anyhow::Result<()> {
            let r = containers.find(key)?;
            if r.status == "running" && !a.force {
                bail!("container {} is running: stop it first or use -f", r.name);
            }
            if let Some(runtime) = find_program(&a.runtime) {
                let _ = Command::new(runtime)
                    .arg("--root")
                    .arg(containers.runtime_root())
                    .args(["delete", "--force", &r.id])
                    .output();
            }
            let rootfs = containers.dir(&r.id).rootfs();
            if strata_fs::service::is_mount_point(&rootfs) {
                daemon::call_running(
                    g,
                    &Request::Unmount {
                        mountpoint: rootfs,
                        lazy: true,
                    },
                )?;
            }
            containers.remove_dir(&r.id)?;
            println!("{}", r.name);
            Ok(())
        })();
        if let Err(e) = result {
            eprintln!("strata: error: {e:#}");
            failed = true;
        }
    }
    if failed {
        std::process::exit(1);
    }
    Ok(())
}
