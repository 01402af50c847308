//! Dockerfiles, parsed as Docker (buildkit's frontend) parses them: parser directives
//! (`# syntax=`, `# escape=`), comments, continuation lines (with blank and comment lines
//! inside), case-insensitive keywords, flags, exec (JSON) and shell forms, heredocs, and
//! stages. Arguments stay raw here: variables are substituted by the builder as it reaches each
//! instruction ([`words`]), because ENV and ARG change them as the file goes.

pub mod ignore;
pub mod words;

use std::collections::BTreeMap;

/// A parse error: the file, the line and what was expected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}:{line}: {message}")]
pub struct ParseError {
    pub file: String,
    pub line: usize,
    pub message: String,
}

/// A command of RUN, CMD, ENTRYPOINT or HEALTHCHECK: exec form (JSON array) or shell form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommandForm {
    Exec(Vec<String>),
    Shell(String),
}

/// A here-document (`<<EOF` … `EOF`) attached to RUN, COPY or ADD.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Heredoc {
    /// The delimiter word (`EOF`); for COPY/ADD also the source name.
    pub name: String,
    pub content: String,
    /// The delimiter was quoted: no variable expansion in the content.
    pub quoted: bool,
    /// `<<-`: leading tabs removed from every line.
    pub strip_tabs: bool,
}

/// HEALTHCHECK's settings (durations as written: `30s`, `1m30s`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Health {
    pub test: Option<CommandForm>,
    pub flags: BTreeMap<String, String>,
}

/// One instruction and what it says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Instruction {
    From {
        image: String,
        alias: Option<String>,
        platform: Option<String>,
    },
    Run {
        command: CommandForm,
        heredocs: Vec<Heredoc>,
        flags: BTreeMap<String, String>,
    },
    Cmd(CommandForm),
    Entrypoint(CommandForm),
    Shell(Vec<String>),
    /// `KEY=VALUE` pairs, values raw (to be expanded).
    Env(Vec<(String, String)>),
    Label(Vec<(String, String)>),
    /// Names with raw defaults.
    Arg(Vec<(String, Option<String>)>),
    Expose(String),
    Volume(VolumeForm),
    User(String),
    Workdir(String),
    Stopsignal(String),
    Maintainer(String),
    Healthcheck(Option<Health>),
    /// COPY (`add == false`) and ADD: raw sources and destination, flags (`--from`, `--chown`,
    /// `--chmod`, `--link`, `--checksum`, …).
    Copy {
        add: bool,
        sources: Vec<String>,
        dest: String,
        heredocs: Vec<Heredoc>,
        flags: BTreeMap<String, String>,
    },
    /// The trigger, as written (run when an image built FROM this one is built).
    Onbuild(String),
}

/// VOLUME's arguments: a JSON array or whitespace-separated words.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VolumeForm {
    Json(Vec<String>),
    Words(String),
}

/// An instruction with where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    /// First line (1-based).
    pub line: usize,
    /// The keyword as written, upper-cased.
    pub keyword: String,
    /// The logical line, continuations joined (for history's `created_by` and messages).
    pub text: String,
    pub instruction: Instruction,
}

/// A stage: its FROM and the instructions after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stage {
    pub from: Step,
    pub steps: Vec<Step>,
}

/// A parsed Dockerfile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dockerfile {
    /// `ARG`s before the first FROM (usable in FROM lines, and in stages that declare them).
    pub global_args: Vec<Step>,
    pub stages: Vec<Stage>,
    pub escape: char,
    /// `# syntax=` as written, if any (recorded; strata's own frontend always parses).
    pub syntax: Option<String>,
}

impl Dockerfile {
    /// The stage named `name` (its alias, case-insensitive, or its index).
    pub fn stage_index(&self, name: &str) -> Option<usize> {
        self.stages
            .iter()
            .position(|s| matches!(&s.from.instruction, Instruction::From { alias: Some(a), .. } if a.eq_ignore_ascii_case(name)))
            .or_else(|| name.parse::<usize>().ok().filter(|i| *i < self.stages.len()))
    }
}

