//! OCI runtime specs for containers and build steps, from an image config and `run` options,
//! with Docker's rules: the process from ENTRYPOINT and CMD (`--entrypoint` and trailing
//! arguments override them as `docker run` does), the image's environment plus `-e`, its working
//! directory and user (names resolved through the image's `/etc/passwd` and `/etc/group`),
//! Docker's default capabilities and masked/read-only paths, `/etc/hosts`, `/etc/hostname` and
//! `/etc/resolv.conf` bound from per-container files, and rlimits never above the caller's hard
//! limits (runc fails otherwise).

use std::path::{Path, PathBuf};

use oci_spec::runtime::{
    Capability, LinuxCapabilities, LinuxNamespaceType, Mount, PosixRlimitType, Spec, User,
};

/// Why a spec could not be made.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("no command specified: the image has no ENTRYPOINT or CMD and none was given")]
    NoCommand,
    #[error("unable to find user {0}: no matching entries in passwd file")]
    NoSuchUser(String),
    #[error("unable to find group {0}: no matching entries in group file")]
    NoSuchGroup(String),
    #[error("invalid volume {0:?}: expected HOST:CONTAINER[:ro|rw] with absolute paths")]
    BadVolume(String),
    #[error("building the runtime spec: {0}")]
    Spec(String),
}

/// The parts of an image config a container's process comes from.
#[derive(Clone, Debug, Default)]
pub struct ImageProcess {
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub env: Vec<String>,
    pub working_dir: String,
    pub user: String,
}

impl ImageProcess {
    /// Reads `config.Entrypoint`, `Cmd`, `Env`, `WorkingDir`, `User` of an image config.
    pub fn from_config(config: &serde_json::Value) -> Self {
        let c = &config["config"];
        let list = |v: &serde_json::Value| -> Vec<String> {
            v.as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|s| s.as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default()
        };
        ImageProcess {
            entrypoint: list(&c["Entrypoint"]),
            cmd: list(&c["Cmd"]),
            env: list(&c["Env"]),
            working_dir: c["WorkingDir"].as_str().unwrap_or("").to_string(),
            user: c["User"].as_str().unwrap_or("").to_string(),
        }
    }
}

/// The command line of a container, by Docker's rules: `--entrypoint` replaces the image's
/// ENTRYPOINT and drops its CMD (an empty one clears it); trailing arguments replace CMD.
pub fn process_args(
    image: &ImageProcess,
    entrypoint: Option<&str>,
    args: &[String],
) -> Result<Vec<String>, RuntimeError> {
    let (entry, cmd): (Vec<String>, Vec<String>) = match entrypoint {
        Some("") => (Vec::new(), args.to_vec()),
        Some(e) => (vec![e.to_string()], args.to_vec()),
        None if !args.is_empty() => (image.entrypoint.clone(), args.to_vec()),
        None => (image.entrypoint.clone(), image.cmd.clone()),
    };
    let all: Vec<String> = entry.into_iter().chain(cmd).collect();
    if all.is_empty() {
        return Err(RuntimeError::NoCommand);
    }
    Ok(all)
}

/// A user resolved inside the image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResolvedUser {
    pub uid: u32,
    pub gid: u32,
    pub additional_gids: Vec<u32>,
    pub home: String,
}

/// Resolves `USER[:GROUP]` (names or numbers) through the image's passwd and group files, as
/// Docker does: a numeric user need not exist (group 0 then), a name must.
pub fn resolve_user(spec: &str, passwd: &str, group: &str) -> Result<ResolvedUser, RuntimeError> {
    let (user, grp) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let user = if user.is_empty() { "0" } else { user };
    let passwd: Vec<Vec<&str>> = passwd
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| l.split(':').collect())
        .filter(|f: &Vec<&str>| f.len() >= 7)
        .collect();
    let groups: Vec<Vec<&str>> = group
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| l.split(':').collect())
        .filter(|f: &Vec<&str>| f.len() >= 4)
        .collect();
    let entry = passwd
        .iter()
        .find(|f| f[0] == user || (user.parse::<u32>().is_ok() && f[2] == user));
    let (uid, mut gid, name, home) = match (entry, user.parse::<u32>()) {
        (Some(f), _) => (
            f[2].parse()
                .map_err(|_| RuntimeError::NoSuchUser(user.into()))?,
            f[3].parse()
                .map_err(|_| RuntimeError::NoSuchUser(user.into()))?,
            Some(f[0]),
            f[5].to_string(),
        ),
        (None, Ok(uid)) => (uid, 0, None, "/".to_string()),
        (None, Err(_)) => return Err(RuntimeError::NoSuchUser(user.into())),
    };
    if let Some(g) = grp.filter(|g| !g.is_empty()) {
        gid = match groups.iter().find(|f| f[0] == g) {
            Some(f) => f[2]
                .parse()
                .map_err(|_| RuntimeError::NoSuchGroup(g.into()))?,
            None => g.parse().map_err(|_| RuntimeError::NoSuchGroup(g.into()))?,
        };
    }
    // Supplementary groups: those listing the user by name.
    let additional_gids = match name {
        Some(n) if grp.is_none() => groups
            .iter()
            .filter(|f| f[3].split(',').any(|m| m == n))
            .filter_map(|f| f[2].parse().ok())
            .filter(|g| *g != gid)
            .collect(),
        _ => Vec::new(),
    };
    Ok(ResolvedUser {
        uid,
        gid,
        additional_gids,
        home,
    })
}

