//! Test helpers: where the repository's fixtures, the fetched models and the third-party corpora
//! in `../shared` (which tests skip without) are.
#![allow(dead_code)]

use std::path::PathBuf;

/// The repository root (formats/ is one level below it).
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

/// A fetched model file or folder under .cache/models; fails the test with the setup hint if absent.
pub fn fetched_model(rel: &str) -> PathBuf {
    let p = repo_root().join(".cache/models").join(rel);
    assert!(
        p.exists(),
        "{} is missing: run `bash tests/fetch-models.sh` from the repository root",
        p.display()
    );
    p
}

pub fn smollm2_gguf() -> PathBuf {
    fetched_model("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
}

/// SmolLM2 in the Hugging Face layout, converted from the GGUF by `tessera-shard convert`.
pub fn smollm2_hf() -> PathBuf {
    fetched_model("smollm2-hf-float32")
}

/// transformers' reference outputs of SmolLM2 (tests/fixtures/smollm2/SOURCE.md).
pub fn smollm2_reference() -> serde_json::Value {
    let path = repo_root().join("tests/fixtures/smollm2/reference.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}
