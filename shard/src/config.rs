//! The resolved model configuration: `config.json` (+ `generation_config.json`) or GGUF metadata
//! turned into one struct with no `Option`s except `sliding_window`. Families differ only here:
//! qwen2 has q/k/v biases, mistral (and qwen2 with `use_sliding_window`) a sliding window.

use std::fmt;
use std::path::Path;

use serde_json::Value;
use tessera_formats::gguf::Gguf;

use crate::{Error, Result};

/// Supported model families; all share the Llama decoder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    Llama,
    Mistral,
    Qwen2,
}

impl Architecture {
    fn parse(name: &str) -> Option<Self> {
        match name.to_ascii_lowercase().as_str() {
            "llama" | "llamaforcausallm" => Some(Self::Llama),
            "mistral" | "mistralforcausallm" => Some(Self::Mistral),
            "qwen2" | "qwen2forcausallm" => Some(Self::Qwen2),
            _ => None,
        }
    }
}

impl fmt::Display for Architecture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Llama => "llama",
            Self::Mistral => "mistral",
            Self::Qwen2 => "qwen2",
        })
    }
}

/// How rotary frequencies are rescaled for long context.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RopeScaling {
    None,
    /// Position interpolation: every inverse frequency divided by `factor`.
    Linear {
        factor: f32,
    },
    /// Llama 3.1's piecewise rescaling of low frequencies.
    Llama3 {
        factor: f32,
        low_freq_factor: f32,
        high_freq_factor: f32,
        original_max_position_embeddings: usize,
    },
}

