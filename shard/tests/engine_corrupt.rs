//! Corrupt or unsupported model files give an error naming the file and the problem, never a
//! panic: truncated safetensors, offsets past the end, wrong shapes, unknown dtypes, missing
//! tensors, bad config.json, unsupported architectures, and invalid forward batches.

mod engine_common;

use std::path::Path;

use engine_common::*;
use serde_json::Value;
use tessera_shard::forward::{ForwardBatch, LogitsWanted, SeqInput};
use tessera_shard::kv_cache::KvCache;
use tessera_shard::loader::{load, LoadOptions};

/// A copy of stories260K in a temp dir whose safetensors header went through `edit`.
fn with_header(
    edit: impl FnOnce(&mut serde_json::Map<String, Value>),
) -> Option<tempfile::TempDir> {
    let dir = copy_model()?;
    let path = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    edit(header.as_object_mut().unwrap());
    let text = serde_json::to_vec(&header).unwrap();
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend(text);
    out.extend(&bytes[8 + n..]);
    std::fs::write(&path, out).unwrap();
    Some(dir)
}

/// A copy of stories260K to corrupt; `None` (skipped) without `../shared`.
fn copy_model() -> Option<tempfile::TempDir> {
    let stories = stories()?;
    let dir = tempfile::tempdir().unwrap();
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        std::fs::copy(stories.join(f), dir.path().join(f)).unwrap();
    }
    Some(dir)
}

/// Loads `dir` and returns the error message, failing the test if loading succeeds.
fn load_error(dir: &Path) -> String {
    match load(dir, &LoadOptions::default()) {
        Ok(_) => panic!("loading {} should fail", dir.display()),
        Err(e) => e.to_string(),
    }
}

fn assert_mentions(msg: &str, parts: &[&str]) {
    for p in parts {
        assert!(msg.contains(p), "error {msg:?} should mention {p:?}");
    }
}

const Q: &str = "model.layers.0.self_attn.q_proj.weight";

#[test]
fn truncated_safetensors() {
    let dir = or_skip!(copy_model());
    let path = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    assert_mentions(
        &load_error(dir.path()),
        &["model.safetensors", "run past the end"],
    );
    std::fs::write(&path, &bytes[..5]).unwrap();
    assert_mentions(
        &load_error(dir.path()),
        &["model.safetensors", "shorter than the 8-byte header"],
    );
}

#[test]
fn header_length_past_the_end() {
    let dir = or_skip!(copy_model());
    let path = dir.path().join("model.safetensors");
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    std::fs::write(&path, &bytes).unwrap();
    assert_mentions(
        &load_error(dir.path()),
        &["model.safetensors", "header length"],
    );
}

#[test]
fn tensor_offsets_past_the_end() {
    let dir = or_skip!(with_header(
        |h| h[Q]["data_offsets"][1] = Value::from(10_000_000_000u64)
    ));
    assert_mentions(
        &load_error(dir.path()),
        &["model.safetensors", Q, "past the end"],
    );
}

#[test]
fn wrong_shape() {
    let dir = or_skip!(with_header(|h| h[Q]["shape"] = serde_json::json!([32, 128])));
    assert_mentions(
        &load_error(dir.path()),
        &[
            "model.safetensors",
            Q,
            "expected shape [64, 64]",
            "[32, 128]",
        ],
    );
}

#[test]
fn unknown_and_unsupported_dtypes() {
    let dir = or_skip!(with_header(|h| h[Q]["dtype"] = Value::from("F7")));
    assert_mentions(
        &load_error(dir.path()),
        &["model.safetensors", Q, "unknown dtype 'F7'"],
    );
    let dir = or_skip!(with_header(|h| h[Q]["dtype"] = Value::from("I32")));
    assert_mentions(
        &load_error(dir.path()),
        &["model.safetensors", Q, "unsupported dtype 'I32'"],
    );
}

#[test]
fn missing_tensor() {
    let name = "model.layers.1.mlp.up_proj.weight";
    let dir = or_skip!(with_header(|h| {
        h.remove(name);
    }));
    assert_mentions(
        &load_error(dir.path()),
        &["model.safetensors", name, "missing"],
    );
}

