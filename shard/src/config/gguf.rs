//! `ModelConfig` from GGUF metadata (`{arch}.embedding_length`, ...) under llama.cpp's key names,
//! with llama.cpp's defaults where a key is absent. What `convert_hf_to_gguf.py` writes no key for
//! is read from the tensors: `vocab_size` from the token embedding's shape, tying from the absence
//! of `output.weight`, biases, q/k norms and which layers are sparse from the tensors present, and
//! per-frequency rotary factors from `rope_freqs` (Llama 3.1) or `rope_factors_{short,long}`
//! (Phi-3's LongRoPE). Mixtral converts as architecture `llama` with experts.
//!
//! Not carried by the converter (so a GGUF may differ from its `config.json` here): dynamic NTK
//! rope scaling, Mistral's sliding window, Gemma's `query_pre_attn_scalar` (llama.cpp derives the
//! attention scale from the model's shape), Qwen3-MoE's `norm_topk_prob` (llama.cpp always
//! renormalizes) and Qwen3-MoE's dense `mlp_only_layers` (seen from the tensors instead).

use tessera_formats::gguf::Gguf;

use super::{rope, Architecture, LongRope, ModelConfig, MoeConfig, RopeConfig, RopeScaling, Yarn};
use crate::backend::Activation;
use crate::{Error, Result};

/// llama.cpp's `LLAMA_EXPERT_GATING_FUNC_TYPE_SOFTMAX`, the router the decoder implements.
const GATING_SOFTMAX: u64 = 1;

/// Typed access to `{arch}.*` keys.
struct Meta<'a> {
    g: &'a Gguf,
    arch: &'a str,
}

impl Meta<'_> {
    fn key(&self, k: &str) -> String {
        format!("{}.{k}", self.arch)
    }

    fn usize(&self, k: &str) -> Option<usize> {
        self.g.get_u64(&self.key(k)).map(|v| v as usize)
    }

    fn f32(&self, k: &str) -> Option<f32> {
        self.g.get_f32(&self.key(k))
    }

    fn req(&self, k: &str) -> Result<usize> {
        self.usize(k)
            .ok_or_else(|| self.bad(format!("missing metadata {}", self.key(k))))
    }

    fn bad(&self, msg: String) -> Error {
        Error::model_file(self.g.path(), msg)
    }

    fn has_tensor(&self, name: &str) -> bool {
        self.g.tensor_info(name).is_ok()
    }

    /// A 1-D f32 tensor (rotary factors), checked to hold `len` values.
    fn factors(&self, name: &str, len: usize) -> Result<Vec<f32>> {
        let (_, v) = self.g.tensor_f32(name)?;
        if v.len() != len {
            let msg = format!("holds {} factors, rotary dimensions need {len}", v.len());
            return Err(Error::tensor(self.g.path(), name, msg));
        }
        Ok(v)
    }
}

impl ModelConfig {
    pub fn from_gguf(g: &Gguf) -> Result<Self> {
        let arch_name = g
            .get_str("general.architecture")
            .ok_or_else(|| Error::model_file(g.path(), "missing general.architecture"))?;
        let m = Meta { g, arch: arch_name };
        let num_experts = m.usize("expert_count").filter(|&e| e > 0);
        let architecture = match Architecture::parse(arch_name) {
            Some(Architecture::Llama) if num_experts.is_some() => Architecture::Mixtral,
            Some(a) => a,
            None => return Err(Error::UnsupportedArchitecture(arch_name.into())),
        };
        reject_unsupported(&m)?;
        let hidden_size = m.req("embedding_length")?;
        let num_heads = m.req("attention.head_count")?;
        let num_kv_heads = m.usize("attention.head_count_kv").unwrap_or(num_heads);
        let head_dim = m
            .usize("attention.key_length")
            .unwrap_or(hidden_size / num_heads.max(1));
        let num_layers = m.req("block_count")?;
        let max_position_embeddings = m.usize("context_length").unwrap_or(2048);
        let embd = g.tensor_info("token_embd.weight")?;
        let vocab_size = embd.shape().first().copied().unwrap_or(0);
        let rope = global_rope(&m, head_dim, max_position_embeddings)?;
        let local_rope = local_rope(&m, architecture, &rope);
        let (sliding_window, sliding_layers) = sliding(&m, architecture, num_layers)?;
        let intermediate_size = m.req("feed_forward_length")?;
        let moe = num_experts.map(|num_experts| MoeConfig {
            num_experts,
            top_k: m.usize("expert_used_count").unwrap_or(1),
            intermediate_size: m
                .usize("expert_feed_forward_length")
                .unwrap_or(intermediate_size),
            // llama.cpp renormalizes the top-k weights of Mixtral and Qwen3-MoE whatever their
            // config said; a file that states `expert_weights_norm` is taken at its word.
            norm_topk_prob: g.get_bool(&m.key("expert_weights_norm")).unwrap_or(true),
            // Qwen3-MoE's dense `mlp_only_layers` have no router.
            sparse_layers: (0..num_layers)
                .map(|i| m.has_tensor(&format!("blk.{i}.ffn_gate_inp.weight")))
                .collect(),
        });
        let gemma = architecture.is_gemma();
        let gemma2 = architecture == Architecture::Gemma2;
        let softcap = |k: &str, default: Option<f32>| m.f32(k).or(default).filter(|&c| c > 0.0);
        let config = ModelConfig {
            architecture,
            hidden_size,
            intermediate_size,
            num_layers,
            num_heads,
            num_kv_heads,
            head_dim,
            vocab_size,
            rms_eps: m.f32("attention.layer_norm_rms_epsilon").unwrap_or(1e-5),
            rope,
            local_rope,
            max_position_embeddings,
            sliding_window,
            sliding_layers,
            tie_word_embeddings: !m.has_tensor("output.weight"),
            attention_bias: m.has_tensor("blk.0.attn_q.bias")
                || m.has_tensor("blk.0.attn_qkv.bias"),
            qk_norm: m.has_tensor("blk.0.attn_q_norm.weight"),
            activation: if gemma {
                Activation::GeluTanh
            } else {
                Activation::Silu
            },
            attn_scale: attention_scale(&m, architecture, hidden_size, num_heads, head_dim),
            attn_softcap: softcap("attn_logit_softcapping", gemma2.then_some(50.0)),
            final_softcap: softcap("final_logit_softcapping", gemma2.then_some(30.0)),
            moe,
            bos_token_id: g.get_u64("tokenizer.ggml.bos_token_id").map(|v| v as u32),
            eos_token_ids: g
                .get_u64("tokenizer.ggml.eos_token_id")
                .map(|v| v as u32)
                .into_iter()
                .collect(),
        };
        config.check().map_err(|msg| m.bad(msg))?;
        Ok(config)
    }
}

