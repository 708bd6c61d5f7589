//! stories260K (llama2.c TinyStories, F32 safetensors) against llama2.c's own greedy output and
//! transformers' reference logits.

mod engine_common;

use engine_common::*;
use tessera_shard::kv_cache::KvCacheDtype;
use tessera_shard::loader::{load, LoadOptions};
use tessera_shard::tools::generate::{greedy, top_k};

/// Both references ran in f32 throughout, the KV cache included.
fn f32_cache() -> LoadOptions {
    LoadOptions {
        kv_cache_dtype: KvCacheDtype::F32,
        ..LoadOptions::default()
    }
}

/// Parses `key: [a, b, ...]` from reference.txt (first occurrence).
fn list(text: &str, key: &str) -> Vec<f64> {
    let line = text
        .lines()
        .find(|l| l.starts_with(key))
        .unwrap_or_else(|| panic!("no '{key}' in reference.txt"));
    let inner = line
        .split_once(": [")
        .unwrap()
        .1
        .rsplit_once(']')
        .unwrap()
        .0;
    inner
        .split(',')
        .map(|x| x.trim().parse().unwrap())
        .collect()
}

#[test]
fn once_upon_a_time_matches_transformers() {
    let dir = or_skip!(stories());
    let reference = std::fs::read_to_string(dir.join("reference.txt")).unwrap();
    let loaded = load(&dir, &f32_cache()).unwrap();
    let ids = loaded
        .tokenizer
        .encode("Once upon a time", true)
        .unwrap()
        .get_ids()
        .to_vec();
    let want_prompt: Vec<u32> = list(&reference, "prompt_ids")
        .iter()
        .map(|&x| x as u32)
        .collect();
    assert_eq!(ids, want_prompt);
    let g = greedy(&loaded.model, &ids, 20, &[]).unwrap();
    let want_ids: Vec<u32> = list(&reference, "generated_ids")
        .iter()
        .map(|&x| x as u32)
        .collect();
    assert_eq!(g.generated_ids, want_ids);
    let want_logits = list(&reference, "last_prompt_position_logits[:10]");
    for (i, (&got, &want)) in g.first_logits.iter().zip(&want_logits).enumerate() {
        assert!(
            (got as f64 - want).abs() < 1e-4,
            "logit {i}: {got} vs {want}"
        );
    }
    let (top_id, top_logit) = top_k(&g.first_logits, 1)[0];
    assert_eq!(top_id, 432);
    assert!((top_logit - 17.7994).abs() < 1e-4);
}

#[test]
fn two_hundred_tokens_from_bos_match_llama2c_byte_for_byte() {
    let dir = or_skip!(stories());
    let expected_file = std::fs::read_to_string(dir.join("llama2c_expected_outputs.txt")).unwrap();
    // The expected text sits between two "---" lines and has no trailing newline.
    let expected = expected_file
        .split("\n---\n")
        .nth(1)
        .expect("text between '---' lines");
    let loaded = load(&dir, &f32_cache()).unwrap();
    let bos = loaded
        .config
        .bos_token_id
        .expect("stories260K has a BOS id");
    let g = greedy(&loaded.model, &[bos], 200, &[]).unwrap();
    let mut all = vec![bos];
    all.extend(&g.generated_ids);
    let text = loaded.tokenizer.decode(&all, true).unwrap();
    assert_eq!(text, expected);
}
