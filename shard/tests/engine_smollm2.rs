//! SmolLM2-135M-Instruct against transformers' float32 reference (`reference.json`): from the GGUF
//! (Q4_1 dequantized exactly to f32), from the f32 safetensors conversion, and from bf16 weights,
//! all with an f32 KV cache; the f32 model with the default bf16 KV cache; and the quantized
//! engine (the GGUF as stored, and the f32 conversion quantized at load).

mod engine_common;

use std::path::Path;

use engine_common::*;
use serde_json::Value;
use tessera_shard::kv_cache::KvCacheDtype;
use tessera_shard::loader::{load, LoadOptions, WeightDtype};
use tessera_shard::tools::generate::{greedy, top_k};
use tessera_shard::weights::quant::Scheme;

// The quantized engine multiplies int8-quantized activations (per group of 32, as llama.cpp
// does), so its top-5 logits are held to stated tolerances (observed maxima in parentheses) and
// not to greedy ids: chat_capital's first two candidates are 0.08 apart in the f32 reference.
/// The Q4_1 GGUF served quantized (observed: 0.80).
const TOL_QUANT: f32 = 1.0;
/// f32 weights quantized to 8 bits at load (observed: 0.48).
const TOL_Q8: f32 = 0.75;
/// f32 weights quantized to 4 bits at load (observed: 1.28).
const TOL_Q4K: f32 = 2.0;

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// Loads with the reference's own precision where the model allows: an f32 KV cache.
fn exact(dtype: WeightDtype) -> LoadOptions {
    LoadOptions {
        dtype,
        kv_cache_dtype: KvCacheDtype::F32,
        ..LoadOptions::default()
    }
}

/// Runs every reference case; with no `prefix` it demands all greedy ids, the top-5 ranking and
/// top-5 logits within `tol`, otherwise only the first `prefix` greedy ids and the logits.
fn check_model(model: &Path, opts: &LoadOptions, tol: f32, prefix: Option<usize>) {
    let loaded = load(model, opts).unwrap();
    for case in smollm2_reference()["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let (text, special) = match case["templated_text"].as_str() {
            Some(t) => (t.to_string(), false),
            None => (case["input"].as_str().unwrap().to_string(), true),
        };
        let prompt = loaded
            .tokenizer
            .encode(text, special)
            .unwrap()
            .get_ids()
            .to_vec();
        assert_eq!(prompt, ids(&case["prompt_ids"]), "{name}: prompt ids");
        let eos = if case["stop_at_eos"].as_bool().unwrap() {
            loaded.config.eos_token_ids.clone()
        } else {
            vec![]
        };
        let want = ids(&case["generated_ids"]);
        let n = prefix.unwrap_or(want.len()).min(want.len());
        let g = greedy(&loaded.model, &prompt, n, &eos).unwrap();
        assert_eq!(g.generated_ids, want[..n], "{name}: greedy ids");
        let top5 = top_k(&g.first_logits, 5);
        let want5 = case["first_token"]["top5"].as_array().unwrap();
        for (rank, want) in want5.iter().enumerate() {
            let (id, logit) = (
                want[0].as_u64().unwrap() as u32,
                want[1].as_f64().unwrap() as f32,
            );
            // The full-precision models rank the top 5 exactly as transformers does; the bf16
            // model's rounding may swap neighbours closer than `tol`, so it is held to the logits.
            if prefix.is_none() {
                assert_eq!(top5[rank].0, id, "{name}: top-5 ids {top5:?}");
            }
            let got = g.first_logits[id as usize];
            assert!(
                (got - logit).abs() < tol,
                "{name}: logit of {id}: {got} vs {logit}"
            );
        }
    }
}

#[test]
fn gguf_dequantized_to_f32_matches_reference() {
    check_model(&smollm2_gguf(), &exact(WeightDtype::F32), 1e-3, None);
}

/// The quantized engine's own error against the f32 model: the same Q4_1 weights, multiplied by
/// int8-quantized activations.
#[test]
fn gguf_served_quantized_follows_reference() {
    check_model(
        &smollm2_gguf(),
        &exact(WeightDtype::Auto),
        TOL_QUANT,
        Some(0),
    );
}

/// `--quantize q8_0` on the f32 conversion: 8-bit weights and activations.
#[test]
fn hf_float32_quantized_to_q8_0_at_load_follows_reference() {
    check_quantized_at_load(Scheme::Q8_0, TOL_Q8);
}

/// `--quantize q4_k` on the f32 conversion: 4-bit weights (a scale and minimum per 32).
#[test]
fn hf_float32_quantized_to_q4_k_at_load_follows_reference() {
    check_quantized_at_load(Scheme::Q4K, TOL_Q4K);
}

fn check_quantized_at_load(scheme: Scheme, tol: f32) {
    let opts = LoadOptions {
        quantize: Some(scheme),
        ..exact(WeightDtype::Auto)
    };
    check_model(&fetched_model("smollm2-hf-float32"), &opts, tol, Some(0));
}

#[test]
fn hf_float32_matches_reference() {
    check_model(
        &fetched_model("smollm2-hf-float32"),
        &exact(WeightDtype::Auto),
        1e-3,
        None,
    );
}

#[test]
fn hf_float32_with_the_default_bf16_kv_cache_keeps_greedy_ids() {
    // The cache rounds K and V to bf16 (8 significant bits); every greedy id and the top-5 ranking
    // still match transformers' f32 run, and top-5 logits (about 25) stay within 0.1. Observed:
    // ≤ 0.031 on an AVX-512 host, 0.058 on an AVX2-only one, whose matmul kernel sums in another
    // order, so other K/V values land on the other side of a bf16 rounding boundary.
    assert_eq!(LoadOptions::default().kv_cache_dtype, KvCacheDtype::Bf16);
    check_model(
        &fetched_model("smollm2-hf-float32"),
        &LoadOptions::default(),
        0.1,
        None,
    );
}

#[test]
fn hf_bfloat16_weights_follow_reference() {
    // bf16 weights are a different (rounded) model, and on CPUs with AVX512-BF16 the matmuls also
    // round their activations to bf16 (as llama.cpp's BF16 path and GPU bf16 GEMMs do; f32
    // accumulation): only the first tokens agree, and top-5 logits within 0.3 (observed: ≤ 0.21
    // with rounded activations, ≤ 0.04 without).
    check_model(
        &fetched_model("smollm2-hf-bfloat16"),
        &exact(WeightDtype::Auto),
        0.3,
        Some(4),
    );
}
