//! `--device` selection on a machine without a GPU: `cuda` is a one-line error (no panic), `auto`
//! runs on CPU. With a GPU, `cuda` must say the CUDA model path is not yet available.

use std::process::Command;

use tessera_shard::backend::cuda::{probe, Probe};
use tessera_shard::tools::random_model::{write_model, Shape};
use tessera_shard::weights::DType;

fn generate(dir: &std::path::Path, device: &str) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_tessera-shard"))
        .args([
            "generate",
            "--prompt",
            "w5 w6",
            "--max-new-tokens",
            "2",
            "--device",
            device,
        ])
        .arg("--model-id")
        .arg(dir)
        .env("RUST_LOG", "error")
        .output()
        .unwrap()
}

#[test]
fn device_cuda_is_one_honest_line_and_auto_falls_back_to_cpu() {
    let dir = tempfile::tempdir().unwrap();
    write_model(dir.path(), Shape::Tiny, DType::Bf16, 1).unwrap();

    let out = generate(dir.path(), "cuda");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    let line = stderr.trim_end();
    assert!(line.starts_with("error: --device cuda: "), "{line}");
    match probe() {
        Probe::NoDriver => assert!(line.contains("no CUDA driver found"), "{line}"),
        Probe::NoGpu(_) => assert!(line.contains("no usable GPU"), "{line}"),
        Probe::Gpus(_) => assert!(line.contains("not yet available"), "{line}"),
    }

    let out = generate(dir.path(), "auto");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
