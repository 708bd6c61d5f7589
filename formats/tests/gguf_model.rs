//! The SmolLM2 GGUF: metadata, tensor infos, and dequantization bit-exact against the HF f32 export.

mod common;

use std::time::Instant;

use safetensors::SafeTensors;
use tessera_formats::gguf::{GgmlType, Gguf};

/// GGUF tensor name → HF name, and whether llama.cpp permuted its rows for rope (q/k).
fn hf_name(gguf_name: &str) -> (String, bool) {
    if gguf_name == "token_embd.weight" {
        return ("model.embed_tokens.weight".into(), false);
    }
    if gguf_name == "output_norm.weight" {
        return ("model.norm.weight".into(), false);
    }
    let rest = gguf_name.strip_prefix("blk.").expect("block tensor");
    let (layer, tail) = rest.split_once('.').unwrap();
    let (hf, permuted) = match tail {
        "attn_q.weight" => ("self_attn.q_proj.weight", true),
        "attn_k.weight" => ("self_attn.k_proj.weight", true),
        "attn_v.weight" => ("self_attn.v_proj.weight", false),
        "attn_output.weight" => ("self_attn.o_proj.weight", false),
        "ffn_gate.weight" => ("mlp.gate_proj.weight", false),
        "ffn_up.weight" => ("mlp.up_proj.weight", false),
        "ffn_down.weight" => ("mlp.down_proj.weight", false),
        "attn_norm.weight" => ("input_layernorm.weight", false),
        "ffn_norm.weight" => ("post_attention_layernorm.weight", false),
        other => panic!("unexpected tensor {other}"),
    };
    (format!("model.layers.{layer}.{hf}"), permuted)
}

/// Inverse of llama.cpp's rope permutation of q/k rows (as the shard's GGUF loader and
/// `tessera-shard convert` apply).
fn unpermute(w: &[f32], rows: usize, cols: usize, n_head: usize) -> Vec<f32> {
    let half = rows / n_head / 2;
    let mut out = vec![0f32; w.len()];
    // ggml row (h, i, j) with j in 0..2 ⇄ HF row (h, j, i).
    for h in 0..n_head {
        for i in 0..half {
            for j in 0..2 {
                let src = (h * half + i) * 2 + j;
                let dst = h * 2 * half + j * half + i;
                out[dst * cols..(dst + 1) * cols].copy_from_slice(&w[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

#[test]
fn metadata_and_tensor_infos() {
    let g = Gguf::open(&common::smollm2_gguf()).unwrap();
    assert_eq!(g.get_str("general.architecture"), Some("llama"));
    assert_eq!(g.get_u64("llama.embedding_length"), Some(576));
    assert_eq!(g.get_u64("llama.block_count"), Some(30));
    assert_eq!(g.get_f32("llama.rope.freq_base"), Some(100000.0));
    assert_eq!(
        g.get_array("tokenizer.ggml.tokens").map(|a| a.len()),
        Some(49152)
    );
    let emb = g
        .tensors()
        .iter()
        .find(|t| t.name == "token_embd.weight")
        .unwrap();
    assert_eq!(emb.dims, vec![576, 49152]);
    assert_eq!(emb.shape(), vec![49152, 576]);
    assert_eq!(emb.ggml_type, GgmlType::Q8_0);
    assert_eq!(
        g.tensor_data("token_embd.weight").unwrap().len(),
        49152 * 576 / 32 * 34
    );
    let types: std::collections::BTreeSet<_> =
        g.tensors().iter().map(|t| t.ggml_type.id()).collect();
    assert_eq!(types, [0, 3, 8].into_iter().collect());
}

#[test]
fn dequantization_matches_hf_f32_bit_exactly() {
    let g = Gguf::open(&common::smollm2_gguf()).unwrap();
    let st_path = common::fetched_model("smollm2-hf-float32/model.safetensors");
    let bytes = std::fs::read(&st_path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let n_head = g.get_u64("llama.attention.head_count").unwrap() as usize;
    let n_kv_head = g.get_u64("llama.attention.head_count_kv").unwrap() as usize;
    let start = Instant::now();
    for info in g.tensors() {
        let (shape, mut values) = g.tensor_f32(&info.name).unwrap();
        let (name, permuted) = hf_name(&info.name);
        if permuted {
            let heads = if info.name.contains("attn_q") {
                n_head
            } else {
                n_kv_head
            };
            values = unpermute(&values, shape[0], shape[1], heads);
        }
        let hf = st.tensor(&name).unwrap();
        assert_eq!(hf.shape(), shape.as_slice(), "{name}");
        let expected: Vec<f32> = hf
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let mismatch = values
            .iter()
            .zip(&expected)
            .position(|(a, b)| a.to_bits() != b.to_bits());
        assert_eq!(mismatch, None, "{} differs from {name}", info.name);
    }
    eprintln!(
        "compared {} tensors in {:?}",
        g.tensors().len(),
        start.elapsed()
    );
}

#[test]
fn dequantizing_the_whole_model_is_fast() {
    let g = Gguf::open(&common::smollm2_gguf()).unwrap();
    let start = Instant::now();
    let n: usize = g
        .tensors()
        .iter()
        .map(|t| g.tensor_f32(&t.name).unwrap().1.len())
        .sum();
    let took = start.elapsed();
    assert!(n > 130_000_000, "{n} parameters");
    // Generous bound for a loaded shared CI machine; typically ~0.1-0.3 s.
    assert!(took.as_secs_f32() < 5.0, "dequantizing took {took:?}");
    eprintln!("dequantized {n} values in {took:?}");
}

#[test]
fn missing_tensor_names_file_and_tensor() {
    let path = common::smollm2_gguf();
    let g = Gguf::open(&path).unwrap();
    let e = g.tensor_f32("nope.weight").unwrap_err().to_string();
    assert!(
        e.contains("nope.weight") && e.contains(&*path.to_string_lossy()),
        "{e}"
    );
}
