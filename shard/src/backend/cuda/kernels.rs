//! The CUDA C kernel sources, embedded in the binary, and the `extern "C"` entry points each one
//! must define. NVRTC compiles every file as `common.cuh` followed by the file (see [`full_source`]),
//! so no `#include` has to be found at run time.

/// One `.cu` file under `kernels/`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelFile {
    /// File name, as error messages and the kernel cache show it.
    pub name: &'static str,
    pub source: &'static str,
    /// Kernels the host launches by name; all must be in the compiled module.
    pub entries: &'static [&'static str],
}

/// Helpers and tuning-constant defaults prepended to every file.
pub const COMMON: &str = include_str!("kernels/common.cuh");

pub const EMBEDDING: KernelFile = KernelFile {
    name: "embedding.cu",
    source: include_str!("kernels/embedding.cu"),
    entries: &["embedding_gather_bf16", "embedding_gather_f16"],
};

pub const RMS_NORM: KernelFile = KernelFile {
    name: "rms_norm.cu",
    source: include_str!("kernels/rms_norm.cu"),
    entries: &["rms_norm_residual_bf16", "rms_norm_residual_f16"],
};

pub const ROPE: KernelFile = KernelFile {
    name: "rope.cu",
    source: include_str!("kernels/rope.cu"),
    entries: &["rope_bf16", "rope_f16"],
};

pub const SILU_MUL: KernelFile = KernelFile {
    name: "silu_mul.cu",
    source: include_str!("kernels/silu_mul.cu"),
    entries: &["silu_mul_bf16", "silu_mul_f16"],
};

pub const KV_CACHE: KernelFile = KernelFile {
    name: "kv_cache.cu",
    source: include_str!("kernels/kv_cache.cu"),
    entries: &["kv_cache_write_bf16", "kv_cache_write_f16"],
};

pub const ATTENTION_DECODE: KernelFile = KernelFile {
    name: "paged_attention_decode.cu",
    source: include_str!("kernels/paged_attention_decode.cu"),
    entries: &[
        "paged_attention_decode_split_bf16",
        "paged_attention_decode_split_f16",
        "paged_attention_decode_reduce_bf16",
        "paged_attention_decode_reduce_f16",
    ],
};

pub const ATTENTION_PREFILL: KernelFile = KernelFile {
    name: "paged_attention_prefill.cu",
    source: include_str!("kernels/paged_attention_prefill.cu"),
    entries: &[
        "paged_attention_prefill_bf16",
        "paged_attention_prefill_f16",
    ],
};

pub const SAMPLING: KernelFile = KernelFile {
    name: "sampling.cu",
    source: include_str!("kernels/sampling.cu"),
    entries: &["argmax_f32", "topk_sample_f32"],
};

/// Every kernel file the engine loads.
pub const ALL: &[KernelFile] = &[
    EMBEDDING,
    RMS_NORM,
    ROPE,
    SILU_MUL,
    KV_CACHE,
    ATTENTION_DECODE,
    ATTENTION_PREFILL,
    SAMPLING,
];

/// The text NVRTC compiles for `file`: the common helpers, then the file with its line numbers
/// restored so that NVRTC's log points into the right `.cu` file.
pub fn full_source(file: &KernelFile) -> String {
    format!(
        "#line 1 \"common.cuh\"\n{COMMON}\n#line 1 \"{}\"\n{}",
        file.name, file.source
    )
}

/// Whether a PTX module defines kernel `entry` (`.entry name(` in the PTX text).
pub fn ptx_has_entry(ptx: &str, entry: &str) -> bool {
    ptx.lines().any(|line| {
        line.split_once(".entry ").is_some_and(|(_, rest)| {
            rest.trim_start()
                .strip_prefix(entry)
                .is_some_and(|r| r.starts_with('(') || r.trim().is_empty())
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_entry_is_spelled_in_its_source() {
        for file in ALL {
            for entry in file.entries {
                let (prefix, suffix) = entry.rsplit_once('_').unwrap();
                // Dtype-generic kernels are named `prefix_##S` by a macro instantiated per dtype.
                let spelled = file.source.contains(&format!("void {entry}("))
                    || (file.source.contains(&format!("{prefix}_##S"))
                        && ["bf16", "f16"].contains(&suffix));
                assert!(spelled, "{}: no definition of {entry}", file.name);
            }
        }
    }

    #[test]
    fn entries_are_found_in_ptx_text() {
        let ptx = ".visible .entry rope_bf16(\n\t.param .u64 rope_bf16_param_0,\n.visible .entry rope_f16(";
        assert!(ptx_has_entry(ptx, "rope_bf16"));
        assert!(ptx_has_entry(ptx, "rope_f16"));
        assert!(!ptx_has_entry(ptx, "rope"));
        assert!(!ptx_has_entry(ptx, "silu_mul_bf16"));
    }

    #[test]
    fn full_source_keeps_file_line_numbers() {
        let src = full_source(&ROPE);
        assert!(src.starts_with("#line 1 \"common.cuh\""));
        assert!(src.contains("#line 1 \"rope.cu\"\n// rope.cu"));
    }
}
