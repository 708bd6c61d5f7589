//! The JSON files of a Hugging Face model folder, written from GGUF metadata: `config.json` and
//! `generation_config.json` from the resolved [`ModelConfig`], the tokenizer files from the
//! `tokenizers::Tokenizer` the formats crate builds out of the GGUF vocabulary.

use std::collections::BTreeMap;

use serde_json::{json, Map, Value};
use tessera_formats::gguf::Gguf;
use tokenizers::Tokenizer;

use crate::config::{Architecture, ModelConfig, RopeScaling};
use crate::{Error, Result};

/// An f32 metadata value as the decimal a person would write (1e-5, not 9.99999974e-6), which is
/// what a config.json holds; parsing it back as f32 gives the same value.
fn decimal(x: f32) -> Value {
    format!("{x}")
        .parse::<f64>()
        .ok()
        .and_then(serde_json::Number::from_f64)
        .map_or(Value::Null, Value::Number)
}

fn class_name(arch: Architecture) -> &'static str {
    match arch {
        Architecture::Llama => "LlamaForCausalLM",
        Architecture::Mistral => "MistralForCausalLM",
        Architecture::Qwen2 => "Qwen2ForCausalLM",
        other => unreachable!("convert refuses {other} before writing its config"),
    }
}

fn rope_scaling(r: &RopeScaling) -> Value {
    match *r {
        RopeScaling::None => Value::Null,
        RopeScaling::Linear { factor } => {
            json!({"rope_type": "linear", "type": "linear", "factor": decimal(factor)})
        }
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        } => json!({
            "rope_type": "llama3",
            "factor": decimal(factor),
            "low_freq_factor": decimal(low_freq_factor),
            "high_freq_factor": decimal(high_freq_factor),
            "original_max_position_embeddings": original_max_position_embeddings,
        }),
        _ => unreachable!("GGUF metadata resolves to no other rope scaling"),
    }
}

fn special_ids(gguf: &Gguf) -> (Option<u64>, Option<u64>, Option<u64>) {
    (
        gguf.get_u64("tokenizer.ggml.bos_token_id"),
        gguf.get_u64("tokenizer.ggml.eos_token_id"),
        gguf.get_u64("tokenizer.ggml.padding_token_id"),
    )
}

/// `config.json`: what transformers' `*ForCausalLM` needs, and exactly what
/// `ModelConfig::from_hf_dir` resolves back to `config`.
fn config_json(gguf: &Gguf, c: &ModelConfig, torch_dtype: &str) -> Value {
    let (bos, eos, pad) = special_ids(gguf);
    let mut doc = json!({
        "architectures": [class_name(c.architecture)],
        "model_type": c.architecture.to_string(),
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.num_kv_heads,
        "head_dim": c.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": c.max_position_embeddings,
        "initializer_range": 0.02,
        "rms_norm_eps": decimal(c.rms_eps),
        "rope_theta": decimal(c.rope.theta),
        "rope_scaling": rope_scaling(&c.rope.scaling),
        "attention_bias": c.attention_bias,
        "attention_dropout": 0.0,
        "mlp_bias": false,
        "pretraining_tp": 1,
        "tie_word_embeddings": c.tie_word_embeddings,
        "use_cache": true,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "pad_token_id": pad,
        "torch_dtype": torch_dtype,
    });
    match c.architecture {
        Architecture::Llama => {}
        Architecture::Mistral => doc["sliding_window"] = json!(c.sliding_window),
        Architecture::Qwen2 => {
            doc["use_sliding_window"] = json!(c.sliding_window.is_some());
            doc["sliding_window"] = json!(c.sliding_window);
        }
        other => unreachable!("convert refuses {other} before writing its config"),
    }
    doc
}

fn generation_config_json(gguf: &Gguf) -> Value {
    let (bos, eos, pad) = special_ids(gguf);
    json!({"_from_model_config": true, "bos_token_id": bos, "eos_token_id": eos, "pad_token_id": pad})
}

/// The tokenizer's BOS/EOS insertion, read off the built tokenizer itself (encoding the empty
/// string with special tokens), so tokenizer_config.json cannot disagree with tokenizer.json.
fn adds_bos_eos(tok: &Tokenizer, bos: Option<u64>, eos: Option<u64>) -> Result<(bool, bool)> {
    let enc = tok
        .encode("", true)
        .map_err(|e| Error::Tokenizer(format!("encoding the empty string: {e}")))?;
    let ids = enc.get_ids();
    let is = |id: Option<&u32>, want: Option<u64>| id.is_some_and(|&i| Some(i as u64) == want);
    Ok((is(ids.first(), bos), is(ids.last(), eos)))
}

