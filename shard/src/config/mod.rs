//! The resolved model configuration: `config.json` (+ `generation_config.json`, `hf.rs`) or GGUF
//! metadata (`gguf.rs`) turned into one struct the decoder reads. Families differ only in what is
//! resolved here: biases, q/k norms, Gemma's norms and soft-caps, sliding-window layers, the
//! rotary embedding (`rope.rs`) and mixture-of-experts MLPs.

mod gguf;
mod hf;
mod rope;

use std::fmt;

pub use rope::{LongRope, RopeConfig, RopeScaling, Yarn};

use crate::backend::Activation;

/// Supported model families; all run on one decoder (`models::decoder`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    Llama,
    Mistral,
    Mixtral,
    Qwen2,
    Qwen3,
    Qwen3Moe,
    Gemma2,
    Gemma3,
    Phi3,
}

impl Architecture {
    /// From a `model_type`, a transformers class name or a GGUF `general.architecture`.
    fn parse(name: &str) -> Option<Self> {
        let name = name.to_ascii_lowercase();
        let name = name.strip_suffix("forcausallm").unwrap_or(&name);
        Some(match name {
            "llama" => Self::Llama,
            "mistral" => Self::Mistral,
            "mixtral" => Self::Mixtral,
            "qwen2" => Self::Qwen2,
            "qwen3" => Self::Qwen3,
            "qwen3_moe" | "qwen3moe" => Self::Qwen3Moe,
            "gemma2" => Self::Gemma2,
            "gemma3_text" | "gemma3" => Self::Gemma3,
            "phi3" => Self::Phi3,
            _ => return None,
        })
    }

    pub const SUPPORTED: &'static str =
        "llama, mistral, mixtral, qwen2, qwen3, qwen3_moe, gemma2, gemma3_text, phi3";

    /// Gemma: embeddings scaled by √hidden, RMSNorm weights applied as `(1 + w)`, and norms both
    /// before and after attention and the MLP.
    pub fn is_gemma(self) -> bool {
        matches!(self, Self::Gemma2 | Self::Gemma3)
    }
}

impl fmt::Display for Architecture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Llama => "llama",
            Self::Mistral => "mistral",
            Self::Mixtral => "mixtral",
            Self::Qwen2 => "qwen2",
            Self::Qwen3 => "qwen3",
            Self::Qwen3Moe => "qwen3_moe",
            Self::Gemma2 => "gemma2",
            Self::Gemma3 => "gemma3_text",
            Self::Phi3 => "phi3",
        })
    }
}

/// A sparse mixture-of-experts MLP (Mixtral, Qwen3-MoE).
#[derive(Debug, Clone, PartialEq)]
pub struct MoeConfig {
    pub num_experts: usize,
    /// Experts each token is routed to.
    pub top_k: usize,
    /// Each expert's FFN width.
    pub intermediate_size: usize,
    /// Rescale the top-k router probabilities to sum to 1 (always for Mixtral).
    pub norm_topk_prob: bool,
    /// Per layer: whether its MLP is the mixture (else a dense MLP of `intermediate_size`).
    pub sparse_layers: Vec<bool>,
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
    /// The rotary embedding of full-attention layers (of every layer unless `local_rope`).
    pub rope: RopeConfig,
    /// The rotary embedding of sliding-window layers where it differs (Gemma 3).
    pub local_rope: Option<RopeConfig>,
    pub max_position_embeddings: usize,
    /// The window of the sliding-window layers; `None` when no layer has one.
    pub sliding_window: Option<usize>,
    /// Per layer: whether it attends within `sliding_window` only.
    pub sliding_layers: Vec<bool>,
    pub tie_word_embeddings: bool,
    pub attention_bias: bool,
    /// Per-head RMSNorm of q and k before the rotary embedding (Qwen 3, Gemma 3).
    pub qk_norm: bool,
    pub activation: Activation,
    /// Multiplies q·k: `1/√head_dim`, or `1/√query_pre_attn_scalar` (Gemma).
    pub attn_scale: f32,
    /// Attention scores soft-capped at this value (Gemma 2).
    pub attn_softcap: Option<f32>,
    /// Final logits soft-capped at this value (Gemma 2).
    pub final_softcap: Option<f32>,
    pub moe: Option<MoeConfig>,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

impl ModelConfig {
    /// Rejects configurations the engine cannot run (zero sizes, heads that do not divide).
    fn check(&self) -> Result<(), String> {
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
        for rope in std::iter::once(&self.rope).chain(&self.local_rope) {
            rope.check(self.head_dim)?;
        }
        if self.sliding_window == Some(0) {
            return Err("'sliding_window' must be positive".into());
        }
        if self.sliding_layers.len() != self.num_layers {
            return Err(format!(
                "'layer_types' has {} entries for {} layers",
                self.sliding_layers.len(),
                self.num_layers
            ));
        }
        if let Some(moe) = &self.moe {
            if moe.num_experts == 0 || moe.top_k == 0 || moe.top_k > moe.num_experts {
                return Err(format!(
                    "experts: {} routed to {} per token; need 1 <= top-k <= experts",
                    moe.num_experts, moe.top_k
                ));
            }
            if moe.intermediate_size == 0 {
                return Err("the experts' intermediate size must be positive".into());
            }
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

    /// The attention window of layer `i` (`None`: full causal attention).
    pub fn window(&self, layer: usize) -> Option<usize> {
        self.sliding_window.filter(|_| self.sliding_layers[layer])
    }
}
