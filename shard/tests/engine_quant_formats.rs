//! Every GGUF quantization type through the quantized engine against the same file dequantized
//! exactly to f32: SmolLM2 requantized by llama.cpp's `llama-quantize` (`bash
//! bench/compare-llama-cpp.sh` writes them to `.cache/models/quant/`; skipped without them).
//! Each model must keep its weights within the file's size and its first-token logits near the f32
//! path's; the kernels' own per-format arithmetic is checked exactly in the unit tests.

mod engine_common;

use engine_common::*;
use tessera_shard::kv_cache::KvCacheDtype;
use tessera_shard::loader::{load, LoadOptions, WeightDtype};
use tessera_shard::tools::generate::greedy;

/// (file suffix, tolerance on the largest logit difference over the vocabulary against the f32
/// path, most bytes of weights held per byte of file). Both paths hold the same weights; the
/// difference is the int8 rounding of activations, which the coarser 2- and 3-bit weights
/// amplify. Weights fit in the file's size (which also holds the tokenizer), mixed-format files
/// included (a fused q/k/v keeps each part's format), but for Q2_K, whose 2-bit values are held
/// as nibbles.
const FORMATS: &[(&str, f32, f64)] = &[
    ("Q8_0", 1.5, 1.0),
    ("Q6_K", 1.5, 1.0),
    ("Q5_0", 1.5, 1.0),
    ("Q5_1", 1.5, 1.0),
    ("Q5_K_M", 1.5, 1.0),
    ("Q4_K_M", 1.5, 1.0),
    ("Q3_K_M", 2.5, 1.0),
    ("Q2_K", 4.0, 1.05),
];

#[test]
fn every_quant_type_follows_its_dequantized_f32_model() {
    let dir = repo_root().join(".cache/models/quant");
    let prompt: Vec<u32> = vec![1, 504, 3575, 282, 4649, 314, 253, 1345, 28];
    let mut checked = 0;
    for &(name, tol, held) in FORMATS {
        let path = dir.join(format!("SmolLM2-135M-Instruct.{name}.gguf"));
        if !path.exists() {
            eprintln!("skipped {name}: {} not found", path.display());
            continue;
        }
        let run = |dtype| {
            let opts = LoadOptions {
                dtype,
                kv_cache_dtype: KvCacheDtype::F32,
                ..LoadOptions::default()
            };
            let loaded = load(&path, &opts).unwrap();
            let g = greedy(&loaded.model, &prompt, 1, &[]).unwrap();
            (loaded.model.weight_bytes(), g.first_logits)
        };
        let (qbytes, qlogits) = run(WeightDtype::Auto);
        let (_, flogits) = run(WeightDtype::F32);
        let file = std::fs::metadata(&path).unwrap().len() as f64;
        let diff = max_abs_diff(&qlogits, &flogits);
        eprintln!(
            "{name}: weights {:.0} MiB (file {:.0} MiB, {:.4}), max logit difference {diff:.3}",
            qbytes as f64 / 1048576.0,
            file / 1048576.0,
            qbytes as f64 / file
        );
        assert!(diff < tol, "{name}: logits differ by {diff}");
        assert!(qbytes as f64 <= held * file, "{name}: {qbytes} bytes held");
        checked += 1;
    }
    eprintln!("{checked} formats checked");
}
