//! `strata build`: a Dockerfile built straight into strata images. Bases are mounted lazily
//! (never pulled whole); RUN runs in a container on a writable view of the stage (the same
//! runtime path as `strata run`), COPY/ADD/WORKDIR write into a writable view without a
//! container; each filesystem step's upper directory becomes one layer through the same
//! pipeline as `commit`. Every step's result is cached as an image named by a key of the
//! parent chain, the instruction and its inputs.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context};
use serde_json::{json, Value};
use sha2::{Digest as _, Sha256};
use strata_builder::build::fsops::{self, CopyOwnership};
use strata_builder::commit::{layer_from_upper, save_image};
use strata_builder::container::{hosts_file, ContainerDir, Containers};
use strata_builder::dockerfile::ignore::Ignore;
use strata_builder::dockerfile::words::{self, Vars};
use strata_builder::dockerfile::{self, CommandForm, Dockerfile, Instruction, Step, VolumeForm};
use strata_builder::runtime::{self, SpecOptions};
use strata_fs::oci::{self, Annotations, Descriptor, Manifest};
use strata_fs::reference::Reference;
use strata_fs::service::protocol::Request;
use strata_fs::service::MountRequest;
use strata_fs::store::Store;

use super::daemon::{self, DaemonSettings};
use super::open_store;
use crate::GlobalArgs;

use strata_builder::commit::BUILD_KEY_ANNOTATION as CACHE_KEY_ANNOTATION;

/// Refuses names in the build cache's repository for images that do not come from a build.
pub(crate) fn refuse_cache_name(r: &Reference) -> anyhow::Result<()> {
    if r.to_string().starts_with(CACHE_REPO) {
        bail!("{r}: {CACHE_REPO} is reserved for the build cache");
    }
    Ok(())
}

/// Where cached step results are named.
pub(crate) const CACHE_REPO: &str = "localhost/strata-build-cache";

#[derive(clap::Args)]
pub struct BuildArgs {
    /// Name the image (repeatable).
    #[arg(short = 't', long = "tag")]
    pub tags: Vec<String>,
    /// The Dockerfile (default: CONTEXT/Dockerfile).
    #[arg(short = 'f', long = "file")]
    pub file: Option<PathBuf>,
    /// Build argument KEY=VALUE (or KEY: this process's value); repeatable.
    #[arg(long = "build-arg")]
    pub build_args: Vec<String>,
    /// Build this stage (name or index) instead of the last.
    #[arg(long)]
    pub target: Option<String>,
    /// Run every step (cached results are not used; the new ones are recorded).
    #[arg(long)]
    pub no_cache: bool,
    /// Push the named images when built.
    #[arg(long)]
    pub push: bool,
    /// OS/ARCH of registry bases.
    #[arg(long)]
    pub platform: Option<String>,
    /// Progress output: `plain` (one line per event) or `tty`; both print Docker's step lines.
    #[arg(long, default_value = "plain")]
    pub progress: String,
    /// OCI runtime for RUN steps.
    #[arg(long, default_value = "runc")]
    pub runtime: PathBuf,
    #[command(flatten)]
    pub registry: super::registry::RegistryArgs,
    #[command(flatten)]
    pub daemon: DaemonSettings,
    /// The build context (a directory).
    pub context: PathBuf,
}

/// A stage's state as the steps go.
#[derive(Clone)]
struct State {
    /// An image in the store with exactly these layers (what RUN/COPY mount); `None` while
    /// there are none (`FROM scratch`).
    mount_ref: Option<String>,
    template: Manifest,
    layers: Vec<Descriptor>,
    /// Registry source of lazily pulled base layers.
    annotations: Annotations,
    config: Value,
    /// The cache key of everything so far.
    key: String,
    /// ARGs in scope and their values.
    args: BTreeMap<String, String>,
    shell: Vec<String>,
    /// WORKDIRs to create with the next filesystem step.
    pending_dirs: Vec<String>,
    /// CMD set in this stage (ENTRYPOINT then keeps it).
    cmd_set: bool,
}

struct Builder<'a> {
    g: &'a GlobalArgs,
    a: &'a BuildArgs,
    store: Store,
    containers: Containers,
    client: std::sync::Arc<strata_fs::registry::Registry>,
    df: Dockerfile,
    file_name: String,
    context: PathBuf,
    ignore: Ignore,
    build_args: BTreeMap<String, String>,
    global_args: BTreeMap<String, String>,
    platform: (String, String),
    step: usize,
    total: usize,
    results: HashMap<usize, State>,
    runtime: PathBuf,
    interrupted: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
}

/// A writable view of a state (a container root without a container), or a plain directory
/// while the stage has no layers; unmounted and removed when dropped.
struct View<'b> {
    builder: &'b Builder<'b>,
    id: String,
    dir: Option<ContainerDir>,
    tmp: Option<tempfile::TempDir>,
    root: PathBuf,
    upper: PathBuf,
}

impl Drop for View<'_> {
    fn drop(&mut self) {
        if let Some(dir) = &self.dir {
            let _ = daemon::call(
                self.builder.g,
                &self.builder.a.daemon,
                &Request::Unmount {
                    mountpoint: dir.rootfs(),
                    lazy: true,
                },
            );
            let _ = self.builder.containers.remove_dir(&self.id);
        }
        let _ = self.tmp.take();
    }
}

fn key_of(parts: &[&str]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p.as_bytes());
        h.update([0]);
    }
    hex::encode(h.finalize())
}

fn now() -> String {
    strata_fs::rfc3339::now()
}

/// An empty manifest to build `FROM scratch` images on.
pub(crate) fn scratch_manifest() -> anyhow::Result<Manifest> {
    Ok(serde_json::from_value(json!({
        "schemaVersion": 2,
        "mediaType": oci::MEDIA_TYPE_MANIFEST,
        "config": {"mediaType": oci::MEDIA_TYPE_CONFIG, "digest": format!("sha256:{}", "0".repeat(64)), "size": 0},
        "layers": [],
    }))?)
}

