//! Docker's word processing for Dockerfile arguments: quotes, the escape character and
//! variable substitution (`$VAR`, `${VAR}`, `${VAR:-word}`, `${VAR-word}`, `${VAR:+word}`,
//! `${VAR+word}`, `${VAR:?message}`, `${VAR?message}`), as buildkit's shell lexer does it.

use std::collections::BTreeMap;

/// The variables in scope for an instruction: build args in use and the stage's environment.
pub type Vars = BTreeMap<String, String>;

/// Why a word could not be processed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WordError(pub String);

struct Lexer<'a> {
    chars: Vec<char>,
    at: usize,
    escape: char,
    vars: &'a Vars,
}

impl Lexer<'_> {
    fn peek(&self) -> Option<char> {
        self.chars.get(self.at).copied()
    }

    fn next(&mut self) -> Option<char> {
        let c = self.peek()?;
        self.at += 1;
        Some(c)
    }

    /// Processes until the end, or until an unquoted, unescaped whitespace when `split`;
    /// returns the words.
    fn words(&mut self, split: bool) -> Result<Vec<String>, WordError> {
        let mut out = Vec::new();
        let mut word = String::new();
        let mut in_word = false;
        while let Some(c) = self.next() {
            match c {
                c if split && c.is_whitespace() => {
                    if in_word {
                        out.push(std::mem::take(&mut word));
                        in_word = false;
                    }
                }
                '\'' => {
                    in_word = true;
                    loop {
                        match self.next() {
                            Some('\'') => break,
                            Some(c) => word.push(c),
                            None => return Err(WordError("unexpected end of statement while looking for matching single-quote".into())),
                        }
                    }
                }
                '"' => {
                    in_word = true;
                    loop {
                        match self.next() {
                            Some('"') => break,
                            Some('$') => word.push_str(&self.variable()?),
                            Some(c) if c == self.escape => match self.next() {
                                // Inside double quotes the escape only escapes these.
                                Some(n) if matches!(n, '"' | '$') || n == self.escape => {
                                    word.push(n)
                                }
                                Some(n) => {
                                    word.push(c);
                                    word.push(n);
                                }
                                None => word.push(c),
                            },
                            Some(c) => word.push(c),
                            None => return Err(WordError("unexpected end of statement while looking for matching double-quote".into())),
                        }
                    }
                }
                '$' => {
                    in_word = true;
                    word.push_str(&self.variable()?);
                }
                c if c == self.escape => {
                    in_word = true;
                    match self.next() {
                        Some(n) => word.push(n),
                        None => word.push(c),
                    }
                }
                c => {
                    in_word = true;
                    word.push(c);
                }
            }
        }
        if in_word || (!split && out.is_empty()) {
            out.push(word);
        }
        Ok(out)
    }

    fn name(&mut self) -> String {
        let mut name = String::new();
        while let Some(c) = self.peek() {
            if c.is_ascii_alphanumeric() || c == '_' {
                name.push(c);
                self.at += 1;
            } else {
                break;
            }
        }
        name
    }

    /// After a `$`: the value of the variable reference that follows.
    fn variable(&mut self) -> Result<String, WordError> {
        match self.peek() {
            Some('{') => {
                self.at += 1;
                let name = self.name();
                if name.is_empty() {
                    return Err(WordError(
                        "bad substitution: missing variable name in ${}".into(),
                    ));
                }
                let value = self.vars.get(&name);
                match self.next() {
                    Some('}') => Ok(value.cloned().unwrap_or_default()),
                    Some(':') => {
                        let op = self.next();
                        let word = self.until_brace()?;
                        let set = value.is_some_and(|v| !v.is_empty());
                        self.modifier(op, set, value, &name, &word)
                    }
                    Some(op @ ('-' | '+' | '?')) => {
                        let word = self.until_brace()?;
                        self.modifier(Some(op), value.is_some(), value, &name, &word)
                    }
                    Some(c) => Err(WordError(format!(
                        "unsupported modifier ({c}) in substitution of ${{{name}}}"
                    ))),
                    None => Err(WordError(format!("missing '}}' in ${{{name}"))),
                }
            }
            Some(c) if c.is_ascii_alphabetic() || c == '_' => {
                let name = self.name();
                Ok(self.vars.get(&name).cloned().unwrap_or_default())
            }
            // A lone `$` is literal.
            _ => Ok("$".into()),
        }
    }

    fn modifier(
        &self,
        op: Option<char>,
        set: bool,
        value: Option<&String>,
        name: &str,
        word: &str,
    ) -> Result<String, WordError> {
        match op {
            Some('-') => Ok(if set {
                value.cloned().unwrap_or_default()
            } else {
                word.to_string()
            }),
            Some('+') => Ok(if set { word.to_string() } else { String::new() }),
            Some('?') => {
                if set {
                    Ok(value.cloned().unwrap_or_default())
                } else if word.is_empty() {
                    Err(WordError(format!("{name}: parameter null or not set")))
                } else {
                    Err(WordError(format!("{name}: {word}")))
                }
            }
            Some(c) => Err(WordError(format!(
                "unsupported modifier (:{c}) in substitution of ${{{name}}}"
            ))),
            None => Err(WordError(format!("missing '}}' in ${{{name}"))),
        }
    }

    /// The word of a `${VAR:-word}` up to its closing brace, itself processed.
    fn until_brace(&mut self) -> Result<String, WordError> {
        let mut out = String::new();
        let mut depth = 0usize;
        loop {
            match self.next() {
                None => return Err(WordError("missing '}' in a substitution".into())),
                Some('}') if depth == 0 => break,
                Some('}') => {
                    depth -= 1;
                    out.push('}');
                }
                Some('$') if self.peek() == Some('{') => {
                    // A nested reference: keep it for the recursive pass.
                    out.push('$');
                    out.push('{');
                    self.at += 1;
                    depth += 1;
                }
                Some(c) if c == self.escape => {
                    out.push(c);
                    if let Some(n) = self.next() {
                        out.push(n);
                    }
                }
                Some(c) => out.push(c),
            }
        }
        let mut inner = Lexer {
            chars: out.chars().collect(),
            at: 0,
            escape: self.escape,
            vars: self.vars,
        };
        Ok(inner.words(false)?.concat())
    }
}

