//! Run-time compilation of the kernels with NVRTC for the GPU's compute capability, cached on disk
//! by a hash of source, options and architecture (NVRTC takes a few seconds per file; a cache hit
//! is a file read). The library is dlopened, so it may come from a CUDA toolkit or from PyPI's
//! `nvidia-cuda-nvrtc-cu12` wheel, wherever [`load_nvrtc`] finds it.

use std::path::{Path, PathBuf};

use cudarc::nvrtc::{self, CompileError, CompileOptions};

use super::kernels::{full_source, ptx_has_entry, KernelFile};
use super::launch;
use crate::{Error, Result};

/// Bumped when the way a cache entry is made changes without the source or options changing.
const CACHE_FORMAT: &str = "tessera-kernel-cache-v1";

/// Compute capability of the target GPU; kernels need 8.0 or later (bf16 conversions).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Arch {
    pub major: u32,
    pub minor: u32,
}

impl Arch {
    pub const SM80: Arch = Arch { major: 8, minor: 0 };
    pub const SM90: Arch = Arch { major: 9, minor: 0 };

    /// NVRTC's virtual architecture name: PTX for `compute_XY`, which the driver JIT-compiles for
    /// the exact GPU when the module is loaded.
    pub fn virtual_name(self) -> String {
        format!("compute_{}{}", self.major, self.minor)
    }

    pub fn check_supported(self) -> Result<()> {
        if self < Arch::SM80 {
            return Err(Error::Device(format!(
                "GPU compute capability {}.{} is below 8.0, the minimum of the CUDA backend",
                self.major, self.minor
            )));
        }
        Ok(())
    }
}

impl std::fmt::Display for Arch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "sm_{}{}", self.major, self.minor)
    }
}

/// NVRTC options for `arch`: the architecture, C++17, and the launch constants as `-D` defines so
/// that kernels and [`launch`] agree.
pub fn compile_options(arch: Arch) -> Vec<String> {
    let mut opts = vec![
        format!("--gpu-architecture={}", arch.virtual_name()),
        "--std=c++17".to_string(),
        "--fmad=true".to_string(),
    ];
    opts.extend(
        launch::kernel_defines()
            .iter()
            .map(|(k, v)| format!("-D{k}={v}")),
    );
    opts
}

/// Cache key of one compilation: FNV-1a (64-bit, two seeds) over format, source, options, arch.
pub fn cache_key(source: &str, options: &[String], arch: Arch) -> String {
    let mut parts: Vec<&str> = vec![CACHE_FORMAT, source];
    parts.extend(options.iter().map(String::as_str));
    let arch = arch.to_string();
    parts.push(&arch);
    let (a, b) = (
        fnv1a(&parts, 0xcbf2_9ce4_8422_2325),
        fnv1a(&parts, 0x6c62_272e_07bb_0142),
    );
    format!("{a:016x}{b:016x}")
}

