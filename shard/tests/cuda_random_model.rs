//! The random-weight model writer: a tiny folder loads with the CPU engine and generates, the
//! bytes depend only on the seed, and the llama3-8b shape is Llama-3.1-8B's.

use tessera_shard::config::{ModelConfig, RopeScaling};
use tessera_shard::loader::{self, Device, LoadOptions, WeightDtype};
use tessera_shard::tools::generate::greedy;
use tessera_shard::tools::random_model::{config_json, tensors, write_model, Shape};
use tessera_shard::weights::DType;

#[test]
fn tiny_random_model_loads_and_generates_on_cpu() {
    let dir = tempfile::tempdir().unwrap();
    let params = write_model(dir.path(), Shape::Tiny, DType::Bf16, 7).unwrap();
    let opts = LoadOptions {
        dtype: WeightDtype::Auto,
        device: Device::Cpu,
        ..Default::default()
    };
    let loaded = loader::load(dir.path(), &opts).unwrap();
    assert_eq!(loaded.dtype_name, "bfloat16");
    assert_eq!(loaded.config.vocab_size, 256);
    assert_eq!(loaded.tokenizer.get_vocab_size(true), 256);
    let d = Shape::Tiny.dims();
    let expected: usize = tensors(&d)
        .iter()
        .map(|t| t.shape.iter().product::<usize>())
        .sum();
    assert_eq!(params, expected);

    let enc = loaded.tokenizer.encode("w5 w6 w7", true).unwrap();
    assert_eq!(enc.get_ids(), &[1, 5, 6, 7], "BOS then the words");
    let out = greedy(&loaded.model, enc.get_ids(), 6, &[]).unwrap();
    assert_eq!(out.generated_ids.len(), 6);
    assert!(out.generated_ids.iter().all(|&t| t < 256));
    assert_eq!(out.first_logits.len(), 256);
    assert!(out.first_logits.iter().all(|v| v.is_finite()));
    let spread = out.first_logits.iter().copied().fold(f32::MIN, f32::max)
        - out.first_logits.iter().copied().fold(f32::MAX, f32::min);
    assert!(spread > 0.0, "random weights give distinct logits");
}

#[test]
fn weights_depend_only_on_the_seed() {
    let read = |seed| {
        let dir = tempfile::tempdir().unwrap();
        write_model(dir.path(), Shape::Tiny, DType::F16, seed).unwrap();
        std::fs::read(dir.path().join("model.safetensors")).unwrap()
    };
    let (a, b, c) = (read(3), read(3), read(4));
    assert_eq!(a, b);
    assert_ne!(a, c);
    assert_eq!(a.len(), c.len());
}

#[test]
fn llama3_8b_shape_matches_the_real_model() {
    let d = Shape::Llama3_8b.dims();
    let c = ModelConfig::from_hf_json(&config_json(&d, DType::Bf16)).unwrap();
    assert_eq!(
        (c.num_layers, c.hidden_size, c.intermediate_size),
        (32, 4096, 14336)
    );
    assert_eq!(
        (c.num_heads, c.num_kv_heads, c.head_dim, c.vocab_size),
        (32, 8, 128, 128_256)
    );
    assert!(matches!(c.rope.scaling, RopeScaling::Llama3 { factor, .. } if factor == 8.0));
    assert!(!c.tie_word_embeddings);
    let params: usize = tensors(&d)
        .iter()
        .map(|t| t.shape.iter().product::<usize>())
        .sum();
    assert_eq!(params, 8_030_261_248, "Llama-3.1-8B's parameter count");
}
