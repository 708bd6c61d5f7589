//! Test helpers: where the repository, the shared data and the fetched models are.
#![allow(dead_code)]

use std::path::PathBuf;

/// The repository root (formats/ is one level below it).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The read-only shared data folder beside the repository.
pub fn shared() -> PathBuf {
    repo_root().join("../shared")
}

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