/// Keys that change the computation in ways the decoder does not implement: refused rather than
/// served wrong.
fn reject_unsupported(m: &Meta) -> Result<()> {
    for k in ["embedding_scale", "logit_scale", "residual_scale"] {
        if let Some(v) = m.f32(k).filter(|&v| v != 0.0 && v != 1.0) {
            return Err(m.bad(format!("{} = {v} is not supported", m.key(k))));
        }
    }
    if let Some(v) = m
        .f32("expert_weights_scale")
        .filter(|&v| v != 0.0 && v != 1.0)
    {
        let k = m.key("expert_weights_scale");
        return Err(m.bad(format!("{k} = {v} is not supported")));
    }
    if let Some(f) = m.usize("expert_gating_func") {
        if f as u64 != GATING_SOFTMAX {
            let k = m.key("expert_gating_func");
            return Err(m.bad(format!("{k} = {f}: only softmax routing is supported")));
        }
    }
    Ok(())
}

/// The rotary embedding of full-attention layers (of every layer unless Gemma 3's local one).
fn global_rope(m: &Meta, head_dim: usize, context: usize) -> Result<RopeConfig> {
    let theta = m.f32("rope.freq_base").unwrap_or(10000.0);
    let rotary_dim = m.usize("rope.dimension_count").unwrap_or(head_dim);
    let half = rotary_dim / 2;
    // llama.cpp's old key for the linear factor comes second.
    let factor = m
        .f32("rope.scaling.factor")
        .or_else(|| m.f32("rope.scale_linear"));
    let original = m
        .usize("rope.scaling.original_context_length")
        .unwrap_or(context);
    let freq_factors = m.has_tensor("rope_freqs.weight");
    let long_rope = m.has_tensor("rope_factors_long.weight");
    let kind = m.g.get_str(&m.key("rope.scaling.type"));
    let scaling = match kind {
        Some("yarn") => RopeScaling::Yarn(yarn(m, factor, original)),
        Some("longrope") => long_rope_scaling(m, half, context, original)?,
        // Phi-3's converter writes no scaling type, only the factor tensors.
        None if long_rope => long_rope_scaling(m, half, context, original)?,
        // Llama 3.1: the converter bakes the llama3 rescaling into one divisor per frequency.
        None | Some("none") if freq_factors => {
            let f = m.factors("rope_freqs.weight", half)?;
            RopeScaling::LongRope(LongRope {
                short_factor: f.clone(),
                long_factor: f,
                original_max_position_embeddings: usize::MAX,
                attention_factor: 1.0,
            })
        }
        Some("none") => RopeScaling::None,
        // llama.cpp reads a missing type as linear, which a missing factor makes plain.
        None | Some("linear") => match factor.filter(|&f| f != 0.0 && f != 1.0) {
            Some(factor) => RopeScaling::Linear { factor },
            None => RopeScaling::None,
        },
        Some(other) => {
            return Err(m.bad(format!("unsupported rope scaling type '{other}'")));
        }
    };
    if freq_factors && !matches!(kind, None | Some("none")) {
        return Err(m.bad(format!(
            "rope_freqs.weight together with rope scaling '{}' is not supported",
            kind.unwrap_or_default()
        )));
    }
    Ok(RopeConfig {
        theta,
        scaling,
        rotary_dim,
    })
}