/// One word: quotes removed, escapes applied, variables substituted (ENV values, WORKDIR,
/// USER, …).
pub fn expand(word: &str, vars: &Vars, escape: char) -> Result<String, WordError> {
    let mut lx = Lexer {
        chars: word.chars().collect(),
        at: 0,
        escape,
        vars,
    };
    Ok(lx.words(false)?.concat())
}

/// Heredoc content: variables substituted, quotes and other escapes left as written (buildkit's
/// `SkipProcessQuotes`); `\$` is a literal `$`.
pub fn expand_raw(text: &str, vars: &Vars, escape: char) -> Result<String, WordError> {
    let mut lx = Lexer {
        chars: text.chars().collect(),
        at: 0,
        escape,
        vars,
    };
    let mut out = String::new();
    while let Some(c) = lx.next() {
        if c == escape && lx.peek() == Some('$') {
            lx.at += 1;
            out.push('$');
        } else if c == '$' {
            out.push_str(&lx.variable()?);
        } else {
            out.push(c);
        }
    }
    Ok(out)
}

/// Several words split at unquoted whitespace, each processed (COPY sources, EXPOSE, …).
pub fn expand_words(text: &str, vars: &Vars, escape: char) -> Result<Vec<String>, WordError> {
    let mut lx = Lexer {
        chars: text.chars().collect(),
        at: 0,
        escape,
        vars,
    };
    lx.words(true)
}

/// Splits at unquoted whitespace without processing anything (quotes kept): how `KEY=VALUE`
/// lists of ENV, LABEL and ARG are cut before each value is expanded.
pub fn split_raw(text: &str, escape: char) -> Result<Vec<String>, WordError> {
    let mut out = Vec::new();
    let mut word = String::new();
    let mut quote: Option<char> = None;
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        match (quote, c) {
            (None, c) if c.is_whitespace() => {
                if !word.is_empty() {
                    out.push(std::mem::take(&mut word));
                }
            }
            (None, '\'' | '"') => {
                quote = Some(c);
                word.push(c);
            }
            (Some(q), c) if c == q => {
                quote = None;
                word.push(c);
            }
            (Some('\''), c) => word.push(c),
            (_, c) if c == escape => {
                word.push(c);
                if let Some(n) = chars.next() {
                    word.push(n);
                }
            }
            (_, c) => word.push(c),
        }
    }
    if let Some(q) = quote {
        return Err(WordError(format!("unmatched {q} quote")));
    }
    if !word.is_empty() {
        out.push(word);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn vars() -> Vars {
        [("A", "1"), ("EMPTY", ""), ("P", "/usr/bin")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn substitution_and_quotes() {
        let v = vars();
        let e = |s: &str| expand(s, &v, '\\').unwrap();
        assert_eq!(e("$A"), "1");
        assert_eq!(e("${A}x"), "1x");
        assert_eq!(e("$Ax"), "");
        assert_eq!(e("${NONE:-dflt}"), "dflt");
        assert_eq!(e("${EMPTY:-dflt}"), "dflt");
        assert_eq!(e("${EMPTY-dflt}"), "");
        assert_eq!(e("${A:+set}"), "set");
        assert_eq!(e("${NONE:+set}"), "");
        assert_eq!(e("${NONE:-$P/x}"), "/usr/bin/x");
        assert_eq!(e("'$A'"), "$A");
        assert_eq!(e("\"$A b\""), "1 b");
        assert_eq!(e("\\$A"), "$A");
        assert_eq!(e("a\\ b"), "a b");
        assert_eq!(e("$"), "$");
        assert_eq!(e("cost: 5$"), "cost: 5$");
        assert!(expand("${NONE:?must be set}", &v, '\\')
            .unwrap_err()
            .0
            .contains("must be set"));
        assert!(expand("${A", &v, '\\').is_err());
        assert!(expand("'open", &v, '\\').is_err());
        assert_eq!(expand("`$A", &v, '`').unwrap(), "$A");
        assert_eq!(
            expand_raw("echo 'q' $A \"it's\" \\$A printf \"a\\tb\"", &v, '\\').unwrap(),
            "echo 'q' 1 \"it's\" $A printf \"a\\tb\""
        );
    }

    #[test]
    fn words_and_raw_split() {
        let v = vars();
        assert_eq!(
            expand_words("a \"b c\" $A '$A d'", &v, '\\').unwrap(),
            vec!["a", "b c", "1", "$A d"]
        );
        assert_eq!(
            split_raw("K=\"a b\" L='x y' M=z\\ w", '\\').unwrap(),
            vec!["K=\"a b\"", "L='x y'", "M=z\\ w"]
        );
        assert!(split_raw("K=\"open", '\\').is_err());
    }
}
