//! Shared harness for the end-to-end tests: locating the workspace, its models and its built binaries.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

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

/// A loopback port nobody listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Spawns `command` with stdout and stderr into the file `log`. The child gets PR_SET_PDEATHSIG, so it
/// dies with the test process even when nothing drops its handle (statics, panics).
pub fn spawn_logged(command: &mut Command, log: &Path) -> Child {
    let out = std::fs::File::create(log).unwrap();
    let err = out.try_clone().unwrap();
    // SAFETY: prctl is async-signal-safe; the closure touches nothing else between fork and exec.
    unsafe {
        command.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    command
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .expect("spawn a workspace binary")
}