/// Everything the engine needs to know about a model, resolved and checked.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub architecture: Architecture,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub rms_eps: f32,
    pub rope_theta: f32,
    pub rope_scaling: RopeScaling,
    pub max_position_embeddings: usize,
    pub sliding_window: Option<usize>,
    pub tie_word_embeddings: bool,
    pub attention_bias: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

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
        let architecture = Architecture::parse(arch_name).ok_or_else(|| {
            format!("unsupported architecture '{arch_name}' (supported: llama, mistral, qwen2)")
        })?;
        let hidden_size = req_usize(j, "hidden_size")?;
        let num_heads = req_usize(j, "num_attention_heads")?;
        let num_kv_heads = opt_usize(j, "num_key_value_heads")?.unwrap_or(num_heads);
        let head_dim = match opt_usize(j, "head_dim")? {
            Some(d) => d,
            None if num_heads > 0 => hidden_size / num_heads,
            None => 0,
        };
        let use_window = match architecture {
            Architecture::Qwen2 => j
                .get("use_sliding_window")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            _ => true,
        };
        let config = ModelConfig {
            architecture,
            hidden_size,
            intermediate_size: req_usize(j, "intermediate_size")?,
            num_layers: req_usize(j, "num_hidden_layers")?,
            num_heads,
            num_kv_heads,
            head_dim,
            vocab_size: req_usize(j, "vocab_size")?,
            rms_eps: opt_f64(j, "rms_norm_eps")?.unwrap_or(1e-6) as f32,
            rope_theta: opt_f64(j, "rope_theta")?.unwrap_or(10000.0) as f32,
            rope_scaling: rope_scaling(j.get("rope_scaling"))?,
            max_position_embeddings: opt_usize(j, "max_position_embeddings")?.unwrap_or(2048),
            sliding_window: if use_window {
                opt_usize(j, "sliding_window")?
            } else {
                None
            },
            tie_word_embeddings: j
                .get("tie_word_embeddings")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            attention_bias: match architecture {
                Architecture::Qwen2 => true,
                _ => j
                    .get("attention_bias")
                    .and_then(Value::as_bool)
                    .unwrap_or(false),
            },
            bos_token_id: token_ids(j.get("bos_token_id"))?.first().copied(),
            eos_token_ids: token_ids(j.get("eos_token_id"))?,
        };
        config.check()?;
        Ok(config)
    }

    /// Resolves GGUF metadata (`{arch}.embedding_length`, ...). `vocab_size` comes from the
    /// token embedding's shape and tying from the absence of `output.weight`.
    pub fn from_gguf(g: &Gguf) -> Result<Self> {
        let bad = |msg: String| Error::model_file(g.path(), msg);
        let arch_name = g
            .get_str("general.architecture")
            .ok_or_else(|| bad("missing general.architecture".into()))?;
        let architecture = Architecture::parse(arch_name)
            .ok_or_else(|| Error::UnsupportedArchitecture(arch_name.into()))?;
        let key = |k: &str| format!("{arch_name}.{k}");
        let req = |k: &str| -> Result<usize> {
            g.get_u64(&key(k))
                .map(|v| v as usize)
                .ok_or_else(|| bad(format!("missing metadata {}", key(k))))
        };
        let hidden_size = req("embedding_length")?;
        let num_heads = req("attention.head_count")?;
        let num_kv_heads = g
            .get_u64(&key("attention.head_count_kv"))
            .map_or(num_heads, |v| v as usize);
        let head_dim = g
            .get_u64(&key("attention.key_length"))
            .map_or(hidden_size / num_heads.max(1), |v| v as usize);
        let embd = g.tensor_info("token_embd.weight")?;
        let vocab_size = embd.shape().first().copied().unwrap_or(0);
        let rope_scaling = match g.get_str(&key("rope.scaling.type")) {
            None | Some("none") => RopeScaling::None,
            Some("linear") => RopeScaling::Linear {
                factor: g.get_f32(&key("rope.scaling.factor")).unwrap_or(1.0),
            },
            Some(other) => return Err(bad(format!("unsupported rope scaling type '{other}'"))),
        };
        let config = ModelConfig {
            architecture,
            hidden_size,
            intermediate_size: req("feed_forward_length")?,
            num_layers: req("block_count")?,
            num_heads,
            num_kv_heads,
            head_dim,
            vocab_size,
            rms_eps: g
                .get_f32(&key("attention.layer_norm_rms_epsilon"))
                .unwrap_or(1e-5),
            rope_theta: g.get_f32(&key("rope.freq_base")).unwrap_or(10000.0),
            rope_scaling,
            max_position_embeddings: g
                .get_u64(&key("context_length"))
                .map_or(2048, |v| v as usize),
            sliding_window: g
                .get_u64(&key("attention.sliding_window"))
                .map(|v| v as usize),
            tie_word_embeddings: !g.tensors().iter().any(|t| t.name == "output.weight"),
            attention_bias: g.tensors().iter().any(|t| t.name == "blk.0.attn_q.bias"),
            bos_token_id: g.get_u64("tokenizer.ggml.bos_token_id").map(|v| v as u32),
            eos_token_ids: g
                .get_u64("tokenizer.ggml.eos_token_id")
                .map(|v| v as u32)
                .into_iter()
                .collect(),
        };
        config.check().map_err(bad)?;
        Ok(config)
    }

    /// Rejects configurations the engine cannot run (zero sizes, heads that do not divide).
    fn check(&self) -> std::result::Result<(), String> {
        let sizes = [
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_layers),
            ("num_attention_heads", self.num_heads),
            ("num_key_value_heads", self.num_kv_heads),
            ("head_dim", self.head_dim),
            ("vocab_size", self.vocab_size),
        ];
        if let Some((name, _)) = sizes.iter().find(|(_, v)| *v == 0) {
            return Err(format!("'{name}' must be positive"));
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return Err(format!(
                "num_attention_heads ({}) is not a multiple of num_key_value_heads ({})",
                self.num_heads, self.num_kv_heads
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(format!(
                "head_dim ({}) must be even for rotary embeddings",
                self.head_dim
            ));
        }
        if self.sliding_window == Some(0) {
            return Err("'sliding_window' must be positive".into());
        }
        Ok(())
    }

    /// Width of all query heads together.
    pub fn q_dim(&self) -> usize {
        self.num_heads * self.head_dim
    }

    /// Width of all key (or value) heads together.
    pub fn kv_dim(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }
}

fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::model_file(path, format!("invalid JSON: {e}")))
}

fn opt_usize(j: &Value, key: &str) -> std::result::Result<Option<usize>, String> {
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

fn opt_f64(j: &Value, key: &str) -> std::result::Result<Option<f64>, String> {
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

fn rope_scaling(v: Option<&Value>) -> std::result::Result<RopeScaling, String> {
    let Some(obj) = v.filter(|v| !v.is_null()) else {
        return Ok(RopeScaling::None);
    };
    let kind = obj
        .get("rope_type")
        .or_else(|| obj.get("type"))
        .and_then(Value::as_str)
        .ok_or("rope_scaling has no 'rope_type'")?;
    let f = |k: &str| opt_f64(obj, k).map(|v| v.map(|x| x as f32));
    let factor = f("factor")?.ok_or("rope_scaling has no 'factor'")?;
    match kind {
        "default" => Ok(RopeScaling::None),
        "linear" => Ok(RopeScaling::Linear { factor }),
        "llama3" => Ok(RopeScaling::Llama3 {
            factor,
            low_freq_factor: f("low_freq_factor")?.unwrap_or(1.0),
            high_freq_factor: f("high_freq_factor")?.unwrap_or(4.0),
            original_max_position_embeddings: opt_usize(obj, "original_max_position_embeddings")?
                .unwrap_or(8192),
        }),
        other => Err(format!("unsupported rope_scaling type '{other}'")),
    }
}