/// Parses a Dockerfile's text; `file` names it in errors.
pub fn parse(text: &str, file: &str) -> Result<Dockerfile, ParseError> {
    let err = |line: usize, message: String| ParseError {
        file: file.to_string(),
        line,
        message,
    };
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let lines: Vec<&str> = text.lines().collect();
    let mut escape = '\\';
    let mut syntax = None;
    let mut i = 0;
    // Parser directives: `# key=value` lines at the very top.
    while i < lines.len() {
        let Some((key, value)) = directive(lines[i]) else {
            break;
        };
        match key.as_str() {
            "escape" => {
                escape = match value.as_str() {
                    "\\" => '\\',
                    "`" => '`',
                    v => {
                        return Err(err(
                            i + 1,
                            format!("invalid escape token {v:?}: expected \\ or `"),
                        ))
                    }
                }
            }
            "syntax" => syntax = Some(value),
            _ => {}
        }
        i += 1;
    }

    let mut steps: Vec<Step> = Vec::new();
    while i < lines.len() {
        let raw = lines[i];
        let start = i + 1;
        i += 1;
        if is_comment(raw) || raw.trim().is_empty() {
            continue;
        }
        let mut line = raw.trim_start().to_string();
        let mut done = !trim_continuation(&mut line, escape);
        while !done && i < lines.len() {
            let next = lines[i];
            i += 1;
            if is_comment(next) || next.trim().is_empty() {
                continue;
            }
            let mut part = next.to_string();
            done = !trim_continuation(&mut part, escape);
            line.push_str(&part);
        }
        let (keyword, rest) = match line.find(char::is_whitespace) {
            Some(p) => (&line[..p], line[p..].trim()),
            None => (line.as_str(), ""),
        };
        let keyword = keyword.to_ascii_uppercase();
        // Heredocs take the lines that follow.
        let mut heredocs = Vec::new();
        if matches!(keyword.as_str(), "RUN" | "COPY" | "ADD") {
            for (name, quoted, strip_tabs) in heredoc_markers(rest, escape) {
                let mut content = String::new();
                let mut closed = false;
                while i < lines.len() {
                    let l = lines[i];
                    i += 1;
                    let cmp = if strip_tabs {
                        l.trim_start_matches('\t')
                    } else {
                        l
                    };
                    if cmp == name {
                        closed = true;
                        break;
                    }
                    content.push_str(cmp);
                    content.push('\n');
                }
                if !closed {
                    return Err(err(
                        start,
                        format!("unterminated heredoc: no line {name:?} closes it"),
                    ));
                }
                heredocs.push(Heredoc {
                    name,
                    content,
                    quoted,
                    strip_tabs,
                });
            }
        }
        let instruction = instruction(&keyword, rest, heredocs, escape)
            .map_err(|m| err(start, format!("{keyword}: {m}")))?;
        steps.push(Step {
            line: start,
            keyword,
            text: line.trim().to_string(),
            instruction,
        });
    }

    let mut global_args = Vec::new();
    let mut stages: Vec<Stage> = Vec::new();
    for step in steps {
        match (&step.instruction, stages.last_mut()) {
            (Instruction::From { .. }, _) => stages.push(Stage {
                from: step,
                steps: Vec::new(),
            }),
            (_, Some(stage)) => stage.steps.push(step),
            (Instruction::Arg(_), None) => global_args.push(step),
            (_, None) => {
                return Err(err(
                    step.line,
                    format!(
                        "{} before the first FROM: only ARG may come first",
                        step.keyword
                    ),
                ))
            }
        }
    }
    if stages.is_empty() {
        return Err(err(
            lines.len().max(1),
            "no FROM instruction: a Dockerfile needs at least one stage".into(),
        ));
    }
    Ok(Dockerfile {
        global_args,
        stages,
        escape,
        syntax,
    })
}

fn is_comment(line: &str) -> bool {
    line.trim_start().starts_with('#')
}

/// `# key=value` (a parser directive), lower-cased key.
fn directive(line: &str) -> Option<(String, String)> {
    let body = line.trim_start().strip_prefix('#')?.trim();
    let (k, v) = body.split_once('=')?;
    let k = k.trim();
    if k.is_empty() || !k.chars().all(|c| c.is_ascii_alphanumeric()) {
        return None;
    }
    Some((k.to_ascii_lowercase(), v.trim().to_string()))
}

/// Removes a trailing escape character (and the whitespace after it); true if there was one.
fn trim_continuation(line: &mut String, escape: char) -> bool {
    let trimmed = line.trim_end();
    if let Some(body) = trimmed.strip_suffix(escape) {
        let n = body.len();
        line.truncate(n);
        true
    } else {
        false
    }
}

