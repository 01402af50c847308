//! The node's config file: defaults for command-line settings, so an operator writes them once.
//!
//! The file is `--config FILE`, else `$STRATA_CONFIG`, else `/etc/strata/config.toml` when it
//! exists. Each setting becomes the default of the matching flag in every command that has it,
//! so a flag or its environment variable still wins over the file:
//!
//! ```toml
//! root = "/var/lib/strata"
//! log_level = "info"
//! [cache]
//! size = "20G"          # --cache-size
//! memory = "512M"       # --memory-cache
//! local = false         # --cache-local
//! [limits]
//! max_entries = 1000000 # --max-entries (per image; bounds a hostile TOC's memory)
//! [mount]
//! threads = 4           # --threads
//! read_ahead_kb = 1024  # --read-ahead-kb
//! prefetch = true       # false = --no-prefetch
//! passthrough = false   # --passthrough
//! [registry]
//! insecure = ["registry.lan:5000"]   # --insecure-registry
//! timeout = 15                       # --registry-timeout
//! attempts = 3                       # --registry-attempts
//! hosts_dir = "/etc/strata/certs.d"  # --hosts-dir
//! [metrics]
//! address = "127.0.0.1:9464"         # strata metrics --listen
//! ```
//!
//! Unknown keys and values of the wrong kind are errors naming the key and the file.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

/// Where the config file is looked for when neither `--config` nor `STRATA_CONFIG` names one.
pub const DEFAULT_PATH: &str = "/etc/strata/config.toml";

/// How a setting reaches the command line.
#[derive(Clone, Copy)]
enum Kind {
    /// A value (string, number) for an option.
    Value,
    /// A boolean for an on/off flag.
    Flag,
    /// A boolean for a flag that turns the setting off (`prefetch = false` is `--no-prefetch`).
    NegatedFlag,
    /// A list of strings for a repeatable option.
    List,
}

/// Config keys, an argument (by clap id) each sets the default of, the only top-level command
/// it applies to there (`None`: every command with that argument), and its kind. A key may set
/// several arguments.
#[rustfmt::skip]
const SETTINGS: &[(&str, &str, Option<&str>, Kind)] = &[
    ("root", "root", None, Kind::Value),
    ("log_level", "log_level", None, Kind::Value),
    ("cache.size", "cache_size", Some("mount"), Kind::Value),
    ("cache.size", "max_size", Some("cache"), Kind::Value),
    ("cache.size", "cache_size", Some("daemon"), Kind::Value),
    ("cache.memory", "memory_cache", Some("mount"), Kind::Value),
    ("cache.memory", "memory_cache", Some("daemon"), Kind::Value),
    ("cache.local", "cache_local", Some("mount"), Kind::Flag),
    ("limits.max_entries", "max_entries", None, Kind::Value),
    ("mount.threads", "threads", Some("mount"), Kind::Value),
    ("mount.read_ahead_kb", "read_ahead_kb", Some("mount"), Kind::Value),
    ("mount.prefetch", "no_prefetch", Some("mount"), Kind::NegatedFlag),
    ("mount.passthrough", "passthrough", Some("mount"), Kind::Flag),
    ("registry.insecure", "insecure", None, Kind::List),
    ("registry.timeout", "registry_timeout", None, Kind::Value),
    ("registry.attempts", "registry_attempts", None, Kind::Value),
    ("registry.hosts_dir", "hosts_dir", None, Kind::Value),
    ("metrics.address", "listen", Some("metrics"), Kind::Value),
];

/// A default read from a config file.
#[derive(Debug)]
struct Setting {
    id: &'static str,
    scope: Option<&'static str>,
    values: Vec<String>,
}

/// Defaults read from a config file.
#[derive(Debug, Default)]
pub struct Defaults(Vec<Setting>);

