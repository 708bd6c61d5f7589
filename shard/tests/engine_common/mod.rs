//! Helpers shared by the engine tests: locating models and reference data, comparing logits.
#![allow(dead_code)]

use std::path::PathBuf;

/// The repository root (the shard crate's parent).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// `../shared` beside the repository.
pub fn shared() -> PathBuf {
    repo_root().join("../shared")
}

pub fn stories() -> PathBuf {
    let p = shared().join("models/stories260K");
    assert!(
        p.join("model.safetensors").exists(),
        "missing {}: the shared test models are required",
        p.display()
    );
    p
}

/// A model fetched by the project's setup step; fails with the command to run when absent.
pub fn fetched(rel: &str) -> PathBuf {
    let p = repo_root().join(".cache/models").join(rel);
    assert!(
        p.exists(),
        "missing {}: run `bash tests/fetch-models.sh` first",
        p.display()
    );
    p
}

pub fn smollm2_gguf() -> PathBuf {
    fetched("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "logit rows differ in length");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}