/// The heredoc markers on an instruction line: (delimiter, quoted, strip tabs), in order. As in
/// buildkit, only a word that starts with `<<` is one (`$((1<<2))` is not).
fn heredoc_markers(rest: &str, escape: char) -> Vec<(String, bool, bool)> {
    let Ok(words) = words::split_raw(rest, escape) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for w in words {
        let Some(body) = w.strip_prefix("<<") else {
            continue;
        };
        if body.starts_with('<') {
            continue; // a here-string
        }
        let (strip, body) = match body.strip_prefix('-') {
            Some(b) => (true, b),
            None => (false, body),
        };
        let (quoted, name) = match body.chars().next() {
            Some(q @ ('"' | '\'')) => match body[1..].strip_suffix(q) {
                Some(n) => (true, n),
                None => continue,
            },
            _ => (false, body),
        };
        // The delimiter is a word; what follows it (`<<EOF>file`) is shell syntax.
        let end = name
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(name.len());
        if end == 0 || (quoted && end != name.len()) {
            continue;
        }
        out.push((name[..end].to_string(), quoted, strip));
    }
    out
}

/// Leading `--name=value` / `--name` flags of an instruction's arguments.
fn flags(rest: &str) -> (BTreeMap<String, String>, &str) {
    let mut out = BTreeMap::new();
    let mut rest = rest.trim_start();
    while let Some(body) = rest.strip_prefix("--") {
        let end = body.find(char::is_whitespace).unwrap_or(body.len());
        let flag = &body[..end];
        if flag.is_empty() {
            break;
        }
        match flag.split_once('=') {
            Some((k, v)) => out.insert(k.to_ascii_lowercase(), v.to_string()),
            None => out.insert(flag.to_ascii_lowercase(), "true".to_string()),
        };
        rest = body[end..].trim_start();
    }
    (out, rest)
}

/// A JSON array of strings, if `rest` is one.
fn json_array(rest: &str) -> Option<Result<Vec<String>, String>> {
    let t = rest.trim();
    if !t.starts_with('[') {
        return None;
    }
    match serde_json::from_str::<Vec<String>>(t) {
        Ok(v) => Some(Ok(v)),
        // Docker falls back to the shell form when the JSON does not parse.
        Err(_) if !t.ends_with(']') => None,
        Err(e) => Some(Err(format!("not a JSON array of strings: {e}"))),
    }
}

fn command_form(rest: &str) -> Result<CommandForm, String> {
    match json_array(rest) {
        Some(Ok(v)) => Ok(CommandForm::Exec(v)),
        Some(Err(_)) => Ok(CommandForm::Shell(rest.to_string())),
        None => Ok(CommandForm::Shell(rest.to_string())),
    }
}

/// `KEY=VALUE …` pairs (ENV, LABEL), or the legacy `KEY VALUE` form.
fn pairs(rest: &str, escape: char, legacy: bool) -> Result<Vec<(String, String)>, String> {
    if rest.is_empty() {
        return Err("expected at least one KEY=VALUE".into());
    }
    let words = words::split_raw(rest, escape).map_err(|e| e.0)?;
    let first_has_eq = words.first().is_some_and(|w| w.contains('='));
    if !first_has_eq {
        if !legacy {
            return Err(format!("expected KEY=VALUE, got {:?}", words[0]));
        }
        let (k, v) = match rest.find(char::is_whitespace) {
            Some(p) => (&rest[..p], rest[p..].trim_start()),
            None => {
                return Err(format!(
                    "{rest:?} has no value: expected KEY=VALUE or KEY VALUE"
                ))
            }
        };
        return Ok(vec![(k.to_string(), v.to_string())]);
    }
    words
        .into_iter()
        .map(|w| match w.split_once('=') {
            Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
            _ => Err(format!("expected KEY=VALUE, got {w:?}")),
        })
        .collect()
}

fn single(rest: &str) -> Result<String, String> {
    if rest.is_empty() {
        Err("expected an argument".into())
    } else {
        Ok(rest.to_string())
    }
}