fn set_env(config: &mut Value, key: &str, value: &str) {
    let c = &mut config["config"];
    let mut env: Vec<String> = c["Env"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    let entry = format!("{key}={value}");
    match env.iter_mut().find(|e| e.split('=').next() == Some(key)) {
        Some(e) => *e = entry,
        None => env.push(entry),
    }
    c["Env"] = json!(env);
}

fn env_vars(config: &Value) -> Vec<(String, String)> {
    config["config"]["Env"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str())
                .filter_map(|s| s.split_once('='))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        })
        .unwrap_or_default()
}

/// A Go-style duration (`30s`, `1m30s`, `500ms`) in nanoseconds.
fn duration_ns(s: &str) -> anyhow::Result<u64> {
    let mut total = 0f64;
    let mut num = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c.is_ascii_digit() || c == '.' {
            num.push(c);
            continue;
        }
        let mut unit = c.to_string();
        while let Some(&n) = chars.peek() {
            if n.is_ascii_alphabetic() {
                unit.push(n);
                chars.next();
            } else {
                break;
            }
        }
        let v: f64 = num.parse().with_context(|| format!("bad duration {s:?}"))?;
        num.clear();
        total += v * match unit.as_str() {
            "ns" => 1.0,
            "us" | "µs" => 1e3,
            "ms" => 1e6,
            "s" => 1e9,
            "m" => 60e9,
            "h" => 3600e9,
            _ => bail!("bad duration {s:?}"),
        };
    }
    if !num.is_empty() {
        bail!("bad duration {s:?}: a unit is needed (s, m, h)");
    }
    Ok(total as u64)
}

impl<'a> Builder<'a> {
    fn vars(&self, st: &State) -> Vars {
        let mut v: Vars = st.args.clone();
        for (k, val) in env_vars(&st.config) {
            v.insert(k, val);
        }
        v
    }

    fn expand(&self, st: &State, step: &Step, w: &str) -> anyhow::Result<String> {
        words::expand(w, &self.vars(st), self.df.escape)
            .map_err(|e| anyhow::anyhow!("{}:{}: {}", self.file_name, step.line, e.0))
    }

    fn expand_words(&self, st: &State, step: &Step, w: &str) -> anyhow::Result<Vec<String>> {
        words::expand_words(w, &self.vars(st), self.df.escape)
            .map_err(|e| anyhow::anyhow!("{}:{}: {}", self.file_name, step.line, e.0))
    }

    fn announce(&mut self, text: &str) {
        self.step += 1;
        println!("Step {}/{} : {}", self.step, self.total, text);
    }

