//! `tessera-shard convert`: SmolLM2's GGUF converted to a Hugging Face folder holds, in float32,
//! exactly the weights the shard loads from the GGUF, resolves to the same config, tokenizes and
//! templates like the GGUF; bad input is a one-line error and a non-zero exit.

mod engine_common;

use std::path::Path;
use std::process::Command;

use engine_common::*;
use half::bf16;
use tessera_formats::chat_template::ChatTemplate;
use tessera_formats::gguf::Gguf;
use tessera_formats::tokenizer::load_tokenizer;
use tessera_shard::config::ModelConfig;
use tessera_shard::loader::WeightDtype;
use tessera_shard::tools::convert::convert;
use tessera_shard::weights::gguf::GgufSource;
use tessera_shard::weights::safetensors::SafetensorsFile;
use tessera_shard::weights::{TensorData, WeightSource};

fn bits(data: &TensorData) -> Vec<u32> {
    match data {
        TensorData::F32(v) => v.iter().map(|x| x.to_bits()).collect(),
        TensorData::Bf16(v) => v.iter().map(|x| x.to_bits() as u32).collect(),
        TensorData::F16(v) => v.iter().map(|x| x.to_bits() as u32).collect(),
        TensorData::Quant(_) => panic!("the converter's GGUF source dequantizes"),
    }
}

/// Every tensor of `dir/model.safetensors` against the GGUF loader's, after `expect` maps the
/// loader's f32 data to what the file should hold.
fn check_tensors(dir: &Path, gguf: &Gguf, expect: impl Fn(TensorData) -> TensorData) {
    let config = ModelConfig::from_gguf(gguf).unwrap();
    let src = GgufSource::new(gguf, config.num_heads, config.num_kv_heads);
    let file = SafetensorsFile::open(&dir.join("model.safetensors")).unwrap();
    let names: Vec<String> = file.names().map(str::to_string).collect();
    assert_eq!(
        names.len(),
        gguf.tensors().len(),
        "one tensor per GGUF tensor"
    );
    for name in &names {
        let got = file.tensor(name).unwrap();
        let want = src.tensor(name).unwrap();
        assert_eq!(got.shape, want.shape, "{name}");
        assert!(
            bits(&got.data) == bits(&expect(want.data)),
            "{name} differs from the loader's"
        );
    }
}

#[test]
fn smollm2_converts_to_the_weights_config_and_tokenizer_the_shard_loads() {
    let gguf_path = smollm2_gguf();
    let gguf = Gguf::open(&gguf_path).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("f32");
    let c = convert(&gguf_path, &out, WeightDtype::F32).unwrap();
    assert_eq!((c.tensors, c.parameters), (272, 134_515_008));
    assert!(c.tied_embeddings);
    check_tensors(&out, &gguf, |d| d);

    let config = ModelConfig::from_hf_dir(&out).unwrap();
    assert_eq!(config, ModelConfig::from_gguf(&gguf).unwrap());

    let hf = load_tokenizer(&out).unwrap();
    let from_gguf = load_tokenizer(&gguf_path).unwrap();
    let template = ChatTemplate::load(&out).unwrap().expect("chat template");
    for case in smollm2_reference()["cases"].as_array().unwrap() {
        let text = match case["templated_text"].as_str() {
            Some(templated) => {
                let messages = case["input"].as_array().unwrap();
                let rendered = template.render(messages, true, None).unwrap();
                assert_eq!(rendered, templated, "{}", case["name"]);
                rendered
            }
            None => case["input"].as_str().unwrap().to_string(),
        };
        let ids = hf.encode(text.as_str(), true).unwrap().get_ids().to_vec();
        let want: Vec<u32> = serde_json::from_value(case["prompt_ids"].clone()).unwrap();
        assert_eq!(ids, want, "{}", case["name"]);
        let gguf_ids = from_gguf.encode(text.as_str(), true).unwrap();
        assert_eq!(ids, gguf_ids.get_ids(), "{}", case["name"]);
    }
}

#[test]
fn bf16_conversion_rounds_the_loaders_weights_to_nearest_even() {
    let gguf_path = smollm2_gguf();
    let gguf = Gguf::open(&gguf_path).unwrap();
    let dir = tempfile::tempdir().unwrap();
    convert(&gguf_path, dir.path(), WeightDtype::Bf16).unwrap();
    check_tensors(dir.path(), &gguf, |d| {
        TensorData::Bf16(d.to_f32().into_iter().map(bf16::from_f32).collect())
    });
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("config.json")).unwrap())
            .unwrap();
    assert_eq!(config["torch_dtype"], "bfloat16");
    assert_eq!(config["rms_norm_eps"].as_f64(), Some(1e-5));
}

/// Runs the binary's `convert` expecting failure; returns stderr.
fn convert_fails(args: &[&Path]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_tessera-shard"))
        .arg("convert")
        .args(args)
        .output()
        .unwrap();
    assert!(!out.status.success(), "convert should fail for {args:?}");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!stderr.contains("panicked"), "{stderr}");
    stderr
}

/// A GGUF v3 file with string metadata only and no tensors.
fn gguf_with(kv: &[(&str, &str)]) -> Vec<u8> {
    fn put_str(out: &mut Vec<u8>, s: &str) {
        out.extend((s.len() as u64).to_le_bytes());
        out.extend(s.as_bytes());
    }
    const STRING: u32 = 8;
    let mut out = b"GGUF".to_vec();
    out.extend(3u32.to_le_bytes());
    out.extend(0u64.to_le_bytes());
    out.extend((kv.len() as u64).to_le_bytes());
    for (k, v) in kv {
        put_str(&mut out, k);
        out.extend(STRING.to_le_bytes());
        put_str(&mut out, v);
    }
    out
}

#[test]
fn bad_input_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");

    let not_gguf = dir.path().join("config.json");
    std::fs::write(&not_gguf, "{\"model_type\": \"llama\"}").unwrap();
    let err = convert_fails(&[&not_gguf, &out]);
    assert!(err.contains("config.json") && err.contains("GGUF"), "{err}");

    let falcon = dir.path().join("falcon.gguf");
    std::fs::write(&falcon, gguf_with(&[("general.architecture", "falcon")])).unwrap();
    let err = convert_fails(&[&falcon, &out]);
    assert!(err.contains("unsupported architecture 'falcon'"), "{err}");

    let err = convert_fails(&[&dir.path().join("missing.gguf"), &out]);
    assert!(err.contains("missing.gguf"), "{err}");
    assert!(!out.join("model.safetensors").exists());
}