/// `tokenizer_config.json`: special tokens, BOS/EOS insertion, added tokens and the chat template.
fn tokenizer_config_json(gguf: &Gguf, c: &ModelConfig, tok: &Tokenizer) -> Result<Value> {
    let (bos, eos, pad) = special_ids(gguf);
    let name = |id: Option<u64>| id.and_then(|i| tok.id_to_token(i as u32));
    let (add_bos, add_eos) = adds_bos_eos(tok, bos, eos)?;
    let byte_level = gguf.get_str("tokenizer.ggml.model") == Some("gpt2");
    let added: BTreeMap<u32, _> = tok.get_added_tokens_decoder().into_iter().collect();
    let added: Map<String, Value> = added
        .into_iter()
        .map(|(id, t)| {
            let entry = json!({
                "content": t.content, "single_word": t.single_word, "lstrip": t.lstrip,
                "rstrip": t.rstrip, "normalized": t.normalized, "special": t.special,
            });
            (id.to_string(), entry)
        })
        .collect();
    let mut doc = json!({
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "bos_token": name(bos),
        "eos_token": name(eos),
        "unk_token": name(gguf.get_u64("tokenizer.ggml.unknown_token_id")),
        "pad_token": name(pad),
        "clean_up_tokenization_spaces": false,
        "model_max_length": c.max_position_embeddings,
        "tokenizer_class": if byte_level { "GPT2Tokenizer" } else { "LlamaTokenizer" },
        "added_tokens_decoder": added,
    });
    if byte_level {
        // For SentencePiece vocabularies transformers treats this key as a request to rebuild
        // the tokenizer from a slow one, so it is written only where it is plain information.
        doc["add_prefix_space"] = json!(false);
    }
    if let Some(t) = gguf.get_str("tokenizer.chat_template") {
        doc["chat_template"] = json!(t);
    }
    Ok(doc)
}

/// `special_tokens_map.json`: the special tokens that exist, by role.
fn special_tokens_map(tokenizer_config: &Value) -> Value {
    let map: Map<String, Value> = ["bos_token", "eos_token", "unk_token", "pad_token"]
        .into_iter()
        .filter_map(|k| {
            let v = tokenizer_config.get(k).filter(|v| !v.is_null())?;
            Some((k.to_string(), v.clone()))
        })
        .collect();
    Value::Object(map)
}

/// Every JSON file of the folder, by file name, rendered.
pub fn files(
    gguf: &Gguf,
    c: &ModelConfig,
    tok: &Tokenizer,
    torch_dtype: &str,
) -> Result<Vec<(&'static str, String)>> {
    let tokenizer = tok
        .to_string(true)
        .map_err(|e| Error::Tokenizer(format!("serializing tokenizer.json: {e}")))?;
    let tokenizer_config = tokenizer_config_json(gguf, c, tok)?;
    let pretty = |v: &Value| serde_json::to_string_pretty(v).unwrap_or_default();
    Ok(vec![
        ("config.json", pretty(&config_json(gguf, c, torch_dtype))),
        (
            "generation_config.json",
            pretty(&generation_config_json(gguf)),
        ),
        ("tokenizer.json", tokenizer),
        (
            "special_tokens_map.json",
            pretty(&special_tokens_map(&tokenizer_config)),
        ),
        ("tokenizer_config.json", pretty(&tokenizer_config)),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_floats_become_the_decimals_people_write() {
        assert_eq!(decimal(1e-5).as_f64(), Some(1e-5));
        assert_ne!(
            1e-5f32 as f64, 1e-5,
            "a plain widening would write 9.99999974e-6"
        );
        assert_eq!(decimal(100000.0).as_f64(), Some(100000.0));
        assert_eq!(decimal(1e-6).as_f64().unwrap() as f32, 1e-6f32);
        assert_eq!(decimal(f32::NAN), Value::Null);
    }

    #[test]
    fn only_existing_special_tokens_are_mapped() {
        let cfg = json!({"bos_token": "<s>", "eos_token": "</s>", "unk_token": null});
        assert_eq!(
            special_tokens_map(&cfg),
            json!({"bos_token": "<s>", "eos_token": "</s>"})
        );
    }
}
