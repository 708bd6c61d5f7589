//! Shared harness for the end-to-end tests: locating the workspace, its models and its built binaries.

use std::path::PathBuf;

/// The workspace root (the folder holding the top-level Cargo.toml).
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ lives inside the workspace")
        .to_path_buf()
}

/// A built workspace binary (`cargo build --workspace --bins` puts it there before the tests run).
pub fn binary(name: &str) -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"));
    let path = target.join("debug").join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --workspace --bins` first (tests/run.sh does)",
        path.display()
    );
    path
}

/// A model fetched by `tests/fetch-models.sh` into `.cache/models`.
pub fn fetched_model(relative: &str) -> PathBuf {
    let path = workspace_root().join(".cache/models").join(relative);
    assert!(
        path.exists(),
        "{} is missing: run `bash tests/fetch-models.sh`",
        path.display()
    );
    path
}
