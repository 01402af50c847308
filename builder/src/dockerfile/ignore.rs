//! `.dockerignore`: which context paths a build leaves out. Patterns are Go `filepath.Match`
//! globs (`*`, `?`, `[a-z]`, `[^a-z]`, `\` escapes) over `/`-separated paths relative to the
//! context, with `**` for any number of directories; a leading `!` re-includes; the last
//! pattern that matches decides; a pattern matching a directory covers everything below it.

/// One pattern.
#[derive(Debug, Clone)]
struct Pattern {
    segments: Vec<String>,
    include: bool,
}

/// The patterns of a `.dockerignore` file.
#[derive(Debug, Clone, Default)]
pub struct Ignore {
    patterns: Vec<Pattern>,
}

/// Lexically cleans a path (`.`, `..`, repeated and trailing `/`), as Go's `filepath.Clean`,
/// without a leading `/`.
fn clean(p: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for seg in p.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            s => out.push(s.to_string()),
        }
    }
    out
}

impl Ignore {
    /// Parses a `.dockerignore` file's text (comments `#`, blank lines skipped).
    pub fn parse(text: &str) -> Ignore {
        let mut patterns = Vec::new();
        for line in text.lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (include, body) = match line.strip_prefix('!') {
                Some(b) => (true, b.trim()),
                None => (false, line),
            };
            let segments = clean(body);
            if segments.is_empty() {
                continue;
            }
            patterns.push(Pattern { segments, include });
        }
        Ignore { patterns }
    }

    /// Whether `path` (relative to the context, `/`-separated) is left out.
    pub fn excluded(&self, path: &str) -> bool {
        let path = clean(path);
        let mut excluded = false;
        for p in &self.patterns {
            // The pattern matches the path itself or one of its parent directories.
            let hit = (1..=path.len()).any(|n| match_segments(&p.segments, &path[..n]));
            if hit {
                excluded = !p.include;
            }
        }
        excluded
    }

    /// Whether any re-include pattern could match below `dir`: then an excluded directory must
    /// still be walked.
    pub fn may_include_below(&self, dir: &str) -> bool {
        let dir = clean(dir);
        self.patterns.iter().any(|p| {
            p.include
                && (p.segments.iter().any(|s| s == "**")
                    || (p.segments.len() > dir.len()
                        && match_segments(&p.segments[..dir.len()], &dir)))
        })
    }
}

fn match_segments(pat: &[String], path: &[String]) -> bool {
    match pat.split_first() {
        None => path.is_empty(),
        Some((first, rest)) if first == "**" => {
            (0..=path.len()).any(|skip| match_segments(rest, &path[skip..]))
        }
        Some((first, rest)) => match path.split_first() {
            Some((seg, path_rest)) => glob(first, seg) && match_segments(rest, path_rest),
            None => false,
        },
    }
}

/// Go's `filepath.Match` on one path segment (bad patterns match nothing).
pub fn glob(pattern: &str, name: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let n: Vec<char> = name.chars().collect();
    glob_at(&p, &n)
}

fn glob_at(p: &[char], n: &[char]) -> bool {
    match p.first() {
        None => n.is_empty(),
        Some('*') => (0..=n.len()).any(|k| glob_at(&p[1..], &n[k..])),
        Some('?') => !n.is_empty() && glob_at(&p[1..], &n[1..]),
        Some('[') => {
            let Some(c) = n.first() else { return false };
            match class(&p[1..], *c) {
                Some((matched, used)) => matched && glob_at(&p[1 + used..], &n[1..]),
                None => false,
            }
        }
        Some('\\') if p.len() > 1 => n.first() == Some(&p[1]) && glob_at(&p[2..], &n[1..]),
        Some(c) => n.first() == Some(c) && glob_at(&p[1..], &n[1..]),
    }
}

/// A `[...]` class after its `[`: whether `c` is in it and how many pattern chars it used
/// (through `]`); `None` if malformed.
fn class(p: &[char], c: char) -> Option<(bool, usize)> {
    let mut i = 0;
    let negate = matches!(p.first(), Some('^'));
    if negate {
        i += 1;
    }
    let mut matched = false;
    let mut first = true;
    loop {
        let lo = match p.get(i)? {
            ']' if !first => return Some((matched != negate, i + 1)),
            '\\' => {
                i += 1;
                *p.get(i)?
            }
            ch => *ch,
        };
        i += 1;
        first = false;
        let hi = if p.get(i) == Some(&'-') && p.get(i + 1).is_some_and(|c| *c != ']') {
            i += 1;
            let hi = match p.get(i)? {
                '\\' => {
                    i += 1;
                    *p.get(i)?
                }
                ch => *ch,
            };
            i += 1;
            hi
        } else {
            lo
        };
        if lo <= c && c <= hi {
            matched = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_semantics() {
        let ig = Ignore::parse(
            "# comment\n*.md\n!README.md\ntemp?\n**/*.log\nbuild/\n/secret\n[a-c]x\nvendor/**/test\n",
        );
        assert!(ig.excluded("notes.md"));
        assert!(!ig.excluded("README.md"));
        assert!(!ig.excluded("docs/notes.md")); // `*` does not cross `/`
        assert!(ig.excluded("temp1"));
        assert!(!ig.excluded("temp12"));
        assert!(ig.excluded("a.log"));
        assert!(ig.excluded("x/y/z.log"));
        assert!(ig.excluded("build"));
        assert!(ig.excluded("build/out/bin")); // under an excluded directory
        assert!(ig.excluded("secret"));
        assert!(ig.excluded("bx"));
        assert!(!ig.excluded("dx"));
        assert!(ig.excluded("vendor/a/b/test"));
        assert!(ig.excluded("vendor/test"));
        assert!(!ig.excluded("src/main.c"));
        assert!(glob("[^a]b", "cb") && !glob("[^a]b", "ab"));
        assert!(glob("a\\*b", "a*b") && !glob("a\\*b", "axb"));
        let re = Ignore::parse("dir\n!dir/keep\n");
        assert!(re.excluded("dir/other"));
        assert!(!re.excluded("dir/keep"));
        assert!(re.may_include_below("dir"));
    }
}