    /// The state of `FROM image` (a registry or store image, an earlier stage, or scratch).
    fn from(&mut self, step: &Step) -> anyhow::Result<State> {
        let Instruction::From {
            image, platform, ..
        } = &step.instruction
        else {
            bail!("not a FROM");
        };
        let vars: Vars = self.global_args.clone();
        let image = words::expand(image, &vars, self.df.escape)
            .map_err(|e| anyhow::anyhow!("{}:{}: {}", self.file_name, step.line, e.0))?;
        let shell = vec!["/bin/sh".to_string(), "-c".to_string()];
        if let Some(idx) = self
            .df
            .stage_index(&image)
            .filter(|i| self.results.contains_key(i))
        {
            let mut st = self.results[&idx].clone();
            st.args = BTreeMap::new();
            st.pending_dirs.clear();
            st.cmd_set = false;
            return Ok(st);
        }
        if image.eq_ignore_ascii_case("scratch") {
            let (os, arch) = &self.platform;
            return Ok(State {
                mount_ref: None,
                template: scratch_manifest()?,
                layers: Vec::new(),
                annotations: Annotations::new(),
                config: json!({"architecture": arch, "os": os, "config": {},
                    "rootfs": {"type": "layers", "diff_ids": []}, "history": []}),
                key: key_of(&["scratch", os, arch]),
                args: BTreeMap::new(),
                shell,
                pending_dirs: Vec::new(),
                cmd_set: false,
            });
        }
        let rec = match self.store.resolve(&image) {
            Ok(r) => r,
            Err(_) => {
                let r = Reference::parse(&image)
                    .with_context(|| format!("{}:{}: FROM {image}", self.file_name, step.line))?;
                let plat = match platform {
                    Some(p) => {
                        let p = words::expand(p, &vars, self.df.escape).map_err(|e| {
                            anyhow::anyhow!("{}:{}: {}", self.file_name, step.line, e.0)
                        })?;
                        super::registry::platform(Some(&p))?
                    }
                    None => self.platform.clone(),
                };
                strata_fs::transfer::pull(
                    &self.store,
                    &self.client,
                    &r,
                    (&plat.0, &plat.1),
                    false,
                    &mut |_| {},
                )
                .with_context(|| format!("{}:{}: pulling {image}", self.file_name, step.line))?;
                self.store.resolve(&r.to_string())?
            }
        };
        let manifest = self.store.manifest(&rec.descriptor.digest)?;
        let config: Value = serde_json::from_slice(&self.store.read_blob(&manifest.config.digest)?)
            .context("the base image's config")?;
        let mut st = State {
            mount_ref: (!manifest.layers.is_empty()).then(|| rec.reference.to_string()),
            layers: manifest.layers.clone(),
            template: manifest,
            annotations: rec.descriptor.annotations.clone(),
            config,
            key: key_of(&["image", &rec.descriptor.digest]),
            args: BTreeMap::new(),
            shell,
            pending_dirs: Vec::new(),
            cmd_set: false,
        };
        if st.config["config"]["Shell"].is_array() {
            st.shell = st.config["config"]["Shell"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|s| s.as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or(st.shell);
        }
        Ok(st)
    }

    /// A writable view of `st` to change files in.
    fn view(&'a self, st: &State) -> anyhow::Result<View<'a>> {
        let Some(image) = &st.mount_ref else {
            let tmp = tempfile::Builder::new()
                .prefix("build-")
                .tempdir_in(self.store.layout().tmp())
                .context("a directory for the step")?;
            let root = tmp.path().to_path_buf();
            return Ok(View {
                builder: self,
                id: String::new(),
                dir: None,
                upper: root.clone(),
                root,
                tmp: Some(tmp),
            });
        };
        let (id, dir) = self.containers.create_dir()?;
        let mut view = View {
            builder: self,
            id,
            dir: Some(dir.clone()),
            tmp: None,
            root: dir.rootfs(),
            upper: dir.layer().join("upper"),
        };
        let mut req = MountRequest::new(image.clone(), dir.rootfs());
        req.upper = Some(dir.layer());
        req.setuid = true;
        req.registry = self.a.registry.options();
        if let Err(e) = daemon::call(self.g, &self.a.daemon, &Request::Mount(Box::new(req))) {
            view.dir = None;
            let _ = self.containers.remove_dir(&view.id);
            return Err(e.context(format!("mounting {image}")));
        }
        Ok(view)
    }

    /// Ends a filesystem step: the view's changes become a layer of a new cached state.
    fn finish_layer(
        &self,
        st: &mut State,
        view: View<'_>,
        exclude: &[PathBuf],
        created_by: &str,
        key: String,
    ) -> anyhow::Result<()> {
        let (layer, diff_id) = layer_from_upper(&self.store, &view.upper, &view.root, exclude)?;
        drop(view);
        st.layers.push(layer);
        match st.config["rootfs"]["diff_ids"].as_array_mut() {
            Some(ids) => ids.push(json!(diff_id)),
            None => st.config["rootfs"] = json!({"type": "layers", "diff_ids": [diff_id]}),
        }
        self.history(st, created_by, false);
        st.key = key;
        let name = format!("{CACHE_REPO}:{}", &st.key[..32]);
        let reference = Reference::parse(&name)?;
        let mut desc = save_image(
            &self.store,
            &st.template,
            st.layers.clone(),
            &st.config,
            &st.annotations,
            &reference,
        )?;
        // The key in the name's record: only an entry this builder made is ever a hit.
        desc.annotations
            .insert(CACHE_KEY_ANNOTATION.into(), st.key.clone());
        self.store.tag(&reference, desc)?;
        st.mount_ref = Some(name);
        Ok(())
    }

    fn history(&self, st: &mut State, created_by: &str, empty: bool) {
        let mut entry =
            json!({"created": now(), "created_by": created_by, "comment": "strata build"});
        if empty {
            entry["empty_layer"] = json!(true);
        }
        match st.config["history"].as_array_mut() {
            Some(h) => h.push(entry),
            None => st.config["history"] = json!([entry]),
        }
    }

    /// A cached state for `key`, if the cache has it.
    fn cached(&self, st: &State, key: &str) -> Option<State> {
        if self.a.no_cache {
            return None;
        }
        let name = format!("{CACHE_REPO}:{}", &key[..32]);
        let rec = self.store.resolve(&name).ok()?;
        if rec
            .descriptor
            .annotations
            .get(CACHE_KEY_ANNOTATION)
            .map(String::as_str)
            != Some(key)
        {
            return None;
        }
        let manifest = self.store.manifest(&rec.descriptor.digest).ok()?;
        // Layers neither local nor reachable through a registry source: not usable.
        let has_source = rec
            .descriptor
            .annotations
            .keys()
            .any(|k| k != CACHE_KEY_ANNOTATION && k != strata_fs::oci::ANNOTATION_REF_NAME);
        if manifest.layers.iter().any(|l| {
            !self.store.has_blob(&l.digest) && !st.layers.iter().any(|m| m.digest == l.digest)
        }) && !has_source
        {
            return None;
        }
        let config: Value =
            serde_json::from_slice(&self.store.read_blob(&manifest.config.digest).ok()?).ok()?;
        let mut out = st.clone();
        out.layers = manifest.layers.clone();
        out.template = manifest;
        out.config = config;
        out.key = key.to_string();
        out.mount_ref = Some(name);
        out.pending_dirs.clear();
        Some(out)
    }

    /// Creates the pending WORKDIRs in a view.
    fn make_pending_dirs(&self, st: &mut State, root: &Path) -> anyhow::Result<bool> {
        let mut any = false;
        for entry in std::mem::take(&mut st.pending_dirs) {
            let (d, user) = entry.split_once('\u{0}').unwrap_or((&entry, ""));
            let owner = if user.is_empty() {
                None
            } else {
                let u = super::container::resolve_user_in(root, user)
                    .with_context(|| format!("WORKDIR {d}: USER {user}"))?;
                Some((u.uid, u.gid))
            };
            any |= fsops::mkdir_all(root, d, owner).with_context(|| format!("WORKDIR {d}"))?;
        }
        Ok(any)
    }

    fn run_step(&mut self, st: &mut State, step: &Step) -> anyhow::Result<()> {
        let Instruction::Run {
            command,
            heredocs,
            flags,
        } = &step.instruction
        else {
            bail!("not a RUN");
        };
        if let Some(k) = flags.keys().next() {
            bail!(
                "{}:{}: RUN --{k} is not supported by strata build yet",
                self.file_name,
                step.line
            );
        }
        let args: Vec<String> = match command {
            CommandForm::Exec(v) => v.clone(),
            CommandForm::Shell(s) => {
                let script =
                    if heredocs.len() == 1 && s.trim().starts_with("<<") && !s.contains(' ') {
                        heredocs[0].content.clone()
                    } else {
                        let mut script = s.clone();
                        for h in heredocs {
                            script.push('\n');
                            script.push_str(&h.content);
                            script.push_str(&h.name);
                        }
                        script
                    };
                let mut a = st.shell.clone();
                a.push(script);
                a
            }
        };
        let used: Vec<String> = st.args.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let key = key_of(&[
            &st.key,
            "RUN",
            &args.join("\u{1}"),
            &used.join("\u{1}"),
            &st.pending_dirs.join(":"),
        ]);
        let created_by = format!("RUN {} # buildkit", args.join(" "));
        if let Some(hit) = self.cached(st, &key) {
            println!(" ---> Using cache");
            *st = hit;
            return Ok(());
        }
        let runtime = self.runtime.clone();
        let view = self.view(st)?;
        self.make_pending_dirs(st, &view.root)?;
        let Some(dir) = view.dir.clone() else {
            bail!(
                "{}:{}: RUN needs a base with a shell (this stage has no files yet)",
                self.file_name,
                step.line
            );
        };
        let user_spec = st.config["config"]["User"]
            .as_str()
            .unwrap_or("")
            .to_string();
        let user = super::container::resolve_user_in(&view.root, &user_spec)?;
        let mut env: Vec<String> = env_vars(&st.config)
            .into_iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        for (k, v) in &st.args {
            if !env.iter().any(|e| e.split('=').next() == Some(k)) {
                env.push(format!("{k}={v}"));
            }
        }
        let hostname = format!("strata-{}", &view.id[..12]);
        let mut etc_files = Vec::new();
        for (name, body) in [
            ("hosts", hosts_file(&hostname)),
            ("hostname", format!("{hostname}\n")),
            (
                "resolv.conf",
                std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default(),
            ),
        ] {
            let path = dir.etc_file(name);
            std::fs::write(&path, body)?;
            etc_files.push((path, PathBuf::from("/etc").join(name)));
        }
        let cwd = st.config["config"]["WorkingDir"]
            .as_str()
            .filter(|s| !s.is_empty())
            .unwrap_or("/")
            .to_string();
        let spec = runtime::container_spec(&SpecOptions {
            rootfs: view.root.clone(),
            env: runtime::environment(&[], &env, &hostname, &user.home, false),
            cwd,
            args: args.clone(),
            user,
            hostname,
            tty: false,
            host_network: true,
            etc_files,
            volumes: Vec::new(),
        })?;
        let exclude: Vec<PathBuf> = spec
            .mounts()
            .iter()
            .flatten()
            .map(|m| m.destination().clone())
            .collect();
        std::fs::write(
            dir.bundle().join("config.json"),
            serde_json::to_vec_pretty(&spec)?,
        )?;
        let id = format!("build-{}", &view.id[..24]);
        println!(" ---> Running in {}", &view.id[..12]);
        let status = Command::new(&runtime)
            .arg("--root")
            .arg(self.containers.runtime_root())
            .arg("run")
            .arg("--bundle")
            .arg(dir.bundle())
            .arg(&id)
            .stdin(std::process::Stdio::null())
            .status()
            .with_context(|| format!("starting {}", runtime.display()))?;
        let _ = Command::new(&runtime)
            .arg("--root")
            .arg(self.containers.runtime_root())
            .args(["delete", "--force", &id])
            .output();
        if !status.success() {
            let code = status.code().unwrap_or(-1);
            bail!(
                "{}:{}: {}: the command returned a non-zero code: {code}",
                self.file_name,
                step.line,
                step.text
            );
        }
        self.finish_layer(st, view, &exclude, &created_by, key)
    }

    /// `--chown` as ids: numbers, or names in the view's /etc/passwd and /etc/group.
    fn chown(&self, spec: Option<&String>, root: &Path) -> anyhow::Result<Option<(u32, u32)>> {
        let Some(spec) = spec else { return Ok(None) };
        let numeric = |s: &str| s.parse::<u32>().ok();
        let (u, g) = spec.split_once(':').unwrap_or((spec, ""));
        if let (Some(uid), Some(gid)) = (
            numeric(u),
            if g.is_empty() { numeric(u) } else { numeric(g) },
        ) {
            return Ok(Some((uid, gid)));
        }
        let user = super::container::resolve_user_in(root, spec)
            .with_context(|| format!("--chown={spec}"))?;
        Ok(Some((user.uid, user.gid)))
    }

    fn copy_step(&mut self, st: &mut State, step: &Step) -> anyhow::Result<()> {
        let Instruction::Copy {
            add,
            sources,
            dest,
            heredocs,
            flags,
        } = &step.instruction
        else {
            bail!("not a COPY");
        };
        let (file_name, line) = (self.file_name.clone(), step.line);
        let at = move |m: String| anyhow::anyhow!("{file_name}:{line}: {m}");
        let allowed: &[&str] = if *add {
            &["chown", "chmod", "checksum", "link"]
        } else {
            &["from", "chown", "chmod", "link"]
        };
        if let Some(k) = flags.keys().find(|k| !allowed.contains(&k.as_str())) {
            return Err(at(format!("{} --{k} is not supported", step.keyword)));
        }
        // Everything the step's result depends on, expanded, goes into its cache key.
        let flag = |name: &str| -> anyhow::Result<Option<String>> {
            flags
                .get(name)
                .map(|v| self.expand(st, step, v))
                .transpose()
        };
        let chown_spec = flag("chown")?;
        let chmod_spec = flag("chmod")?;
        let from = flag("from")?;
        let checksum = flag("checksum")?;
        let mut srcs = Vec::new();
        for s in sources {
            srcs.push(self.expand(st, step, s)?);
        }
        let dest = self.expand(st, step, dest)?;
        let workdir = st.config["config"]["WorkingDir"]
            .as_str()
            .unwrap_or("/")
            .to_string();
        let mut dest = if dest.starts_with('/') {
            dest
        } else {
            let mut d = format!("{}/{}", workdir.trim_end_matches('/'), dest);
            if dest.ends_with('/') && !d.ends_with('/') {
                d.push('/');
            }
            d
        };
        if srcs.len() > 1 && !dest.ends_with('/') {
            dest.push('/');
        }
        let chmod = match &chmod_spec {
            Some(m) => Some(
                u32::from_str_radix(m, 8)
                    .ok()
                    .filter(|m| *m <= 0o7777)
                    .ok_or_else(|| at(format!("--chmod={m}: expected octal")))?,
            ),
            None => None,
        };
        // Heredoc sources, expanded unless their delimiter was quoted.
        let mut docs: BTreeMap<String, String> = BTreeMap::new();
        for h in heredocs {
            let content = if h.quoted {
                h.content.clone()
            } else {
                words::expand_raw(&h.content, &self.vars(st), self.df.escape)
                    .map_err(|e| at(e.0))?
            };
            docs.insert(h.name.clone(), content);
        }
        // Where the sources come from: the context, another stage, or an image.
        let from_state: Option<State> = match &from {
            None => None,
            Some(f) => match self.df.stage_index(f) {
                Some(i) => Some(
                    self.results
                        .get(&i)
                        .cloned()
                        .with_context(|| format!("stage {f} is not built"))?,
                ),
                None => {
                    let fake = Step {
                        line: step.line,
                        keyword: "FROM".into(),
                        text: format!("FROM {f}"),
                        instruction: Instruction::From {
                            image: f.clone(),
                            alias: None,
                            platform: None,
                        },
                    };
                    Some(self.from(&fake)?)
                }
            },
        };
        let is_url = |s: &str| s.starts_with("http://") || s.starts_with("https://");
        if srcs.iter().any(|s| is_url(s)) && !*add {
            return Err(at("COPY cannot fetch URLs (ADD can)".into()));
        }
        let scratch = tempfile::Builder::new()
            .prefix("src-")
            .tempdir_in(self.store.layout().tmp())?;
        // URLs are fetched first: their content is an input of the key.
        let mut fetched: Vec<(String, String)> = Vec::new();
        for u in srcs.iter().filter(|s| is_url(s)) {
            let (name, digest) = self.fetch_url(u, checksum.as_deref(), scratch.path())?;
            fetched.push((name, digest));
        }
        let mut inputs = vec![
            st.key.clone(),
            step.keyword.clone(),
            dest.clone(),
            format!("{chown_spec:?} {chmod_spec:?} {checksum:?}"),
        ];
        inputs.extend(srcs.iter().cloned());
        inputs.extend(docs.iter().map(|(k, v)| format!("{k}\u{1}{v}")));
        inputs.extend(fetched.iter().map(|(n, d)| format!("{n}\u{1}{d}")));
        inputs.push(st.pending_dirs.join(":"));
        let plain: Vec<String> = srcs
            .iter()
            .filter(|s| !s.starts_with("<<") && !is_url(s))
            .cloned()
            .collect();
        match &from_state {
            Some(f) => inputs.push(f.key.clone()),
            None if !plain.is_empty() => {
                let expanded = fsops::expand_sources(&self.context, &plain, Some(&self.ignore))
                    .map_err(|e| at(e.to_string()))?;
                inputs.push(fsops::sources_digest(
                    &self.context,
                    &expanded,
                    Some(&self.ignore),
                )?);
            }
            None => {}
        }
        let refs: Vec<&str> = inputs.iter().map(String::as_str).collect();
        let key = key_of(&refs);
        let created_by = format!("{} # buildkit", step.text);
        if let Some(hit) = self.cached(st, &key) {
            println!(" ---> Using cache");
            *st = hit;
            return Ok(());
        }
        let view = self.view(st)?;
        self.make_pending_dirs(st, &view.root)?;
        let own = CopyOwnership {
            chown: self.chown(chown_spec.as_ref(), &view.root)?,
            chmod,
            keep_owners: from_state.is_some(),
        };
        // A read-only view of the --from source.
        let mut from_view = None;
        let base: PathBuf = match &from_state {
            Some(f) => {
                let v = self.view(f)?;
                let root = v.root.clone();
                from_view = Some(v);
                root
            }
            None => self.context.clone(),
        };
        for (name, content) in &docs {
            std::fs::write(scratch.path().join(name), content)?;
        }
        // Heredoc documents and fetched URLs, each copied from the scratch directory.
        for name in docs.keys().chain(fetched.iter().map(|(n, _)| n)) {
            fsops::copy_sources(
                scratch.path(),
                std::slice::from_ref(name),
                &view.root,
                &dest,
                own,
                None,
            )?;
        }
        if !plain.is_empty() {
            let ignore = from_state.is_none().then_some(&self.ignore);
            let expanded =
                fsops::expand_sources(&base, &plain, ignore).map_err(|e| at(e.to_string()))?;
            let dest = if expanded.len() > 1 && !dest.ends_with('/') {
                format!("{dest}/")
            } else {
                dest.clone()
            };
            for src in &expanded {
                let host = fsops::secure_join(&base, src, true)?;
                let archive = (*add && from_state.is_none())
                    .then(|| fsops::archive_kind(&host))
                    .flatten();
                match archive {
                    Some(kind) => {
                        fsops::mkdir_all(&view.root, &dest, own.chown)?;
                        let into = fsops::secure_join(&view.root, &dest, true)?;
                        fsops::unpack_archive(&host, kind, &into)?;
                    }
                    None => fsops::copy_sources(
                        &base,
                        std::slice::from_ref(src),
                        &view.root,
                        &dest,
                        own,
                        ignore,
                    )?,
                }
            }
        }
        drop(from_view);
        self.finish_layer(st, view, &[], &created_by, key)
    }

    /// Downloads `url` into `dir` (checked against `checksum`): the file's name and digest.
    fn fetch_url(
        &self,
        url: &str,
        checksum: Option<&str>,
        dir: &Path,
    ) -> anyhow::Result<(String, String)> {
        use std::io::Write as _;
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(std::time::Duration::from_secs(600)))
            .build()
            .into();
        let resp = agent
            .get(url)
            .call()
            .with_context(|| format!("fetching {url}"))?;
        let name = url
            .split(['?', '#'])
            .next()
            .and_then(|u| u.rsplit('/').next())
            .filter(|n| !n.is_empty() && *n != "." && *n != "..")
            .unwrap_or("download")
            .to_string();
        let path = dir.join(&name);
        let mut f = std::fs::File::create(&path)?;
        let mut r = resp.into_body().into_reader();
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let n =
                std::io::Read::read(&mut r, &mut buf).with_context(|| format!("fetching {url}"))?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
            f.write_all(&buf[..n])?;
        }
        let got = format!("sha256:{}", hex::encode(h.finalize()));
        if let Some(want) = checksum {
            if got != want {
                bail!("{url}: checksum mismatch: expected {want}, got {got}");
            }
        }
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
        Ok((name, got))
    }