/// The config file named on the command line (looked for before parsing, since the file sets
/// the parser's defaults) or in the environment, or the default one if it exists.
pub fn locate(args: &[OsString]) -> Option<PathBuf> {
    let mut it = args.iter().skip(1);
    while let Some(a) = it.next() {
        if a == "--" {
            break;
        }
        if a == "--config" {
            return it.next().map(PathBuf::from);
        }
        if let Some(p) = a.to_str().and_then(|s| s.strip_prefix("--config=")) {
            return Some(PathBuf::from(p));
        }
    }
    if let Some(p) = std::env::var_os("STRATA_CONFIG").filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(p));
    }
    let default = PathBuf::from(DEFAULT_PATH);
    default.exists().then_some(default)
}

/// Reads the config file at `path`.
pub fn load(path: &Path) -> anyhow::Result<Defaults> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    parse(&text).with_context(|| format!("in config file {}", path.display()))
}

fn parse(text: &str) -> anyhow::Result<Defaults> {
    let doc: toml::Table = text.parse()?;
    let mut flat: Vec<(String, &toml::Value)> = Vec::new();
    for (k, v) in &doc {
        match v {
            toml::Value::Table(t) => {
                flat.extend(t.iter().map(|(k2, v2)| (format!("{k}.{k2}"), v2)))
            }
            _ => flat.push((k.clone(), v)),
        }
    }
    let mut out = Vec::new();
    for (key, value) in flat {
        let targets: Vec<_> = SETTINGS.iter().filter(|s| s.0 == key).collect();
        let Some(&&(_, _, _, kind)) = targets.first() else {
            let mut known: Vec<&str> = SETTINGS.iter().map(|s| s.0).collect();
            known.dedup();
            bail!("unknown setting `{key}` (known: {})", known.join(", "));
        };
        let wrong = |want: &str| anyhow::anyhow!("`{key}` must be {want}, not {value}");
        let values = match (kind, value) {
            (Kind::Value, toml::Value::String(s)) => vec![s.clone()],
            (Kind::Value, toml::Value::Integer(i)) => vec![i.to_string()],
            (Kind::Value, _) => return Err(wrong("a string or an integer")),
            (Kind::Flag, toml::Value::Boolean(b)) => vec![b.to_string()],
            (Kind::NegatedFlag, toml::Value::Boolean(b)) => vec![(!b).to_string()],
            (Kind::Flag | Kind::NegatedFlag, _) => return Err(wrong("true or false")),
            (Kind::List, toml::Value::Array(items)) => items
                .iter()
                .map(|i| {
                    i.as_str()
                        .map(str::to_string)
                        .ok_or_else(|| wrong("a list of strings"))
                })
                .collect::<anyhow::Result<_>>()?,
            (Kind::List, _) => return Err(wrong("a list of strings")),
        };
        for &&(_, id, scope, _) in &targets {
            out.push(Setting {
                id,
                scope,
                values: values.clone(),
            });
        }
    }
    Ok(Defaults(out))
}

/// Makes the config's values the defaults of the matching arguments of `cmd` (the top-level
/// command) and of its subcommands at every depth.
pub fn apply(cmd: clap::Command, defaults: &Defaults) -> clap::Command {
    apply_to(cmd, defaults, None)
}