/// YaRN as transformers computes it from what the converter copied out of `rope_scaling`.
fn yarn(m: &Meta, factor: Option<f32>, original: usize) -> Yarn {
    let factor = factor.unwrap_or(1.0);
    // The converter stores HF's explicit `attention_factor` as `yarn_attn_factor`; DeepSeek-style
    // files give `mscale_all_dim` as `yarn_log_multiplier` (llama.cpp takes mscale as 1).
    let attention_factor = match m.f32("rope.scaling.yarn_attn_factor") {
        Some(a) => a,
        None => {
            let all = m.f32("rope.scaling.yarn_log_multiplier").map(f64::from);
            rope::yarn_attention_factor(factor as f64, Some(1.0), all) as f32
        }
    };
    Yarn {
        factor,
        original_max_position_embeddings: original,
        beta_fast: m.f32("rope.scaling.yarn_beta_fast").unwrap_or(32.0),
        beta_slow: m.f32("rope.scaling.yarn_beta_slow").unwrap_or(1.0),
        truncate: true,
        attention_factor,
    }
}

/// Phi-3's LongRoPE: factor tensors, the original context and the converter's attention factor
/// (transformers' default formula when the key is missing).
fn long_rope_scaling(
    m: &Meta,
    half: usize,
    context: usize,
    original: usize,
) -> Result<RopeScaling> {
    let attention_factor = match m.f32("rope.scaling.attn_factor") {
        Some(a) => a,
        None => rope::long_rope_attention_factor(context as f64 / original as f64, original) as f32,
    };
    Ok(RopeScaling::LongRope(LongRope {
        short_factor: m.factors("rope_factors_short.weight", half)?,
        long_factor: m.factors("rope_factors_long.weight", half)?,
        original_max_position_embeddings: original,
        attention_factor,
    }))
}

/// The rotary embedding of sliding-window layers: Gemma 3's local base (`rope.freq_base_swa`,
/// 10000 in llama.cpp when absent) without the global scaling; other families only when the file
/// gives them a base of their own.
fn local_rope(m: &Meta, arch: Architecture, global: &RopeConfig) -> Option<RopeConfig> {
    let base = m.f32("rope.freq_base_swa");
    let rotary_dim = m
        .usize("rope.dimension_count_swa")
        .unwrap_or(global.rotary_dim);
    match (arch, base) {
        (Architecture::Gemma3, _) => Some(RopeConfig::plain(base.unwrap_or(10000.0), rotary_dim)),
        (_, Some(b)) if b != global.theta => Some(RopeConfig::plain(b, rotary_dim)),
        _ => None,
    }
}

/// The window and which layers use it: `attention.sliding_window_pattern` (a per-layer list, or
/// a period whose last layer is full) or each family's pattern in llama.cpp (Gemma 2 every other
/// layer from layer 0, Gemma 3 five of six); other families window every layer.
fn sliding(m: &Meta, arch: Architecture, layers: usize) -> Result<(Option<usize>, Vec<bool>)> {
    let window = match arch {
        // llama.cpp's Gemma 2 default when the key is missing.
        Architecture::Gemma2 => Some(m.usize("attention.sliding_window").unwrap_or(4096)),
        _ => m.usize("attention.sliding_window"),
    }
    .filter(|&w| w > 0);
    let Some(window) = window else {
        return Ok((None, vec![false; layers]));
    };
    let pattern_key = m.key("attention.sliding_window_pattern");
    if let Some(list) = m.g.get_array(&pattern_key) {
        let flags: Option<Vec<bool>> = list.iter().map(|v| v.as_bool()).collect();
        let flags = flags.ok_or_else(|| m.bad(format!("{pattern_key} must be booleans")))?;
        if flags.len() != layers {
            return Err(m.bad(format!(
                "{pattern_key} has {} entries for {layers} layers",
                flags.len()
            )));
        }
        return Ok((Some(window), flags));
    }
    let period = m.usize("attention.sliding_window_pattern").or(match arch {
        Architecture::Gemma2 => Some(2),
        Architecture::Gemma3 => Some(6),
        _ => None,
    });
    let flags = match period {
        // llama.cpp's `set_swa_pattern`: 0 windows every layer, else each period ends full.
        Some(n) if n > 0 => (0..layers).map(|i| i % n < n - 1).collect(),
        _ => vec![true; layers],
    };
    Ok((Some(window), flags))
}

/// `attention.scale` when given, else llama.cpp's rule: 1/√head_dim, except Gemma 2/3 27B, which
/// scale by 1/√(hidden/heads) (their `query_pre_attn_scalar`; the converter keeps no key for it).
fn attention_scale(
    m: &Meta,
    arch: Architecture,
    hidden: usize,
    heads: usize,
    head_dim: usize,
) -> f32 {
    if let Some(s) = m.f32("attention.scale").filter(|&s| s != 0.0) {
        return s;
    }
    let layers = m.usize("block_count").unwrap_or(0);
    let is_27b = matches!(
        (arch, layers),
        (Architecture::Gemma2, 46) | (Architecture::Gemma3, 62)
    );
    let d = if is_27b {
        hidden / heads.max(1)
    } else {
        head_dim
    };
    (d as f64).powf(-0.5) as f32
}
