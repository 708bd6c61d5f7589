//! `docs/configuration.md` is the binaries' own `--help`: this test renders it from the built binaries
//! and fails when the document is stale. `TESSERA_BLESS=1` rewrites the document instead.

use std::process::Command;
use tessera_tests::{binary, workspace_root};

/// The commands a user configures, in the order the document lists them.
const COMMANDS: [(&str, &[&str], &str); 3] = [
    (
        "tessera-launcher",
        &["--help"],
        "The launcher: what `cargo run --release --bin tessera-launcher -- …` and the container images run.",
    ),
    (
        "tessera-router",
        &["--help"],
        "The router on its own (the launcher passes its flags through).",
    ),
    (
        "tessera-shard",
        &["serve", "--help"],
        "One shard rank on its own (`tessera-shard serve`), for example behind TGI's router.",
    ),
];

fn help(name: &str, args: &[&str]) -> String {
    let output = Command::new(binary(name))
        .args(args)
        .env("COLUMNS", "100")
        .env("NO_COLOR", "1")
        .output()
        .expect("the binary runs");
    assert!(output.status.success(), "{name} {args:?} failed");
    String::from_utf8(output.stdout).expect("help is UTF-8")
}

fn render() -> String {
    let mut doc = String::from(
        "# Configuration reference\n\n\
         Every flag can also be set by the environment variable in brackets. This page is generated from the\n\
         binaries' `--help` by `tests/tests/docs_configuration.rs` (run it with `TESSERA_BLESS=1` to rewrite\n\
         it), so it always matches the code.\n",
    );
    for (name, args, what) in COMMANDS {
        let shown = std::iter::once(name).chain(args.iter().copied());
        doc.push_str(&format!(
            "\n## `{}`\n\n{what}\n\n```text\n{}```\n",
            shown.collect::<Vec<_>>().join(" "),
            help(name, args)
        ));
    }
    doc
}

#[test]
fn configuration_reference_matches_help() {
    let path = workspace_root().join("docs/configuration.md");
    let expected = render();
    if std::env::var_os("TESSERA_BLESS").is_some() {
        std::fs::write(&path, &expected).expect("docs/configuration.md is writable");
        return;
    }
    let found = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        found == expected,
        "docs/configuration.md is stale: run `TESSERA_BLESS=1 cargo test -p tessera-tests --test docs_configuration`"
    );
}
