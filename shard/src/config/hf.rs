//! `ModelConfig` from a Hugging Face folder: `config.json` as transformers reads it for each
//! family (its defaults included), plus the extra EOS ids of `generation_config.json`.

use std::path::Path;

use serde_json::Value;

use super::rope::{self, RopeContext};
use super::{Architecture, ModelConfig, MoeConfig, RopeConfig};
use crate::backend::Activation;
use crate::{Error, Result};

impl ModelConfig {
    /// Reads `dir/config.json` and, when present, `dir/generation_config.json`.
    pub fn from_hf_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        let json = read_json(&path)?;
        let mut config = Self::from_hf_json(&json).map_err(|msg| Error::model_file(&path, msg))?;
        let gen_path = dir.join("generation_config.json");
        if gen_path.exists() {
            let gen = read_json(&gen_path)?;
            let extra = token_ids(gen.get("eos_token_id"))
                .map_err(|msg| Error::model_file(&gen_path, msg))?;
            for id in extra {
                if !config.eos_token_ids.contains(&id) {
                    config.eos_token_ids.push(id);
                }
            }
        }
        Ok(config)
    }

    /// Resolves a parsed `config.json`; the error string names the offending key.
    pub fn from_hf_json(j: &Value) -> std::result::Result<Self, String> {
        let arch_name = j
            .get("model_type")
            .and_then(Value::as_str)
            .or_else(|| j.get("architectures")?.get(0)?.as_str())
            .ok_or("neither 'model_type' nor 'architectures' is set")?;
        let arch = Architecture::parse(arch_name).ok_or_else(|| {
            format!(
                "unsupported architecture '{arch_name}' (supported: {})",
                Architecture::SUPPORTED
            )
        })?;
        let hidden_size = req_usize(j, "hidden_size")?;
        let num_heads = req_usize(j, "num_attention_heads")?;
        let num_kv_heads = opt_usize(j, "num_key_value_heads")?.unwrap_or(num_heads);
        let head_dim = match opt_usize(j, "head_dim")? {
            Some(d) => d,
            None if num_heads > 0 => hidden_size / num_heads,
            None => 0,
        };
        let num_layers = req_usize(j, "num_hidden_layers")?;
        let max_position_embeddings = opt_usize(j, "max_position_embeddings")?.unwrap_or(2048);
        let cx = RopeContext {
            head_dim,
            max_position_embeddings,
            original_max_position_embeddings: opt_usize(j, "original_max_position_embeddings")?,
            default_theta: if arch == Architecture::Gemma3 {
                1_000_000.0
            } else {
                10_000.0
            },
        };
        let (rope, split_local) = rope::from_json(j, &cx)?;
        let local_rope = match (arch, split_local) {
            (_, Some(local)) => Some(local),
            (Architecture::Gemma3, None) => {
                let base = opt_f64(j, "rope_local_base_freq")?.unwrap_or(10_000.0);
                Some(RopeConfig::plain(base as f32, rope.rotary_dim))
            }
            _ => None,
        };
        let sliding_layers = sliding_layers(j, arch, num_layers)?;
        let window = opt_usize(j, "sliding_window")?;
        let flag = |k: &str, default: bool| j.get(k).and_then(Value::as_bool).unwrap_or(default);
        let softcap = |k: &str, default: Option<f64>| -> std::result::Result<_, String> {
            Ok(match j.get(k) {
                None => default,
                Some(_) => opt_f64(j, k)?,
            }
            .map(|v| v as f32))
        };
        let gemma2 = arch == Architecture::Gemma2;
        let attn_scale = if arch.is_gemma() {
            let scalar = opt_f64(j, "query_pre_attn_scalar")?.unwrap_or(256.0);
            scalar.powf(-0.5) as f32
        } else {
            (head_dim as f64).powf(-0.5) as f32
        };
        let config = ModelConfig {
            architecture: arch,
            hidden_size,
            intermediate_size: req_usize(j, "intermediate_size")?,
            num_layers,
            num_heads,
            num_kv_heads,
            head_dim,
            vocab_size: req_usize(j, "vocab_size")?,
            rms_eps: opt_f64(j, "rms_norm_eps")?.unwrap_or(1e-6) as f32,
            rope,
            local_rope,
            max_position_embeddings,
            sliding_window: window.filter(|_| sliding_layers.contains(&true)),
            sliding_layers,
            tie_word_embeddings: flag("tie_word_embeddings", arch.is_gemma()),
            attention_bias: match arch {
                Architecture::Qwen2 => true,
                _ => flag("attention_bias", false),
            },
            qk_norm: matches!(
                arch,
                Architecture::Qwen3 | Architecture::Qwen3Moe | Architecture::Gemma3
            ),
            activation: activation(j, arch)?,
            attn_scale,
            attn_softcap: softcap("attn_logit_softcapping", gemma2.then_some(50.0))?,
            final_softcap: softcap("final_logit_softcapping", gemma2.then_some(30.0))?,
            moe: moe(j, arch, num_layers)?,
            bos_token_id: token_ids(j.get("bos_token_id"))?.first().copied(),
            eos_token_ids: token_ids(j.get("eos_token_id"))?,
        };
        config.check()?;
        Ok(config)
    }
}