fn fnv1a(parts: &[&str], seed: u64) -> u64 {
    let mut h = seed;
    for part in parts {
        // Length-prefixed, so moving bytes between parts changes the key.
        for byte in (part.len() as u64)
            .to_le_bytes()
            .iter()
            .chain(part.as_bytes())
        {
            h ^= u64::from(*byte);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h
}

/// Where compiled kernels are kept: `$TESSERA_KERNEL_CACHE`, else `$XDG_CACHE_HOME/tessera/kernels`,
/// else `~/.cache/tessera/kernels`; `None` when none of these is set (compile every start).
pub fn default_cache_dir() -> Option<PathBuf> {
    let env = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    env("TESSERA_KERNEL_CACHE")
        .or_else(|| env("XDG_CACHE_HOME").map(|d| d.join("tessera/kernels")))
        .or_else(|| env("HOME").map(|d| d.join(".cache/tessera/kernels")))
}

/// Makes libnvrtc loadable. cudarc dlopens it by name (`libnvrtc.so.12`, ...), which finds only
/// what the dynamic linker's path finds; a library loaded first by full path from one of `dirs`
/// (or `$TESSERA_NVRTC_DIR`, `$CUDA_HOME/lib64`, `/usr/local/cuda/lib64`) answers that later
/// by-name lookup through its soname.
pub fn load_nvrtc(dirs: &[PathBuf]) -> Result<()> {
    // SAFETY: probing dlopens and closes the library; its initialisers are NVIDIA's.
    if unsafe { nvrtc::sys::is_culib_present() } {
        return Ok(());
    }
    let mut tried = Vec::new();
    let env_dir = std::env::var_os("TESSERA_NVRTC_DIR").map(PathBuf::from);
    // A CUDA toolkit's own folder, which is often not on the linker path.
    let toolkit = ["CUDA_HOME", "CUDA_PATH"]
        .iter()
        .filter_map(std::env::var_os)
        .map(|d| PathBuf::from(d).join("lib64"))
        .chain([PathBuf::from("/usr/local/cuda/lib64")]);
    let candidates: Vec<PathBuf> = env_dir.iter().chain(dirs).cloned().chain(toolkit).collect();
    for dir in &candidates {
        for name in ["libnvrtc.so.12", "libnvrtc.so.13", "libnvrtc.so"] {
            let path = dir.join(name);
            if !path.is_file() {
                continue;
            }
            tried.push(path.display().to_string());
            // SAFETY: as above; the handle is leaked so the library stays loaded for the process.
            if let Ok(lib) = unsafe { libloading::Library::new(&path) } {
                std::mem::forget(lib);
                if unsafe { nvrtc::sys::is_culib_present() } {
                    return Ok(());
                }
            }
        }
    }
    let looked: Vec<String> = candidates.iter().map(|d| d.display().to_string()).collect();
    Err(Error::Device(format!(
        "NVRTC (libnvrtc.so.12) not found on the library path nor in {}{}",
        looked.join(", "),
        if tried.is_empty() {
            String::new()
        } else {
            format!(" (could not load {})", tried.join(", "))
        }
    )))
}

/// The PTX of `file` for `arch`, from `cache` when present there, else compiled (and stored).
/// Checks that every entry point the host launches is in the module.
pub fn compile(file: &KernelFile, arch: Arch, cache: Option<&Path>) -> Result<String> {
    let source = full_source(file);
    let options = compile_options(arch);
    let key = cache_key(&source, &options, arch);
    let cached = cache.map(|dir| dir.join(format!("{}-{arch}-{key}.ptx", file.name)));
    let ptx = match cached
        .as_deref()
        .and_then(|p| std::fs::read_to_string(p).ok())
    {
        Some(ptx) => ptx,
        None => {
            let ptx = compile_uncached(file, &source, &options, arch)?;
            if let Some(path) = &cached {
                store(path, &ptx)?;
            }
            ptx
        }
    };
    if let Some(missing) = file.entries.iter().find(|e| !ptx_has_entry(&ptx, e)) {
        return Err(Error::Device(format!(
            "kernel file {}: compiled for {arch} but defines no kernel `{missing}`",
            file.name
        )));
    }
    Ok(ptx)
}

fn compile_uncached(
    file: &KernelFile,
    source: &str,
    options: &[String],
    arch: Arch,
) -> Result<String> {
    let opts = CompileOptions {
        options: options.to_vec(),
        name: Some(file.name.to_string()),
        ..Default::default()
    };
    let ptx = nvrtc::compile_ptx_with_opts(source, opts).map_err(|e| match e {
        CompileError::CompileError { nvrtc, log, .. } => Error::Device(format!(
            "NVRTC failed to compile kernel file {} for {arch} ({nvrtc:?}):\n{}",
            file.name,
            log.to_string_lossy().trim_end()
        )),
        other => Error::Device(format!(
            "NVRTC error on kernel file {}: {other:?}",
            file.name
        )),
    })?;
    Ok(ptx.to_src())
}

/// Writes through a temporary file and a rename, so concurrent shards never read half a file.
fn store(path: &Path, ptx: &str) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, ptx).map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

/// Compiles `file` all the way to machine code for the real architecture `sm_XY` (NVRTC runs ptxas),
/// so resource errors PTX generation alone does not see (shared memory, registers) show up without
/// a GPU. The result is dropped: modules are loaded from the PTX of [`compile`].
pub fn check_machine_code(file: &KernelFile, arch: Arch) -> Result<()> {
    let mut options = compile_options(arch);
    options[0] = format!("--gpu-architecture=sm_{}{}", arch.major, arch.minor);
    compile_uncached(file, &full_source(file), &options, arch).map(drop)
}

/// Compiles (or reads from the cache) every kernel file for `arch`.
pub fn compile_all(arch: Arch, cache: Option<&Path>) -> Result<Vec<(&'static KernelFile, String)>> {
    super::kernels::ALL
        .iter()
        .map(|f| compile(f, arch, cache).map(|ptx| (f, ptx)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_key_changes_with_source_options_and_arch() {
        let opts = compile_options(Arch::SM80);
        let base = cache_key("a", &opts, Arch::SM80);
        assert_eq!(base.len(), 32);
        assert_eq!(base, cache_key("a", &opts, Arch::SM80));
        assert_ne!(base, cache_key("b", &opts, Arch::SM80));
        assert_ne!(base, cache_key("a", &opts, Arch::SM90));
        assert_ne!(base, cache_key("a", &opts[1..], Arch::SM80));
        // Bytes moved across a part boundary are a different key.
        assert_ne!(
            cache_key("ab", &["c".into()], Arch::SM80),
            cache_key("a", &["bc".into()], Arch::SM80)
        );
    }

    #[test]
    fn options_name_the_virtual_architecture_and_launch_constants() {
        let opts = compile_options(Arch { major: 9, minor: 0 });
        assert_eq!(opts[0], "--gpu-architecture=compute_90");
        assert!(opts.iter().any(|o| o.starts_with("-DTESSERA_PREFILL_BQ=")));
        assert!(Arch { major: 7, minor: 5 }.check_supported().is_err());
        assert!(Arch::SM90.check_supported().is_ok());
    }
}