/// The environment: the image's, then `-e` values (`K=V`, or `K` to take the caller's value),
/// with `PATH`, `HOSTNAME`, `HOME` (and `TERM` for a terminal) as Docker sets them.
pub fn environment(
    image_env: &[String],
    overrides: &[String],
    hostname: &str,
    home: &str,
    tty: bool,
) -> Vec<String> {
    let mut env: Vec<String> = Vec::new();
    let mut set = |kv: String| {
        let key = kv.split('=').next().unwrap_or("").to_string();
        env.retain(|e| e.split('=').next() != Some(key.as_str()));
        env.push(kv);
    };
    set(format!("PATH={DEFAULT_PATH}"));
    set(format!("HOSTNAME={hostname}"));
    if tty {
        set("TERM=xterm".into());
    }
    for e in image_env {
        set(e.clone());
    }
    for e in overrides {
        if e.contains('=') {
            set(e.clone());
        } else if let Ok(v) = std::env::var(e) {
            set(format!("{e}={v}"));
        }
    }
    if !env.iter().any(|e| e.starts_with("HOME=")) {
        env.push(format!("HOME={home}"));
    }
    env
}

pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Docker's default capabilities.
const DEFAULT_CAPS: [Capability; 14] = [
    Capability::Chown,
    Capability::DacOverride,
    Capability::Fsetid,
    Capability::Fowner,
    Capability::Mknod,
    Capability::NetRaw,
    Capability::Setgid,
    Capability::Setuid,
    Capability::Setfcap,
    Capability::Setpcap,
    Capability::NetBindService,
    Capability::SysChroot,
    Capability::Kill,
    Capability::AuditWrite,
];

/// A bind mount of a host path into the container.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Volume {
    pub host: PathBuf,
    pub container: PathBuf,
    pub read_only: bool,
}

impl std::str::FromStr for Volume {
    type Err = RuntimeError;

    /// `HOST:CONTAINER[:ro|rw]`, both absolute.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || RuntimeError::BadVolume(s.to_string());
        let parts: Vec<&str> = s.split(':').collect();
        let (host, container, read_only) = match parts.as_slice() {
            [h, c] => (*h, *c, false),
            [h, c, "ro"] => (*h, *c, true),
            [h, c, "rw"] => (*h, *c, false),
            _ => return Err(bad()),
        };
        if !host.starts_with('/') || !container.starts_with('/') {
            return Err(bad());
        }
        Ok(Volume {
            host: host.into(),
            container: container.into(),
            read_only,
        })
    }
}

/// Everything a container's spec needs besides the image.
#[derive(Clone, Debug)]
pub struct SpecOptions {
    pub rootfs: PathBuf,
    pub args: Vec<String>,
    pub env: Vec<String>,
    pub cwd: String,
    pub user: ResolvedUser,
    pub hostname: String,
    pub tty: bool,
    /// Share the host's network namespace (`--network host`); otherwise a namespace of its
    /// own with only loopback (`none`).
    pub host_network: bool,
    /// Per-container `/etc/hosts`, `/etc/hostname`, `/etc/resolv.conf`.
    pub etc_files: Vec<(PathBuf, PathBuf)>,
    pub volumes: Vec<Volume>,
}