fn instruction(
    keyword: &str,
    rest: &str,
    heredocs: Vec<Heredoc>,
    escape: char,
) -> Result<Instruction, String> {
    Ok(match keyword {
        "FROM" => {
            let (f, rest) = flags(rest);
            let words: Vec<&str> = rest.split_whitespace().collect();
            let (image, alias) = match words.as_slice() {
                [image] => (image.to_string(), None),
                [image, kw, alias] if kw.eq_ignore_ascii_case("as") => {
                    (image.to_string(), Some(alias.to_string()))
                }
                _ => return Err("expected FROM [--platform=P] IMAGE [AS NAME]".into()),
            };
            Instruction::From {
                image,
                alias,
                platform: f.get("platform").cloned(),
            }
        }
        "RUN" => {
            let (f, rest) = flags(rest);
            if rest.is_empty() && heredocs.is_empty() {
                return Err("expected a command".into());
            }
            Instruction::Run {
                command: command_form(rest)?,
                heredocs,
                flags: f,
            }
        }
        "CMD" => Instruction::Cmd(command_form(&single(rest)?)?),
        "ENTRYPOINT" => Instruction::Entrypoint(command_form(&single(rest)?)?),
        "SHELL" => match json_array(rest) {
            Some(Ok(v)) if !v.is_empty() => Instruction::Shell(v),
            _ => return Err("expected a JSON array, e.g. SHELL [\"/bin/sh\", \"-c\"]".into()),
        },
        "ENV" => Instruction::Env(pairs(rest, escape, true)?),
        "LABEL" => Instruction::Label(pairs(rest, escape, false)?),
        "ARG" => {
            let words = words::split_raw(rest, escape).map_err(|e| e.0)?;
            if words.is_empty() {
                return Err("expected a name".into());
            }
            Instruction::Arg(
                words
                    .into_iter()
                    .map(|w| match w.split_once('=') {
                        Some((k, v)) => (k.to_string(), Some(v.to_string())),
                        None => (w, None),
                    })
                    .collect(),
            )
        }
        "EXPOSE" => Instruction::Expose(single(rest)?),
        "VOLUME" => match json_array(rest) {
            Some(Ok(v)) => Instruction::Volume(VolumeForm::Json(v)),
            Some(Err(e)) => return Err(e),
            None => Instruction::Volume(VolumeForm::Words(single(rest)?)),
        },
        "USER" => Instruction::User(single(rest)?),
        "WORKDIR" => Instruction::Workdir(single(rest)?),
        "STOPSIGNAL" => Instruction::Stopsignal(single(rest)?),
        "MAINTAINER" => Instruction::Maintainer(single(rest)?),
        "HEALTHCHECK" => {
            let (f, rest) = flags(rest);
            if rest.eq_ignore_ascii_case("none") {
                Instruction::Healthcheck(None)
            } else {
                let (kw, cmd) = match rest.find(char::is_whitespace) {
                    Some(p) => (&rest[..p], rest[p..].trim()),
                    None => (rest, ""),
                };
                if !kw.eq_ignore_ascii_case("cmd") || cmd.is_empty() {
                    return Err("expected HEALTHCHECK [OPTIONS] CMD command, or NONE".into());
                }
                for k in f.keys() {
                    if !matches!(
                        k.as_str(),
                        "interval" | "timeout" | "start-period" | "start-interval" | "retries"
                    ) {
                        return Err(format!("unknown flag --{k}"));
                    }
                }
                Instruction::Healthcheck(Some(Health {
                    test: Some(command_form(cmd)?),
                    flags: f,
                }))
            }
        }
        "COPY" | "ADD" => {
            let (f, rest) = flags(rest);
            let mut list = match json_array(rest) {
                Some(Ok(v)) => v,
                Some(Err(e)) => return Err(e),
                None => words::split_raw(rest, escape).map_err(|e| e.0)?,
            };
            // Heredoc markers are sources named by their delimiter.
            for h in &heredocs {
                for w in list.iter_mut() {
                    let marker = w.trim_start_matches("<<").trim_start_matches('-');
                    let marker = marker.trim_matches(|c| c == '"' || c == '\'');
                    if w.starts_with("<<") && marker == h.name {
                        *w = format!("<<{}", h.name);
                    }
                }
            }
            if list.len() < 2 {
                return Err(format!(
                    "expected at least one source and a destination, got {list:?}"
                ));
            }
            let dest = list.pop().unwrap_or_default();
            Instruction::Copy {
                add: keyword == "ADD",
                sources: list,
                dest,
                heredocs,
                flags: f,
            }
        }
        "ONBUILD" => {
            let inner = rest
                .split_whitespace()
                .next()
                .unwrap_or("")
                .to_ascii_uppercase();
            match inner.as_str() {
                "" => return Err("expected an instruction to trigger".into()),
                "ONBUILD" | "FROM" | "MAINTAINER" => {
                    return Err(format!("{inner} is not allowed as an ONBUILD trigger"))
                }
                _ => {}
            }
            instruction(&inner, rest[inner.len()..].trim(), Vec::new(), escape)?;
            Instruction::Onbuild(rest.to_string())
        }
        other => return Err(format!("unknown instruction {other}")),
    })
}

#[cfg(test)]
mod tests;