#[test]
fn bad_config_json() {
    let dir = or_skip!(copy_model());
    let config = dir.path().join("config.json");
    std::fs::write(&config, "{ not json").unwrap();
    assert_mentions(&load_error(dir.path()), &["config.json", "invalid JSON"]);
    std::fs::write(&config, r#"{"model_type": "llama", "hidden_size": 64}"#).unwrap();
    assert_mentions(
        &load_error(dir.path()),
        &["config.json", "missing 'num_attention_heads'"],
    );
    let original = std::fs::read_to_string(or_skip!(stories()).join("config.json")).unwrap();
    std::fs::write(
        &config,
        original.replace("\"num_key_value_heads\": 4", "\"num_key_value_heads\": 3"),
    )
    .unwrap();
    assert_mentions(&load_error(dir.path()), &["config.json", "not a multiple"]);
}

#[test]
fn unsupported_architecture() {
    let dir = or_skip!(copy_model());
    let original = std::fs::read_to_string(or_skip!(stories()).join("config.json")).unwrap();
    let edited = original.replace("\"model_type\": \"llama\"", "\"model_type\": \"gpt2\"");
    std::fs::write(dir.path().join("config.json"), edited).unwrap();
    assert_mentions(
        &load_error(dir.path()),
        &["config.json", "unsupported architecture 'gpt2'"],
    );
}

#[test]
fn garbage_gguf_and_missing_path() {
    let dir = tempfile::tempdir().unwrap();
    let gguf = dir.path().join("model.gguf");
    std::fs::write(&gguf, b"GGUF\x03\x00\x00\x00 truncated").unwrap();
    assert_mentions(&load_error(&gguf), &["model.gguf"]);
    assert_mentions(&load_error(&dir.path().join("nope")), &["nope"]);
}

#[test]
fn invalid_batches_are_errors() {
    let loaded = load(&or_skip!(stories()), &LoadOptions::default()).unwrap();
    let mut cache = KvCache::new(loaded.model.cache_shape(), 2, 16);
    let seq = |tokens: Vec<u32>, slots: Vec<u32>, blocks: Vec<u32>| ForwardBatch {
        seqs: vec![SeqInput {
            tokens,
            start_pos: 0,
            slots,
            block_table: blocks,
            logits: LogitsWanted::Last,
            decoded_from: None,
        }],
    };
    let cases = [
        (
            seq(vec![1, 9999], vec![0, 1], vec![0]),
            "outside the vocabulary",
        ),
        (seq(vec![1, 2], vec![0], vec![0]), "1 slots for 2 tokens"),
        (seq(vec![1], vec![48], vec![3]), "out of range"),
        (seq(vec![], vec![], vec![0]), "no tokens"),
    ];
    for (batch, want) in cases {
        let err = loaded
            .model
            .forward(&batch, &mut cache)
            .expect_err("invalid batch must fail");
        assert_mentions(&err.to_string(), &[want]);
    }
    let one_layer = tessera_shard::kv_cache::CacheShape {
        layers: 1,
        ..loaded.model.cache_shape()
    };
    let small = KvCache::new(one_layer, 2, 16);
    let err = loaded
        .model
        .forward(&seq(vec![1], vec![0], vec![0]), &mut small.clone())
        .err()
        .unwrap();
    assert_mentions(&err.to_string(), &["KV cache has 1 layers"]);
}

/// A safetensors file in memory: `header` JSON, then `data`, with `header_len` overriding the
/// length prefix when given.
fn safetensors_bytes(header: &Value, header_len: Option<u64>, data: &[u8]) -> Vec<u8> {
    let text = serde_json::to_vec(header).unwrap();
    let mut out = header_len
        .unwrap_or(text.len() as u64)
        .to_le_bytes()
        .to_vec();
    out.extend(text);
    out.extend(data);
    out
}

/// Declared sizes far past the file (header length u64::MAX, offsets near 2^64, shapes whose
/// product overflows) are errors found before anything is allocated from them; needs no model.
#[test]
fn huge_declared_safetensors_sizes_are_errors() {
    use tessera_shard::weights::safetensors::SafetensorsFile;
    let open = |bytes: Vec<u8>| match SafetensorsFile::from_bytes("huge.safetensors", bytes) {
        Ok(_) => panic!("must not open"),
        Err(e) => e.to_string(),
    };
    let ok = serde_json::json!({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}});
    assert!(
        SafetensorsFile::from_bytes("ok.safetensors", safetensors_bytes(&ok, None, &[0; 8]))
            .is_ok()
    );
    for len in [u64::MAX, u64::MAX - 7, 1 << 62, 200 << 20] {
        let msg = open(safetensors_bytes(&ok, Some(len), &[0; 8]));
        assert_mentions(&msg, &["huge.safetensors", "header length"]);
    }
    let entry = |shape: Value, offsets: Value| serde_json::json!({"w": {"dtype": "BF16", "shape": shape, "data_offsets": offsets}});
    let cases = [
        (
            entry(
                serde_json::json!([1u64 << 32, 1u64 << 32]),
                serde_json::json!([0, 8]),
            ),
            "overflows",
        ),
        (
            entry(serde_json::json!([u64::MAX]), serde_json::json!([0, 8])),
            "overflows",
        ),
        (
            entry(serde_json::json!([4]), serde_json::json!([0, u64::MAX])),
            "run past the end",
        ),
        (
            entry(serde_json::json!([4]), serde_json::json!([u64::MAX, 8])),
            "data_offsets",
        ),
        (
            entry(serde_json::json!([-1]), serde_json::json!([0, 8])),
            "bad dimension",
        ),
        (
            entry(serde_json::json!([3]), serde_json::json!([0, 8])),
            "needs 6 bytes",
        ),
    ];
    for (header, needle) in cases {
        assert_mentions(&open(safetensors_bytes(&header, None, &[0; 8])), &[needle]);
    }
}

/// An index larger than any real one is refused before it is read.
#[test]
fn oversized_safetensors_index_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let index = dir.path().join("model.safetensors.index.json");
    let f = std::fs::File::create(&index).unwrap();
    f.set_len(65 << 20).unwrap();
    let msg = match tessera_shard::weights::safetensors::SafetensorsDir::open(dir.path()) {
        Ok(_) => panic!("must not open"),
        Err(e) => e.to_string(),
    };
    assert_mentions(&msg, &["model.safetensors.index.json", "more than the"]);
}