    /// A metadata instruction's effect on the config; its history line.
    fn meta_step(&mut self, st: &mut State, step: &Step) -> anyhow::Result<()> {
        let shell_cmd = |st: &State, c: &CommandForm| -> Value {
            match c {
                CommandForm::Exec(v) => json!(v),
                CommandForm::Shell(s) => {
                    let mut a = st.shell.clone();
                    a.push(s.clone());
                    json!(a)
                }
            }
        };
        let created_by;
        match &step.instruction {
            Instruction::Arg(list) => {
                for (k, dflt) in list {
                    let value = match (self.build_args.get(k), dflt) {
                        (Some(v), _) => Some(v.clone()),
                        (None, Some(d)) => Some(self.expand(st, step, d)?),
                        (None, None) => self.global_args.get(k).cloned(),
                    };
                    if let Some(v) = value {
                        st.args.insert(k.clone(), v);
                    } else {
                        st.args.remove(k);
                    }
                }
                // ARG changes nothing in the image (its value reaches RUN steps and keys).
                return Ok(());
            }
            Instruction::Env(pairs) => {
                // Every value sees the environment from before the instruction, as Docker's.
                let values = pairs
                    .iter()
                    .map(|(k, v)| Ok((k.clone(), self.expand(st, step, v)?)))
                    .collect::<anyhow::Result<Vec<_>>>()?;
                let mut shown = Vec::new();
                for (k, v) in values {
                    set_env(&mut st.config, &k, &v);
                    shown.push(format!("{k}={v}"));
                }
                created_by = format!("ENV {}", shown.join(" "));
            }
            Instruction::Label(pairs) => {
                let c = &mut st.config["config"];
                if !c["Labels"].is_object() {
                    c["Labels"] = json!({});
                }
                let mut shown = Vec::new();
                for (k, v) in pairs {
                    let k = self.expand(st, step, k)?;
                    let v = self.expand(st, step, v)?;
                    st.config["config"]["Labels"][&k] = json!(v);
                    shown.push(format!("{k}={v}"));
                }
                created_by = format!("LABEL {}", shown.join(" "));
            }
            Instruction::Expose(text) => {
                let ports = self.expand_words(st, step, text)?;
                if !st.config["config"]["ExposedPorts"].is_object() {
                    st.config["config"]["ExposedPorts"] = json!({});
                }
                let mut shown = Vec::new();
                for p in ports {
                    let p = if p.contains('/') {
                        p
                    } else {
                        format!("{p}/tcp")
                    };
                    st.config["config"]["ExposedPorts"][&p] = json!({});
                    shown.push(p);
                }
                created_by = format!("EXPOSE map[{}]", shown.join(" "));
            }
            Instruction::Volume(form) => {
                let list = match form {
                    VolumeForm::Json(v) => v
                        .iter()
                        .map(|s| self.expand(st, step, s))
                        .collect::<anyhow::Result<Vec<_>>>()?,
                    VolumeForm::Words(w) => self.expand_words(st, step, w)?,
                };
                if !st.config["config"]["Volumes"].is_object() {
                    st.config["config"]["Volumes"] = json!({});
                }
                for v in &list {
                    st.config["config"]["Volumes"][v] = json!({});
                }
                created_by = format!("VOLUME {list:?}");
            }
            Instruction::User(u) => {
                let u = self.expand(st, step, u)?;
                st.config["config"]["User"] = json!(u);
                created_by = format!("USER {u}");
            }
            Instruction::Workdir(w) => {
                let w = self.expand(st, step, w)?;
                let prev = st.config["config"]["WorkingDir"]
                    .as_str()
                    .unwrap_or("/")
                    .to_string();
                let joined = if w.starts_with('/') {
                    w
                } else {
                    format!("{}/{w}", prev.trim_end_matches('/'))
                };
                let clean = clean_path(&joined);
                st.config["config"]["WorkingDir"] = json!(clean);
                // Made with the next filesystem step, owned by the USER of this point.
                let user = st.config["config"]["User"]
                    .as_str()
                    .unwrap_or("")
                    .to_string();
                st.pending_dirs.push(if user.is_empty() {
                    clean.clone()
                } else {
                    format!("{clean}\u{0}{user}")
                });
                created_by = format!("WORKDIR {clean}");
            }
            Instruction::Stopsignal(s) => {
                let s = self.expand(st, step, s)?;
                st.config["config"]["StopSignal"] = json!(s);
                created_by = format!("STOPSIGNAL {s}");
            }
            Instruction::Maintainer(m) => {
                st.config["author"] = json!(m);
                created_by = format!("MAINTAINER {m}");
            }
            Instruction::Cmd(c) => {
                st.config["config"]["Cmd"] = shell_cmd(st, c);
                st.cmd_set = true;
                created_by = format!("CMD {}", st.config["config"]["Cmd"]);
            }
            Instruction::Entrypoint(c) => {
                st.config["config"]["Entrypoint"] = shell_cmd(st, c);
                if !st.cmd_set {
                    st.config["config"]["Cmd"] = Value::Null;
                }
                created_by = format!("ENTRYPOINT {}", st.config["config"]["Entrypoint"]);
            }
            Instruction::Shell(v) => {
                st.shell = v.clone();
                st.config["config"]["Shell"] = json!(v);
                created_by = format!("SHELL {v:?}");
            }
            Instruction::Onbuild(t) => {
                let c = &mut st.config["config"];
                let mut list: Vec<Value> = c["OnBuild"].as_array().cloned().unwrap_or_default();
                list.push(json!(t));
                c["OnBuild"] = json!(list);
                created_by = format!("ONBUILD {t}");
            }
            Instruction::Healthcheck(h) => {
                let value = match h {
                    None => json!({"Test": ["NONE"]}),
                    Some(h) => {
                        let test = match &h.test {
                            Some(CommandForm::Exec(v)) => {
                                let mut t = vec!["CMD".to_string()];
                                t.extend(v.iter().cloned());
                                t
                            }
                            Some(CommandForm::Shell(s)) => vec!["CMD-SHELL".to_string(), s.clone()],
                            None => vec!["NONE".to_string()],
                        };
                        let mut v = json!({"Test": test});
                        for (flag, field) in [
                            ("interval", "Interval"),
                            ("timeout", "Timeout"),
                            ("start-period", "StartPeriod"),
                            ("start-interval", "StartInterval"),
                        ] {
                            if let Some(d) = h.flags.get(flag) {
                                v[field] = json!(duration_ns(d)?);
                            }
                        }
                        if let Some(r) = h.flags.get("retries") {
                            v["Retries"] = json!(r.parse::<u64>().context("--retries")?);
                        }
                        v
                    }
                };
                st.config["config"]["Healthcheck"] = value;
                created_by = format!(
                    "HEALTHCHECK {}",
                    step.text
                        .trim_start_matches(|c: char| !c.is_whitespace())
                        .trim()
                );
            }
            _ => bail!("not a metadata instruction"),
        }
        // The key covers the resulting config itself (the history line alone is ambiguous:
        // `ENV A="1 B=2"` and `ENV A=1 B=2` print alike).
        let config = serde_json::to_string(&st.config["config"])?;
        st.key = key_of(&[
            &st.key,
            &step.keyword,
            &created_by,
            &config,
            &st.shell.join("\u{1}"),
        ]);
        self.history(st, &created_by, true);
        Ok(())
    }