fn bind(source: &Path, destination: &Path, read_only: bool) -> Mount {
    let mut m = Mount::default();
    m.set_destination(destination.to_path_buf());
    m.set_typ(Some("bind".into()));
    m.set_source(Some(source.to_path_buf()));
    let mut options = vec!["rbind".to_string(), "rprivate".to_string()];
    if read_only {
        options.push("ro".into());
    }
    m.set_options(Some(options));
    m
}

/// The caller's hard limit for `resource` (what a child may not exceed).
fn hard_limit(resource: nix::sys::resource::Resource) -> u64 {
    nix::sys::resource::getrlimit(resource).map_or(1024, |(_, hard)| hard)
}

/// The runtime spec of a container.
pub fn container_spec(o: &SpecOptions) -> Result<Spec, RuntimeError> {
    let mut spec = Spec::default();
    spec.set_hostname(Some(o.hostname.clone()));
    let mut root = oci_spec::runtime::Root::default();
    root.set_path(o.rootfs.clone());
    root.set_readonly(Some(false));
    spec.set_root(Some(root));

    let mut process = spec.process().clone().unwrap_or_default();
    process.set_terminal(Some(o.tty));
    process.set_args(Some(o.args.clone()));
    process.set_env(Some(o.env.clone()));
    process.set_cwd(PathBuf::from(if o.cwd.is_empty() { "/" } else { &o.cwd }));
    let mut user = User::default();
    user.set_uid(o.user.uid);
    user.set_gid(o.user.gid);
    if !o.user.additional_gids.is_empty() {
        user.set_additional_gids(Some(o.user.additional_gids.clone()));
    }
    process.set_user(user);
    let caps: oci_spec::runtime::Capabilities = DEFAULT_CAPS.into_iter().collect();
    let mut c = LinuxCapabilities::default();
    c.set_bounding(Some(caps.clone()));
    c.set_effective(Some(caps.clone()));
    c.set_permitted(Some(caps));
    c.set_inheritable(None);
    c.set_ambient(None);
    process.set_capabilities(Some(c));
    // Docker's default nofile limit, never above what this process may grant.
    let nofile = 1_048_576u64.min(hard_limit(nix::sys::resource::Resource::RLIMIT_NOFILE));
    let rl = oci_spec::runtime::PosixRlimitBuilder::default()
        .typ(PosixRlimitType::RlimitNofile)
        .soft(nofile)
        .hard(nofile)
        .build()
        .map_err(|e| RuntimeError::Spec(e.to_string()))?;
    process.set_rlimits(Some(vec![rl]));
    process.set_no_new_privileges(Some(false));
    spec.set_process(Some(process));

    let mut mounts = spec.mounts().clone().unwrap_or_default();
    for (host, ctr) in &o.etc_files {
        mounts.push(bind(host, ctr, false));
    }
    for v in &o.volumes {
        mounts.push(bind(&v.host, &v.container, v.read_only));
    }
    // Root of a user namespace (a rootless container): a new sysfs is refused where the host's
    // is partly covered, and cgroups are not this user's to set up: the host's /sys bound
    // read-only and no cgroup mount or limits, as runc's rootless spec has it.
    let rootless = !strata_fs::fuse_upper::privileged();
    if rootless {
        for m in mounts.iter_mut() {
            if m.typ().as_deref() == Some("sysfs") {
                let mut sys = bind(Path::new("/sys"), Path::new("/sys"), true);
                let mut options = sys.options().clone().unwrap_or_default();
                options.extend(["nosuid", "noexec", "nodev"].map(String::from));
                sys.set_options(Some(options));
                *m = sys;
            }
        }
        mounts.retain(|m| m.typ().as_deref() != Some("cgroup"));
    }
    spec.set_mounts(Some(mounts));

    if let Some(linux) = spec.linux_mut() {
        if rootless {
            linux.set_resources(None);
        }
        if o.host_network {
            if let Some(ns) = linux.namespaces_mut() {
                ns.retain(|n| n.typ() != LinuxNamespaceType::Network);
            }
        }
    }
    Ok(spec)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn image(entry: &[&str], cmd: &[&str]) -> ImageProcess {
        ImageProcess {
            entrypoint: entry.iter().map(|s| s.to_string()).collect(),
            cmd: cmd.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    fn v(s: &[&str]) -> Vec<String> {
        s.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn docker_entrypoint_and_cmd_rules() {
        let i = image(&["/entry", "-x"], &["default"]);
        assert_eq!(
            process_args(&i, None, &[]).unwrap(),
            v(&["/entry", "-x", "default"])
        );
        assert_eq!(
            process_args(&i, None, &v(&["a"])).unwrap(),
            v(&["/entry", "-x", "a"])
        );
        assert_eq!(
            process_args(&i, Some("/bin/sh"), &[]).unwrap(),
            v(&["/bin/sh"])
        );
        assert_eq!(
            process_args(&i, Some("/bin/sh"), &v(&["-c", "x"])).unwrap(),
            v(&["/bin/sh", "-c", "x"])
        );
        assert_eq!(process_args(&i, Some(""), &v(&["ls"])).unwrap(), v(&["ls"]));
        let shell = image(&[], &["/bin/sh", "-c", "echo hi"]);
        assert_eq!(
            process_args(&shell, None, &[]).unwrap(),
            v(&["/bin/sh", "-c", "echo hi"])
        );
        assert!(matches!(
            process_args(&image(&[], &[]), None, &[]),
            Err(RuntimeError::NoCommand)
        ));
    }

    #[test]
    fn users_resolve_like_docker() {
        let passwd = "root:x:0:0:root:/root:/bin/sh\nalice:x:1000:1000::/home/alice:/bin/sh\n";
        let group = "root:x:0:\nalice:x:1000:\nwheel:x:10:alice\nstaff:x:50:\n";
        let r = resolve_user("alice", passwd, group).unwrap();
        assert_eq!(
            (r.uid, r.gid, r.additional_gids.clone(), r.home.as_str()),
            (1000, 1000, vec![10], "/home/alice")
        );
        let r = resolve_user("alice:staff", passwd, group).unwrap();
        assert_eq!((r.uid, r.gid), (1000, 50));
        let r = resolve_user("4242", passwd, group).unwrap();
        assert_eq!((r.uid, r.gid, r.home.as_str()), (4242, 0, "/"));
        let r = resolve_user("1000:7", passwd, group).unwrap();
        assert_eq!((r.uid, r.gid), (1000, 7));
        assert!(matches!(
            resolve_user("bob", passwd, group),
            Err(RuntimeError::NoSuchUser(_))
        ));
        assert!(matches!(
            resolve_user("alice:nogroup", passwd, group),
            Err(RuntimeError::NoSuchGroup(_))
        ));
        assert_eq!(resolve_user("", passwd, group).unwrap().uid, 0);
    }

    #[test]
    fn environment_and_spec() {
        let env = environment(
            &v(&["PATH=/opt/bin", "A=1"]),
            &v(&["A=2", "B=3"]),
            "box",
            "/root",
            true,
        );
        assert_eq!(
            env,
            v(&[
                "HOSTNAME=box",
                "TERM=xterm",
                "PATH=/opt/bin",
                "A=2",
                "B=3",
                "HOME=/root"
            ])
        );
        let spec = container_spec(&SpecOptions {
            rootfs: "/r".into(),
            args: v(&["/bin/true"]),
            env,
            cwd: String::new(),
            user: ResolvedUser {
                uid: 1000,
                gid: 1000,
                additional_gids: vec![],
                home: "/".into(),
            },
            hostname: "box".into(),
            tty: false,
            host_network: true,
            etc_files: vec![("/tmp/h".into(), "/etc/hosts".into())],
            volumes: vec!["/data:/mnt:ro".parse().unwrap()],
        })
        .unwrap();
        let json = serde_json::to_value(&spec).unwrap();
        assert_eq!(json["process"]["args"], serde_json::json!(["/bin/true"]));
        assert_eq!(json["process"]["user"]["uid"], 1000);
        assert_eq!(json["hostname"], "box");
        let ns = json["linux"]["namespaces"].as_array().unwrap();
        assert!(ns.iter().all(|n| n["type"] != "network"));
        let nofile = &json["process"]["rlimits"][0];
        assert!(
            nofile["hard"].as_u64().unwrap()
                <= hard_limit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        );
        let mounts = json["mounts"].as_array().unwrap();
        assert!(mounts.iter().any(|m| m["destination"] == "/etc/hosts"));
        assert!(mounts.iter().any(|m| m["destination"] == "/mnt"
            && m["options"].as_array().unwrap().contains(&"ro".into())));
        assert!(
            json["process"]["capabilities"]["bounding"]
                .as_array()
                .unwrap()
                .len()
                == 14
        );
        assert!("relative:/x".parse::<Volume>().is_err());
    }
}
