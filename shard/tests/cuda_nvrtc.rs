//! Compiles every CUDA kernel with NVRTC for sm_80 and sm_90 on a CPU-only machine (PTX, and machine
//! code through NVRTC's ptxas), so a kernel syntax or resource error fails CI without a GPU. NVRTC
//! is PyPI's `nvidia-cuda-nvrtc-cu12`, installed into `.cache/nvrtc` by `tests/fetch-models.sh`;
//! `TESSERA_SKIP_NVRTC=1` skips (say so in the report).

use std::path::PathBuf;

use tessera_shard::backend::cuda::kernels::{self, KernelFile};
use tessera_shard::backend::cuda::nvrtc::{self, Arch};

fn nvrtc_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.cache/nvrtc/nvidia/cuda_nvrtc/lib")
}

/// Loads NVRTC, or says how to get it; `false` when the test is skipped.
fn nvrtc_ready() -> bool {
    if std::env::var("TESSERA_SKIP_NVRTC").is_ok_and(|v| v == "1") {
        eprintln!("TESSERA_SKIP_NVRTC=1: kernels NOT compiled");
        return false;
    }
    if let Err(e) = nvrtc::load_nvrtc(&[nvrtc_dir()]) {
        panic!(
            "{e}.\nRun `bash tests/fetch-models.sh` (installs nvidia-cuda-nvrtc-cu12 into .cache/nvrtc), \
             or set TESSERA_SKIP_NVRTC=1 to skip the kernel compile test"
        );
    }
    true
}

#[test]
fn every_kernel_compiles_for_sm80_and_sm90_with_all_entry_points() {
    if !nvrtc_ready() {
        return;
    }
    let cache = tempfile::tempdir().unwrap();
    for arch in [Arch::SM80, Arch::SM90] {
        let compiled =
            nvrtc::compile_all(arch, Some(cache.path())).unwrap_or_else(|e| panic!("{arch}: {e}"));
        assert_eq!(compiled.len(), kernels::ALL.len());
        for (file, ptx) in &compiled {
            assert!(
                ptx.contains(&format!(".target {arch}")),
                "{}: PTX not for {arch}",
                file.name
            );
            for entry in file.entries {
                assert!(
                    kernels::ptx_has_entry(ptx, entry),
                    "{}: no {entry}",
                    file.name
                );
            }
        }
    }
    // One cache file per (file, arch); a second pass reads them back unchanged.
    let files = std::fs::read_dir(cache.path()).unwrap().count();
    assert_eq!(files, 2 * kernels::ALL.len());
    let again = nvrtc::compile(&kernels::SAMPLING, Arch::SM90, Some(cache.path())).unwrap();
    let fresh = nvrtc::compile(&kernels::SAMPLING, Arch::SM90, None).unwrap();
    assert_eq!(again, fresh);
}

#[test]
fn every_kernel_assembles_to_sm80_and_sm90_machine_code() {
    if !nvrtc_ready() {
        return;
    }
    for arch in [Arch::SM80, Arch::SM90] {
        for file in kernels::ALL {
            nvrtc::check_machine_code(file, arch).unwrap_or_else(|e| panic!("{arch}: {e}"));
        }
    }
}

#[test]
fn a_broken_kernel_fails_naming_its_file_and_nvrtc_log() {
    if !nvrtc_ready() {
        return;
    }
    let broken = KernelFile {
        name: "broken.cu",
        source: "extern \"C\" __global__ void broken(float* x) { x[0] = undeclared_name; }\n",
        entries: &["broken"],
    };
    let err = nvrtc::compile(&broken, Arch::SM90, None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("kernel file broken.cu"), "{err}");
    assert!(
        err.contains("undeclared_name"),
        "NVRTC's log is missing: {err}"
    );
    assert!(
        err.contains("broken.cu(1)"),
        "log line numbers should point into the file: {err}"
    );

    // A file that compiles but lacks a kernel the host launches is an error too.
    let missing = KernelFile {
        name: "missing.cu",
        source: "extern \"C\" __global__ void present(float* x) { x[0] = 1.0f; }\n",
        entries: &["present", "absent"],
    };
    let err = nvrtc::compile(&missing, Arch::SM80, None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("no kernel `absent`"), "{err}");
}