/// `top` is the top-level command `cmd` belongs to (`None` for the program itself).
fn apply_to(mut cmd: clap::Command, defaults: &Defaults, top: Option<&str>) -> clap::Command {
    for s in &defaults.0 {
        let in_scope = s.scope.is_none() || s.scope == top;
        if in_scope && cmd.get_arguments().any(|a| a.get_id() == s.id) {
            let values = s.values.clone();
            cmd = cmd.mut_arg(s.id, move |a| a.default_values(values));
        }
    }
    let names: Vec<String> = cmd
        .get_subcommands()
        .map(|s| s.get_name().to_string())
        .collect();
    for name in names {
        let top = top.unwrap_or(&name).to_string();
        cmd = cmd.mut_subcommand(name.as_str(), |s| apply_to(s, defaults, Some(&top)));
    }
    cmd
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn settings_parse_and_bad_ones_are_named() {
        let d = parse(
            "root = \"/srv/strata\"\n[cache]\nsize = \"20G\"\n[mount]\nprefetch = false\n\
             [registry]\ninsecure = [\"a:5000\", \"b\"]\ntimeout = 5\n",
        )
        .unwrap();
        let get = |id: &str| d.0.iter().find(|s| s.id == id).map(|s| s.values.clone());
        assert_eq!(get("root"), Some(vec!["/srv/strata".to_string()]));
        assert_eq!(get("cache_size"), Some(vec!["20G".to_string()]));
        assert_eq!(get("no_prefetch"), Some(vec!["true".to_string()]));
        assert_eq!(get("insecure").map(|v| v.len()), Some(2));
        assert_eq!(get("registry_timeout"), Some(vec!["5".to_string()]));
        let e = parse("[cache]\nsise = 1\n").unwrap_err().to_string();
        assert!(e.contains("unknown setting `cache.sise`"), "{e}");
        let e = parse("[mount]\npassthrough = \"yes\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("`mount.passthrough` must be true or false"),
            "{e}"
        );
        let e = parse("root = \n").unwrap_err().to_string();
        assert!(e.contains("line 1"), "{e}");
    }

    #[test]
    fn defaults_reach_their_commands_only() {
        let d = parse("[mount]\nthreads = 7\n[registry]\ntimeout = 9\n").unwrap();
        let cmd = apply(crate::Cli::command(), &d);
        let m = cmd
            .clone()
            .try_get_matches_from(["strata", "mount", "img", "/mnt"])
            .unwrap();
        let (_, sub) = m.subcommand().unwrap();
        assert_eq!(sub.get_one::<usize>("threads"), Some(&7));
        assert_eq!(sub.get_one::<u64>("registry_timeout"), Some(&9));
        // `convert --threads` is a different setting; a flag still wins over the file.
        let m = cmd
            .try_get_matches_from([
                "strata",
                "convert",
                "oci:/x",
                "n",
                "--registry-timeout",
                "2",
            ])
            .unwrap();
        let (_, sub) = m.subcommand().unwrap();
        assert_ne!(sub.get_one::<usize>("threads"), Some(&7));
        assert_eq!(sub.get_one::<u64>("registry_timeout"), Some(&2));
        // Nested: `cache gc` trims to the configured cache size.
        let d = parse("[cache]\nsize = \"3G\"\n[mount]\npassthrough = true\n").unwrap();
        let cmd = apply(crate::Cli::command(), &d);
        let m = cmd
            .clone()
            .try_get_matches_from(["strata", "cache", "gc"])
            .unwrap();
        let cache = m.subcommand().unwrap().1;
        let gc = cache.subcommand().unwrap().1;
        assert_eq!(gc.get_one::<u64>("max_size"), Some(&(3u64 << 30)));
        // An on/off setting from the file can be turned off on the command line.
        for (extra, want) in [(Some("--passthrough=false"), false), (None, true)] {
            let mut argv = vec!["strata", "mount", "img", "/mnt"];
            argv.extend(extra);
            let m = cmd.clone().try_get_matches_from(argv).unwrap();
            let sub = m.subcommand().unwrap().1;
            assert_eq!(sub.get_one::<bool>("passthrough"), Some(&want));
        }
    }

    #[test]
    fn the_config_file_is_found_on_the_command_line_first() {
        let args = |v: &[&str]| v.iter().map(OsString::from).collect::<Vec<_>>();
        assert_eq!(
            locate(&args(&["strata", "--config", "/x.toml", "images"])),
            Some(PathBuf::from("/x.toml"))
        );
        assert_eq!(
            locate(&args(&["strata", "images", "--config=/y.toml"])),
            Some(PathBuf::from("/y.toml"))
        );
    }
}