/// Which layers use the sliding window: `layer_types` when the config lists them, else each
/// family's rule in transformers.
fn sliding_layers(
    j: &Value,
    arch: Architecture,
    layers: usize,
) -> std::result::Result<Vec<bool>, String> {
    if let Some(types) = j.get("layer_types").filter(|v| !v.is_null()) {
        let types = types.as_array().ok_or("'layer_types' must be a list")?;
        return types
            .iter()
            .map(|t| match t.as_str() {
                Some("sliding_attention") => Ok(true),
                Some("full_attention") => Ok(false),
                _ => Err(format!("unsupported layer type {t}")),
            })
            .collect();
    }
    let windowed = opt_usize(j, "sliding_window")?.is_some();
    Ok(match arch {
        Architecture::Gemma2 => (0..layers).map(|i| i % 2 == 0).collect(),
        Architecture::Gemma3 => {
            let pattern = opt_usize(j, "sliding_window_pattern")?.unwrap_or(6).max(1);
            (0..layers).map(|i| (i + 1) % pattern != 0).collect()
        }
        Architecture::Qwen2 | Architecture::Qwen3 | Architecture::Qwen3Moe => {
            let used =
                windowed && j.get("use_sliding_window").and_then(Value::as_bool) == Some(true);
            let first = opt_usize(j, "max_window_layers")?.unwrap_or(0);
            (0..layers).map(|i| used && i >= first).collect()
        }
        _ => vec![windowed; layers],
    })
}

fn activation(j: &Value, arch: Architecture) -> std::result::Result<Activation, String> {
    let key = if arch.is_gemma() && j.get("hidden_activation").is_some() {
        "hidden_activation"
    } else {
        "hidden_act"
    };
    let default = if arch.is_gemma() {
        "gelu_pytorch_tanh"
    } else {
        "silu"
    };
    match j.get(key).and_then(Value::as_str).unwrap_or(default) {
        "silu" | "swish" => Ok(Activation::Silu),
        "gelu_pytorch_tanh" | "gelu_new" | "gelu_tanh" => Ok(Activation::GeluTanh),
        other => Err(format!("unsupported activation '{other}' in '{key}'")),
    }
}

/// The mixture of experts of Mixtral (every layer) and Qwen3-MoE (`decoder_sparse_step`,
/// `mlp_only_layers`).
fn moe(
    j: &Value,
    arch: Architecture,
    layers: usize,
) -> std::result::Result<Option<MoeConfig>, String> {
    let top_k = || req_usize(j, "num_experts_per_tok");
    // transformers 5 writes `num_local_experts` for both families; Qwen's own configs say
    // `num_experts`.
    let experts = || match opt_usize(j, "num_experts")? {
        Some(n) => Ok(n),
        None => req_usize(j, "num_local_experts"),
    };
    Ok(match arch {
        Architecture::Mixtral => Some(MoeConfig {
            num_experts: experts()?,
            top_k: top_k()?,
            intermediate_size: req_usize(j, "intermediate_size")?,
            norm_topk_prob: true,
            sparse_layers: vec![true; layers],
        }),
        Architecture::Qwen3Moe => {
            let step = opt_usize(j, "decoder_sparse_step")?.unwrap_or(1).max(1);
            let dense: Vec<usize> = match j.get("mlp_only_layers") {
                None | Some(Value::Null) => Vec::new(),
                Some(v) => serde_json::from_value(v.clone())
                    .map_err(|_| "'mlp_only_layers' must be a list of layer indices")?,
            };
            let experts = experts()?;
            Some(MoeConfig {
                num_experts: experts,
                top_k: top_k()?,
                intermediate_size: req_usize(j, "moe_intermediate_size")?,
                norm_topk_prob: j
                    .get("norm_topk_prob")
                    .and_then(Value::as_bool)
                    .unwrap_or(false),
                sparse_layers: (0..layers)
                    .map(|i| !dense.contains(&i) && experts > 0 && (i + 1) % step == 0)
                    .collect(),
            })
        }
        _ => None,
    })
}

fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::model_file(path, format!("invalid JSON: {e}")))
}

pub(super) fn opt_usize(j: &Value, key: &str) -> std::result::Result<Option<usize>, String> {
    match j.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_u64()
            .map(|v| Some(v as usize))
            .ok_or_else(|| format!("'{key}' must be a non-negative integer, got {v}")),
    }
}

fn req_usize(j: &Value, key: &str) -> std::result::Result<usize, String> {
    opt_usize(j, key)?.ok_or_else(|| format!("missing '{key}'"))
}

pub(super) fn opt_f64(j: &Value, key: &str) -> std::result::Result<Option<f64>, String> {
    match j.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_f64()
            .map(Some)
            .ok_or_else(|| format!("'{key}' must be a number, got {v}")),
    }
}

/// `bos_token_id`/`eos_token_id`: absent, null, an integer or a list of integers.
fn token_ids(v: Option<&Value>) -> std::result::Result<Vec<u32>, String> {
    let one = |v: &Value| v.as_u64().and_then(|x| u32::try_from(x).ok());
    match v {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) => items
            .iter()
            .map(|x| one(x).ok_or_else(|| format!("invalid token id {x}")))
            .collect(),
        Some(x) => one(x)
            .map(|id| vec![id])
            .ok_or_else(|| format!("invalid token id {x}")),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::config::RopeScaling;

    fn base() -> Value {
        json!({
            "model_type": "llama", "hidden_size": 64, "intermediate_size": 96,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "vocab_size": 100
        })
    }

    fn with(extra: Value) -> std::result::Result<ModelConfig, String> {
        let mut j = base();
        for (k, v) in extra.as_object().unwrap() {
            j[k] = v.clone();
        }
        ModelConfig::from_hf_json(&j)
    }

    /// Each malformed config names its problem instead of loading something else.
    #[test]
    fn bad_configs_name_the_problem() {
        let cases = [
            (
                json!({"model_type": "gpt2"}),
                "unsupported architecture 'gpt2'",
            ),
            (
                json!({"layer_types": ["full_attention"]}),
                "'layer_types' has 1 entries",
            ),
            (
                json!({"layer_types": ["chunked"]}),
                "unsupported layer type",
            ),
            (
                json!({"hidden_act": "relu"}),
                "unsupported activation 'relu'",
            ),
            (
                json!({"model_type": "mixtral", "num_local_experts": 2, "num_experts_per_tok": 3}),
                "need 1 <= top-k <= experts",
            ),
            (
                json!({"rope_scaling": {"rope_type": "longrope", "short_factor": [1.0],
                                        "long_factor": [1.0]}}),
                "longrope needs 8 short and long factors",
            ),
            (
                json!({"partial_rotary_factor": 0.0}),
                "rotary dimensions (0)",
            ),
            (
                json!({"rope_scaling": {"rope_type": "mrope"}}),
                "unsupported rope scaling type",
            ),
        ];
        for (extra, want) in cases {
            let err = with(extra.clone()).unwrap_err();
            assert!(err.contains(want), "{extra}: {err}");
        }
    }

    /// transformers 5's `rope_parameters`, per layer type as Gemma 3 writes it, resolves like the
    /// classic keys.
    #[test]
    fn rope_parameters_per_layer_type() {
        let c = with(json!({
            "model_type": "gemma3_text", "head_dim": 16, "sliding_window": 4,
            "layer_types": ["sliding_attention", "full_attention"],
            "rope_parameters": {
                "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}
            }
        }))
        .unwrap();
        assert_eq!(c.rope.theta, 1e6);
        assert_eq!(c.rope.scaling, RopeScaling::Linear { factor: 8.0 });
        let local = c.local_rope.clone().unwrap();
        assert_eq!((local.theta, local.scaling), (1e4, RopeScaling::None));
        assert_eq!((c.window(0), c.window(1)), (Some(4), None));
        assert!(c.qk_norm && c.tie_word_embeddings);
        assert_eq!(c.attn_scale, 256f32.powf(-0.5));
    }
}
