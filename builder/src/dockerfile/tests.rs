#![allow(clippy::unwrap_used)]
//! Tricky Dockerfiles with the instructions or errors expected of them.

use super::*;

fn steps(text: &str) -> Vec<(String, Instruction)> {
    let df = parse(text, "Dockerfile").unwrap();
    let mut out: Vec<(String, Instruction)> = df
        .global_args
        .iter()
        .map(|s| (s.keyword.clone(), s.instruction.clone()))
        .collect();
    for st in &df.stages {
        out.push((st.from.keyword.clone(), st.from.instruction.clone()));
        out.extend(
            st.steps
                .iter()
                .map(|s| (s.keyword.clone(), s.instruction.clone())),
        );
    }
    out
}

fn error(text: &str) -> ParseError {
    parse(text, "Dockerfile").unwrap_err()
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

#[test]
fn continuations_comments_and_case() {
    let s = steps(
        "# syntax=docker/dockerfile:1\n\nfrom busybox AS Base\nrun echo a \\\n\n  # a comment inside\n  && echo b\ncmd [\"sh\", \"-c\", \"echo hi\"]\n",
    );
    assert_eq!(
        s[0].1,
        Instruction::From {
            image: "busybox".into(),
            alias: Some("Base".into()),
            platform: None
        }
    );
    assert_eq!(s[1].0, "RUN");
    assert_eq!(
        s[1].1,
        Instruction::Run {
            command: CommandForm::Shell("echo a   && echo b".into()),
            heredocs: vec![],
            flags: BTreeMap::new()
        }
    );
    assert_eq!(
        s[2].1,
        Instruction::Cmd(CommandForm::Exec(strings(&["sh", "-c", "echo hi"])))
    );
    let df = parse("# syntax=docker/dockerfile:1\nFROM a\n", "f").unwrap();
    assert_eq!(df.syntax.as_deref(), Some("docker/dockerfile:1"));
}

#[test]
fn escape_directive() {
    let s = steps("# escape=`\nFROM windows\nRUN dir c:\\ `\n  && echo done\n");
    assert_eq!(
        s[1].1,
        Instruction::Run {
            command: CommandForm::Shell("dir c:\\   && echo done".into()),
            heredocs: vec![],
            flags: BTreeMap::new()
        }
    );
    // A directive after an instruction is a comment.
    let s = steps("FROM a\n# escape=`\nRUN x \\\n y\n");
    assert_eq!(
        s[1].1,
        Instruction::Run {
            command: CommandForm::Shell("x  y".into()),
            heredocs: vec![],
            flags: BTreeMap::new()
        }
    );
    assert!(error("# escape=x\nFROM a\n").message.contains("escape"));
}

#[test]
fn exec_and_shell_forms() {
    let s = steps("FROM a\nENTRYPOINT [\"ping\"]\nCMD [\"-c\", \"3\", \"localhost\"]\nCMD echo [not json\nRUN [\"a\", 1]\n");
    assert_eq!(
        s[1].1,
        Instruction::Entrypoint(CommandForm::Exec(strings(&["ping"])))
    );
    assert_eq!(
        s[2].1,
        Instruction::Cmd(CommandForm::Exec(strings(&["-c", "3", "localhost"])))
    );
    assert_eq!(
        s[3].1,
        Instruction::Cmd(CommandForm::Shell("echo [not json".into()))
    );
    // Invalid JSON in brackets runs as a shell command, as Docker does.
    assert_eq!(
        s[4].1,
        Instruction::Run {
            command: CommandForm::Shell("[\"a\", 1]".into()),
            heredocs: vec![],
            flags: BTreeMap::new()
        }
    );
    assert!(error("FROM a\nSHELL /bin/bash -c\n")
        .message
        .contains("JSON array"));
    assert!(error("FROM a\nVOLUME [\"/a\", 2]\n")
        .message
        .contains("JSON"));
}

#[test]
fn heredocs() {
    let s = steps(
        "FROM a\nRUN <<EOF\necho one\necho two\nEOF\nCOPY <<-\"END\" /etc/conf\n\tkey=$NOT_EXPANDED\n\tEND\nRUN cat <<A <<B\na\nA\nb\nB\n",
    );
    match &s[1].1 {
        Instruction::Run { heredocs, .. } => {
            assert_eq!(heredocs.len(), 1);
            assert_eq!(heredocs[0].content, "echo one\necho two\n");
        }
        other => panic!("{other:?}"),
    }
    match &s[2].1 {
        Instruction::Copy {
            sources,
            dest,
            heredocs,
            add: false,
            ..
        } => {
            assert_eq!(sources, &strings(&["<<END"]));
            assert_eq!(dest, "/etc/conf");
            assert_eq!(heredocs[0].content, "key=$NOT_EXPANDED\n");
            assert!(heredocs[0].quoted && heredocs[0].strip_tabs);
        }
        other => panic!("{other:?}"),
    }
    match &s[3].1 {
        Instruction::Run { heredocs, .. } => {
            assert_eq!(heredocs.len(), 2);
            assert_eq!(
                (heredocs[0].content.as_str(), heredocs[1].content.as_str()),
                ("a\n", "b\n")
            );
        }
        other => panic!("{other:?}"),
    }
    // Only a word starting with `<<` is a heredoc.
    match &steps("FROM a\nRUN echo $((1<<2))\nRUN cat <<<here\n")[1].1 {
        Instruction::Run { heredocs, .. } => assert!(heredocs.is_empty()),
        other => panic!("{other:?}"),
    }
    let e = error("FROM a\nRUN <<EOF\necho never closed\n");
    assert_eq!(e.line, 2);
    assert!(e.message.contains("unterminated heredoc"), "{e}");
}

#[test]
fn env_label_arg_forms() {
    let s = steps(
        "ARG BASE=busybox\nARG V\nFROM $BASE\nENV A=1 B=\"two words\" C=x\\ y\nENV LEGACY value with spaces\nLABEL \"com.example.vendor\"=\"ACME\" version=1.0\nARG X=1 Y\n",
    );
    assert_eq!(
        s[0].1,
        Instruction::Arg(vec![("BASE".into(), Some("busybox".into()))])
    );
    assert_eq!(s[1].1, Instruction::Arg(vec![("V".into(), None)]));
    assert_eq!(
        s[3].1,
        Instruction::Env(vec![
            ("A".into(), "1".into()),
            ("B".into(), "\"two words\"".into()),
            ("C".into(), "x\\ y".into())
        ])
    );
    assert_eq!(
        s[4].1,
        Instruction::Env(vec![("LEGACY".into(), "value with spaces".into())])
    );
    assert_eq!(
        s[5].1,
        Instruction::Label(vec![
            ("\"com.example.vendor\"".into(), "\"ACME\"".into()),
            ("version".into(), "1.0".into())
        ])
    );
    assert_eq!(
        s[6].1,
        Instruction::Arg(vec![("X".into(), Some("1".into())), ("Y".into(), None)])
    );
    assert!(error("FROM a\nENV\n").message.contains("KEY=VALUE"));
    assert!(error("FROM a\nLABEL novalue\n")
        .message
        .contains("KEY=VALUE"));
    assert!(error("FROM a\nENV A=\"open\n").message.contains("quote"));
}

#[test]
fn copy_add_flags_and_stages() {
    let df = parse(
        "FROM golang AS build\nCOPY --chown=11:22 --chmod=640 src/*.c /src/\nFROM scratch\nCOPY --from=build /out/app /app\nADD --checksum=sha256:abc https://example.com/x.tgz /x/\nADD [\"a b\", \"/dst\"]\n",
        "Dockerfile",
    )
    .unwrap();
    assert_eq!(df.stages.len(), 2);
    assert_eq!(df.stage_index("BUILD"), Some(0));
    assert_eq!(df.stage_index("1"), Some(1));
    match &df.stages[0].steps[0].instruction {
        Instruction::Copy {
            sources,
            dest,
            flags,
            ..
        } => {
            assert_eq!(sources, &strings(&["src/*.c"]));
            assert_eq!(dest, "/src/");
            assert_eq!(flags["chown"], "11:22");
            assert_eq!(flags["chmod"], "640");
        }
        other => panic!("{other:?}"),
    }
    match &df.stages[1].steps[1].instruction {
        Instruction::Copy {
            add: true, flags, ..
        } => {
            assert_eq!(flags["checksum"], "sha256:abc")
        }
        other => panic!("{other:?}"),
    }
    match &df.stages[1].steps[2].instruction {
        Instruction::Copy { sources, dest, .. } => {
            assert_eq!(
                (sources.clone(), dest.as_str()),
                (strings(&["a b"]), "/dst")
            )
        }
        other => panic!("{other:?}"),
    }
    assert!(error("FROM a\nCOPY onlyone\n")
        .message
        .contains("destination"));
}

#[test]
fn errors_name_the_line() {
    let e = error("FROM a\nRUN ok\nFROBNICATE x\n");
    assert_eq!((e.line, e.file.as_str()), (3, "Dockerfile"));
    assert!(e.message.contains("unknown instruction FROBNICATE"), "{e}");
    assert!(error("RUN x\nFROM a\n")
        .message
        .contains("before the first FROM"));
    assert!(error("# only a comment\n").message.contains("no FROM"));
    assert!(error("FROM a b c d\n").message.contains("FROM"));
    assert!(error("FROM a\nONBUILD FROM b\n")
        .message
        .contains("not allowed"));
    assert!(error("FROM a\nHEALTHCHECK --bogus=1 CMD x\n")
        .message
        .contains("--bogus"));
    assert_eq!(
        steps("FROM a\nHEALTHCHECK NONE\n")[1].1,
        Instruction::Healthcheck(None)
    );
    assert_eq!(
        steps("FROM a\nONBUILD RUN echo hi\n")[1].1,
        Instruction::Onbuild("RUN echo hi".into())
    );
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]
    /// Random input never panics: it parses or gives an error.
    #[test]
    fn random_input_never_panics(text in "(FROM|RUN|COPY|ENV|ARG|LABEL|ONBUILD|HEALTHCHECK|# escape=|<<|\\\\|\\[|\\]|\"|'|\\$\\{|[ -~]|\n|\t|é){0,80}") {
        let _ = parse(&text, "f");
        let vars = words::Vars::new();
        let _ = words::expand(&text, &vars, '\\');
        let _ = words::expand_words(&text, &vars, '`');
        let _ = ignore::Ignore::parse(&text).excluded(&text);
    }
}