    fn run_stage(&mut self, idx: usize) -> anyhow::Result<State> {
        let stage = self.df.stages[idx].clone();
        self.announce(&stage.from.text);
        let mut st = self.from(&stage.from)?;
        // An image without PATH gets the default one, as Docker and buildah give it.
        if !env_vars(&st.config).iter().any(|(k, _)| k == "PATH") {
            set_env(&mut st.config, "PATH", runtime::DEFAULT_PATH);
        }
        println!(" ---> {}", short(&st.key));
        // Triggers of the base (ONBUILD) run first, then are gone.
        let triggers: Vec<String> = st.config["config"]["OnBuild"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|s| s.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        if let Some(c) = st.config["config"].as_object_mut() {
            c.remove("OnBuild");
        }
        let mut steps = Vec::new();
        for t in &triggers {
            let parsed = dockerfile::parse(&format!("FROM scratch\n{t}\n"), "ONBUILD")?;
            let ok = t.lines().count() == 1
                && parsed.stages.len() == 1
                && parsed.stages[0].steps.len() == 1
                && !matches!(
                    parsed.stages[0].steps[0].keyword.as_str(),
                    "ONBUILD" | "FROM" | "MAINTAINER"
                );
            if !ok {
                bail!("the base image has an invalid ONBUILD trigger {t:?}: one instruction, not FROM, ONBUILD or MAINTAINER");
            }
            steps.extend(parsed.stages[0].steps.iter().cloned());
        }
        self.total += triggers.len();
        steps.extend(stage.steps.iter().cloned());
        for step in &steps {
            if self
                .interrupted
                .as_ref()
                .is_some_and(|f| f.load(std::sync::atomic::Ordering::SeqCst))
            {
                bail!("interrupted");
            }
            let start = Instant::now();
            self.announce(&step.text);
            match &step.instruction {
                Instruction::Run { .. } => self.run_step(&mut st, step)?,
                Instruction::Copy { .. } => self.copy_step(&mut st, step)?,
                _ => self.meta_step(&mut st, step)?,
            }
            println!(
                " ---> {} ({:.2}s)",
                short(&st.key),
                start.elapsed().as_secs_f64()
            );
        }
        // WORKDIRs no later step created.
        if !st.pending_dirs.is_empty() {
            let key = key_of(&[&st.key, "WORKDIR", &st.pending_dirs.join(":")]);
            if let Some(hit) = self.cached(&st, &key) {
                st = hit;
            } else {
                let view = self.view(&st)?;
                let dirs = st
                    .pending_dirs
                    .iter()
                    .map(|d| d.split('\u{0}').next().unwrap_or(d))
                    .collect::<Vec<_>>()
                    .join(" ");
                if self.make_pending_dirs(&mut st, &view.root)? {
                    // The history line for these is the WORKDIR's own: make it a layer's.
                    if let Some(h) = st.config["history"].as_array_mut() {
                        if let Some(pos) = h.iter().rposition(|e| {
                            e["created_by"]
                                .as_str()
                                .is_some_and(|c| c.starts_with("WORKDIR"))
                        }) {
                            h.remove(pos);
                        }
                    }
                    self.finish_layer(&mut st, view, &[], &format!("WORKDIR {dirs}"), key)?;
                }
            }
        }
        Ok(st)
    }
}

fn short(key: &str) -> &str {
    &key[..12]
}

fn clean_path(p: &str) -> String {
    let mut out: Vec<&str> = Vec::new();
    for seg in p.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            s => out.push(s),
        }
    }
    format!("/{}", out.join("/"))
}

