//! End to end: the built `tessera-shard generate --json` binary against the reference outputs.

mod engine_common;

use std::process::Command;

use engine_common::*;
use serde_json::Value;

fn generate(args: &[&str]) -> Value {
    let out = Command::new(env!("CARGO_BIN_EXE_tessera-shard"))
        .arg("generate")
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "generate failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert_eq!(
        stdout.lines().count(),
        1,
        "--json prints one line: {stdout}"
    );
    serde_json::from_str(&stdout).unwrap()
}

fn ids(v: &Value) -> Vec<u64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect()
}

#[test]
fn chat_generation_from_gguf_stops_after_eos() {
    let reference = smollm2_reference();
    let case = &reference["cases"][1];
    assert_eq!(case["name"], "chat_capital");
    let model = smollm2_gguf();
    let out = generate(&[
        "--model-id",
        model.to_str().unwrap(),
        "--prompt",
        "What is the capital of France?",
        "--chat",
        "--max-new-tokens",
        "48",
        // The top logit is held to transformers' f32 run within 1e-3: the exact f32 weights
        // (not the quantized engine) and an f32 KV cache.
        "--dtype",
        "float32",
        "--kv-cache-dtype",
        "f32",
        "--json",
    ]);
    assert_eq!(ids(&out["prompt_ids"]), ids(&case["prompt_ids"]));
    assert_eq!(ids(&out["generated_ids"]), ids(&case["generated_ids"]));
    assert_eq!(out["generated_text"], case["generated_text"]);
    let top = &out["first_token_top5"][0];
    assert_eq!(top[0], case["first_token"]["top5"][0][0]);
    assert!(
        (top[1].as_f64().unwrap() - case["first_token"]["top5"][0][1].as_f64().unwrap()).abs()
            < 1e-3
    );
}

#[test]
fn empty_prompt_starts_from_bos() {
    let model = or_skip!(stories());
    let out = generate(&[
        "--model-id",
        model.to_str().unwrap(),
        "--prompt",
        "",
        "--max-new-tokens",
        "6",
        "--json",
    ]);
    assert_eq!(ids(&out["prompt_ids"]), vec![1]);
    assert_eq!(
        ids(&out["generated_ids"]),
        vec![403, 407, 261, 378, 432, 383]
    );
}

#[test]
fn cuda_request_is_a_clear_error() {
    let model = or_skip!(stories());
    let out = Command::new(env!("CARGO_BIN_EXE_tessera-shard"))
        .args([
            "generate",
            "--model-id",
            model.to_str().unwrap(),
            "--device",
            "cuda",
            "--prompt",
            "x",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    // The exact wording per machine (no driver, no GPU, GPU found) is checked in cuda_device.rs.
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("error: --device cuda: "), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}
