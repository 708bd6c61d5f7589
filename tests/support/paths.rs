//! Where the formats and shard tests find their data: the repository's fixtures, models fetched by
//! `tests/fetch-models.sh`, and third-party corpora in `../shared` that tests skip without. Each test
//! crate includes this one file with `#[path]` (both crates sit one level below the repository root).
#![allow(dead_code)]

use std::path::PathBuf;

/// The repository root (the including crate's parent).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// `rel` inside the third-party data folder (`$TESSERA_SHARED`, else `../shared` beside the
/// repository), or `None` after printing that the calling test is skipped.
pub fn shared(rel: &str) -> Option<PathBuf> {
    let base = std::env::var_os("TESSERA_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("../shared"));
    let path = base.join(rel);
    if path.exists() {
        return Some(path);
    }
    eprintln!("skipped: {} not found", path.display());
    None
}

/// Unwraps an `Option` or returns from the calling test (which has already said it is skipped).
#[allow(unused_macros)] // not every test binary reads ../shared
macro_rules! or_skip {
    ($e:expr) => {
        match $e {
            Some(v) => v,
            None => return,
        }
    };
}
#[allow(unused_imports)]
pub(crate) use or_skip;

/// llama2.c's stories260K in the HF layout (MIT; read from `../shared`, not redistributed).
pub fn stories() -> Option<PathBuf> {
    shared("models/stories260K")
}

/// A model fetched by the project's setup step; fails with the command to run when absent.
pub fn fetched_model(rel: &str) -> PathBuf {
    let p = repo_root().join(".cache/models").join(rel);
    assert!(
        p.exists(),
        "missing {}: run `bash tests/fetch-models.sh` first",
        p.display()
    );
    p
}

pub fn smollm2_gguf() -> PathBuf {
    fetched_model("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
}

/// SmolLM2 in the HF layout (float32), converted from the GGUF by the setup step.
pub fn smollm2_hf() -> PathBuf {
    fetched_model("smollm2-hf-float32")
}

/// transformers' greedy reference outputs of SmolLM2 (tests/fixtures/smollm2/SOURCE.md).
pub fn smollm2_reference() -> serde_json::Value {
    let path = repo_root().join("tests/fixtures/smollm2/reference.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}