/// The stages `target` needs (FROM an earlier stage, COPY --from one), itself included.
fn needed_stages(df: &Dockerfile, target: usize) -> BTreeSet<usize> {
    let mut need = BTreeSet::new();
    let mut todo = vec![target];
    while let Some(i) = todo.pop() {
        if !need.insert(i) {
            continue;
        }
        let stage = &df.stages[i];
        if let Instruction::From { image, .. } = &stage.from.instruction {
            if let Some(j) = df.stage_index(image).filter(|j| *j < i) {
                todo.push(j);
            }
        }
        for s in &stage.steps {
            if let Instruction::Copy { flags, .. } = &s.instruction {
                if let Some(j) = flags
                    .get("from")
                    .and_then(|f| df.stage_index(f))
                    .filter(|j| *j < i)
                {
                    todo.push(j);
                }
            }
        }
    }
    need
}

/// `strata build`.
pub fn build(g: &GlobalArgs, a: BuildArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    let context = std::fs::canonicalize(&a.context)
        .with_context(|| format!("build context {}", a.context.display()))?;
    if !context.is_dir() {
        bail!("build context {} is not a directory", context.display());
    }
    let file = a.file.clone().unwrap_or_else(|| context.join("Dockerfile"));
    let text =
        std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
    let file_name = file.display().to_string();
    let df = dockerfile::parse(&text, &file_name)?;
    let ignore =
        Ignore::parse(&std::fs::read_to_string(context.join(".dockerignore")).unwrap_or_default());
    let tags: Vec<Reference> = a
        .tags
        .iter()
        .map(|t| {
            let r = Reference::parse(t).with_context(|| format!("-t {t}"))?;
            refuse_cache_name(&r)?;
            Ok(r)
        })
        .collect::<anyhow::Result<_>>()?;
    let mut build_args = BTreeMap::new();
    for kv in &a.build_args {
        match kv.split_once('=') {
            Some((k, v)) => build_args.insert(k.to_string(), v.to_string()),
            // `--build-arg KEY`: this process's value, or none (the ARG keeps its default).
            None => match std::env::var(kv) {
                Ok(v) => build_args.insert(kv.clone(), v),
                Err(_) => None,
            },
        };
    }
    let platform = super::registry::platform(a.platform.as_deref())?;
    // Global ARGs (before the first FROM) and the platform ones.
    let mut global_args = BTreeMap::new();
    let (os, arch) = &platform;
    for (k, v) in [
        ("TARGETPLATFORM", format!("{os}/{arch}")),
        ("TARGETOS", os.clone()),
        ("TARGETARCH", arch.clone()),
        ("BUILDPLATFORM", format!("{os}/{arch}")),
        ("BUILDOS", os.clone()),
        ("BUILDARCH", arch.clone()),
    ] {
        global_args.insert(k.to_string(), v);
    }
    for step in &df.global_args {
        if let Instruction::Arg(list) = &step.instruction {
            for (k, d) in list {
                let v = match (build_args.get(k), d) {
                    (Some(v), _) => Some(v.clone()),
                    (None, Some(d)) => Some(
                        words::expand(d, &global_args, df.escape)
                            .map_err(|e| anyhow::anyhow!("{file_name}:{}: {}", step.line, e.0))?,
                    ),
                    (None, None) => None,
                };
                if let Some(v) = v {
                    global_args.insert(k.clone(), v);
                }
            }
        }
    }
    let target = match &a.target {
        Some(t) => df
            .stage_index(t)
            .with_context(|| format!("--target {t}: no such stage"))?,
        None => df.stages.len() - 1,
    };
    let need = needed_stages(&df, target);
    let total = need.iter().map(|i| df.stages[*i].steps.len() + 1).sum();
    let store = open_store(g)?;
    let runtime = super::container::find_program(&a.runtime)
        .with_context(|| format!("OCI runtime {} not found", a.runtime.display()))?;
    let mut b = Builder {
        g,
        a: &a,
        containers: Containers::new(&store),
        store,
        client: a.registry.client()?,
        df,
        file_name,
        context,
        ignore,
        build_args,
        global_args,
        platform,
        step: 0,
        total,
        results: HashMap::new(),
        runtime,
        interrupted: None,
    };
    // Ctrl-C or TERM ends the build between steps (a RUN's container gets the terminal's
    // signal itself), so every writable view is unmounted and removed on the way out.
    let interrupted = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, interrupted.clone())?;
    }
    b.interrupted = Some(interrupted);
    for &i in &need {
        let st = b.run_stage(i)?;
        b.results.insert(i, st);
    }
    let mut st = b.results.remove(&target).context("the target stage")?;
    st.config["created"] = json!(now());
    let name = format!("{CACHE_REPO}:{}", &key_of(&[&st.key, "final"])[..32]);
    let desc = save_image(
        &b.store,
        &st.template,
        st.layers.clone(),
        &st.config,
        &st.annotations,
        &Reference::parse(&name)?,
    )?;
    let manifest = b.store.manifest(&desc.digest)?;
    let id = manifest
        .config
        .digest
        .trim_start_matches("sha256:")
        .to_string();
    println!("Successfully built {}", &id[..12]);
    for t in &tags {
        b.store.tag(t, desc.clone())?;
        println!("Successfully tagged {t}");
    }
    if a.push {
        for t in &tags {
            strata_fs::transfer::push(&b.store, &b.client, &t.to_string(), t, &mut |_| {})
                .with_context(|| format!("pushing {t}"))?;
            println!("pushed {t}");
        }
    }
    eprintln!("built in {:.2}s", started.elapsed().as_secs_f64());
    Ok(())
}
