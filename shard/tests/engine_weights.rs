//! Weight loading variants: a checkpoint sharded over several safetensors files (with
//! `model.safetensors.index.json`) loads the same model as the single file, and f32 weights
//! converted to f16/bf16 at load still produce the reference's first tokens.

mod engine_common;

use std::path::Path;

use engine_common::*;
use serde_json::{json, Map, Value};
use tessera_shard::loader::{load, LoadOptions, WeightDtype};
use tessera_shard::tools::generate::greedy;

/// Writes `names` of the source file (header + bytes) as a new safetensors file.
fn write_subset(src: &[u8], header: &Map<String, Value>, names: &[&String], out: &Path) {
    let data_start = 8 + u64::from_le_bytes(src[..8].try_into().unwrap()) as usize;
    let (mut new_header, mut data) = (Map::new(), Vec::new());
    for &name in names {
        let e = &header[name];
        let (a, b) = (
            e["data_offsets"][0].as_u64().unwrap() as usize,
            e["data_offsets"][1].as_u64().unwrap() as usize,
        );
        let start = data.len();
        data.extend_from_slice(&src[data_start + a..data_start + b]);
        new_header.insert(
            name.clone(),
            json!({"dtype": e["dtype"], "shape": e["shape"], "data_offsets": [start, data.len()]}),
        );
    }
    let text = serde_json::to_vec(&Value::Object(new_header)).unwrap();
    let mut bytes = (text.len() as u64).to_le_bytes().to_vec();
    bytes.extend(text);
    bytes.extend(data);
    std::fs::write(out, bytes).unwrap();
}

#[test]
fn sharded_checkpoint_loads_like_the_single_file() {
    let stories = or_skip!(stories());
    let dir = tempfile::tempdir().unwrap();
    for f in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(stories.join(f), dir.path().join(f)).unwrap();
    }
    let src = std::fs::read(stories.join("model.safetensors")).unwrap();
    let n = u64::from_le_bytes(src[..8].try_into().unwrap()) as usize;
    let header: Map<String, Value> = serde_json::from_slice(&src[8..8 + n]).unwrap();
    let names: Vec<&String> = header.keys().filter(|k| *k != "__metadata__").collect();
    let (first, second) = names.split_at(names.len() / 2);
    let files = [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ];
    write_subset(&src, &header, first, &dir.path().join(files[0]));
    write_subset(&src, &header, second, &dir.path().join(files[1]));
    let mut weight_map = Map::new();
    for (part, file) in [(first, files[0]), (second, files[1])] {
        for name in part {
            weight_map.insert((*name).clone(), Value::from(file));
        }
    }
    let index = json!({"metadata": {}, "weight_map": weight_map});
    std::fs::write(
        dir.path().join("model.safetensors.index.json"),
        index.to_string(),
    )
    .unwrap();

    let sharded = load(dir.path(), &LoadOptions::default()).unwrap();
    let single = load(&stories, &LoadOptions::default()).unwrap();
    let prompt = [1, 403, 407, 261, 378];
    let (a, b) = (
        greedy(&sharded.model, &prompt, 10, &[]).unwrap(),
        greedy(&single.model, &prompt, 10, &[]).unwrap(),
    );
    assert_eq!(a.generated_ids, b.generated_ids);
    assert_eq!(a.first_logits, b.first_logits);
}

#[test]
fn half_precision_conversions_keep_the_first_tokens() {
    let reference = [432, 383, 286, 261];
    for dtype in [WeightDtype::F16, WeightDtype::Bf16] {
        let loaded = load(
            &or_skip!(stories()),
            &LoadOptions {
                dtype,
                ..LoadOptions::default()
            },
        )
        .unwrap();
        let g = greedy(&loaded.model, &[1, 403, 407, 261, 378], 4, &[]).unwrap();
        assert_eq!(g.generated_ids, reference, "{dtype:?}");
        assert!(
            (g.first_logits[432] - 17.7994).abs() < 0.2,
            "{dtype:?}: {}",
            g.first_logits[432]
        );
    }
}
