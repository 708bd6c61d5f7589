//! `ModelConfig` from GGUF metadata (`{arch}.embedding_length`, ...) under llama.cpp's key names.
//! `vocab_size` comes from the token embedding's shape and tying from the absence of
//! `output.weight`.

use tessera_formats::gguf::Gguf;

use super::{Architecture, ModelConfig, MoeConfig, RopeConfig, RopeScaling};
use crate::backend::Activation;
use crate::{Error, Result};

impl ModelConfig {
    pub fn from_gguf(g: &Gguf) -> Result<Self> {
        let bad = |msg: String| Error::model_file(g.path(), msg);
        let arch_name = g
            .get_str("general.architecture")
            .ok_or_else(|| bad("missing general.architecture".into()))?;
        let architecture = Architecture::parse(arch_name)
            .ok_or_else(|| Error::UnsupportedArchitecture(arch_name.into()))?;
        let key = |k: &str| format!("{arch_name}.{k}");
        let opt = |k: &str| g.get_u64(&key(k)).map(|v| v as usize);
        let req = |k: &str| -> Result<usize> {
            opt(k).ok_or_else(|| bad(format!("missing metadata {}", key(k))))
        };
        let hidden_size = req("embedding_length")?;
        let num_heads = req("attention.head_count")?;
        let num_kv_heads = opt("attention.head_count_kv").unwrap_or(num_heads);
        let head_dim = opt("attention.key_length").unwrap_or(hidden_size / num_heads.max(1));
        let num_layers = req("block_count")?;
        let embd = g.tensor_info("token_embd.weight")?;
        let vocab_size = embd.shape().first().copied().unwrap_or(0);
        let scaling = match g.get_str(&key("rope.scaling.type")) {
            None | Some("none") => RopeScaling::None,
            Some("linear") => RopeScaling::Linear {
                factor: g.get_f32(&key("rope.scaling.factor")).unwrap_or(1.0),
            },
            Some(other) => return Err(bad(format!("unsupported rope scaling type '{other}'"))),
        };
        let rope = RopeConfig {
            theta: g.get_f32(&key("rope.freq_base")).unwrap_or(10000.0),
            scaling,
            rotary_dim: opt("rope.dimension_count").unwrap_or(head_dim),
        };
        let intermediate_size = req("feed_forward_length")?;
        let moe = opt("expert_count")
            .filter(|&e| e > 0)
            .map(|num_experts| MoeConfig {
                num_experts,
                top_k: opt("expert_used_count").unwrap_or(1),
                intermediate_size: opt("expert_feed_forward_length").unwrap_or(intermediate_size),
                norm_topk_prob: true,
                sparse_layers: vec![true; num_layers],
            });
        let sliding_window = opt("attention.sliding_window");
        let config = ModelConfig {
            architecture,
            hidden_size,
            intermediate_size,
            num_layers,
            num_heads,
            num_kv_heads,
            head_dim,
            vocab_size,
            rms_eps: g
                .get_f32(&key("attention.layer_norm_rms_epsilon"))
                .unwrap_or(1e-5),
            rope,
            local_rope: None,
            max_position_embeddings: opt("context_length").unwrap_or(2048),
            sliding_window,
            sliding_layers: vec![sliding_window.is_some(); num_layers],
            tie_word_embeddings: !g.tensors().iter().any(|t| t.name == "output.weight"),
            attention_bias: g.tensors().iter().any(|t| t.name == "blk.0.attn_q.bias"),
            qk_norm: g
                .tensors()
                .iter()
                .any(|t| t.name == "blk.0.attn_q_norm.weight"),
            activation: Activation::Silu,
            attn_scale: (head_dim as f64).powf(-0.5) as f32,
            attn_softcap: None,
            final_softcap: None,
            moe,
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
}
